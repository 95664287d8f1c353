"""Network layer: framing, tensor transport, connections, handshake and link emulation."""

from .codec import DEFAULT_MAX_FRAME_BYTES, ProtocolError, decode_frame, encode_frame
from .connection import (
    Connection,
    ConnectionClosed,
    client_handshake,
    install_event_loop_policy,
    open_connection,
    run,
)
from .messages import KNOWN_TYPES, PROTOCOL_VERSION, MsgType
from .netem import NetEm, parse_bandwidth, parse_size
from .server import server_handshake, start_server

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "KNOWN_TYPES",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionClosed",
    "MsgType",
    "NetEm",
    "ProtocolError",
    "client_handshake",
    "decode_frame",
    "encode_frame",
    "install_event_loop_policy",
    "open_connection",
    "parse_bandwidth",
    "parse_size",
    "run",
    "server_handshake",
    "start_server",
]
