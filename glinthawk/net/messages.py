"""Wire protocol constants: the protocol version and the message type names."""

from enum import StrEnum

PROTOCOL_VERSION = 6  # 3: pipeline stages (HIDDEN, TOKENS, STEP_FAILED, NODES, STAGE_DOWN, RESET); 4: log-probs in them;
# 5: Tier 2 nodes that join and leave (JOINED, LEAVE, LEFT); 6: reservations on a shared prefix ([id, tokens, holder])


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
    # Between the pipeline stages of Tier 1 (see node/chain.py)
    HIDDEN = "hidden"  # a micro-batch's hidden states and step plan, to the next stage
    TOKENS = "tokens"  # its sampled tokens, back from the last stage
    STEP_FAILED = "step_failed"  # its step could not be finished downstream (a node lost, an error)
    NODES = "nodes"  # a stage's Tier 2 nodes changed (lost, rejoined)
    STAGE_DOWN = "stage_down"  # a stage further down is unreachable
    RESET = "reset"  # the first stage is gone: give back every sequence's KV room
    # Tier 2 nodes joining and leaving a running Tier 1 (see node/pool.py, node/joiner.py)
    JOINED = "joined"  # Tier 1 to a node that dialed it (role "tier2-join"): it connected back, the node is in
    LEAVE = "leave"  # a node (or ``glinthawk drain``) asks Tier 1 to drain it: no new sequences, then LEFT
    LEFT = "left"  # Tier 1 is done with a drained node: to the node (which exits) and to whoever asked


KNOWN_TYPES: frozenset[str] = frozenset(t.value for t in MsgType)
