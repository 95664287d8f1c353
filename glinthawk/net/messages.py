"""Wire protocol constants: the protocol version and the message type names."""

from enum import StrEnum

PROTOCOL_VERSION = 2  # 2: an ATTN frame lists its sequences only for the first layer of a step


class MsgType(StrEnum):
    """Message types; the value is the string carried in a frame header's "type".

    A ``StrEnum`` member compares equal to its plain-string value, so a decoded
    header can be checked with ``header["type"] == MsgType.ATTN``.
    """

    HELLO = "hello"
    CHALLENGE = "challenge"
    AUTH = "auth"
    WELCOME = "welcome"
    CAPACITY = "capacity"
    ATTN = "attn"
    ATTN_OUT = "attn_out"
    RELEASE = "release"
    SUBMIT = "submit"
    RESULT = "result"
    ERROR = "error"
    PING = "ping"
    PONG = "pong"
    DRAIN = "drain"
    DONE = "done"
    STATUS = "status"


KNOWN_TYPES: frozenset[str] = frozenset(t.value for t in MsgType)
