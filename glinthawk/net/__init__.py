"""Network layer: framing, tensor transport, connections, handshake and link emulation.

The names below load on first use, so that importing one light module of the package (``netem``,
``auth``) does not import torch through ``codec``.
"""

_LAZY = {
    "DEFAULT_MAX_FRAME_BYTES": "codec", "ProtocolError": "codec", "decode_frame": "codec", "encode_frame": "codec",
    "Connection": "connection", "ConnectionClosed": "connection", "client_handshake": "handshake",
    "install_event_loop_policy": "loop", "open_connection": "connection", "run": "loop",
    "KNOWN_TYPES": "messages", "PROTOCOL_VERSION": "messages", "MsgType": "messages",
    "NetEm": "netem", "parse_bandwidth": "netem", "parse_size": "netem",
    "server_handshake": "server", "start_server": "server",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'glinthawk.net' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"glinthawk.net.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
