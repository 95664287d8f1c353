"""The client's side of the handshake every connection starts with (the server's: ``server.py``)."""

import asyncio
from collections.abc import Mapping
from typing import Any

from . import auth
from .codec import ProtocolError
from .connection import Connection
from .messages import PROTOCOL_VERSION, MsgType

HANDSHAKE_TIMEOUT_S = 10.0


async def recv_within(conn: Connection, timeout_s: float, what: str) -> dict:
    """A peer that stalls mid-handshake is dropped instead of holding a connection slot."""
    try:
        async with asyncio.timeout(timeout_s):
            header, _ = await conn.recv()
    except TimeoutError:
        conn.close()
        raise ProtocolError(f"no {what} within {timeout_s:.0f} s") from None
    return header


async def client_handshake(
    conn: Connection, role: str, info: Mapping[str, Any], *, secret: bytes | None = None,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> dict:
    """Introduce ourselves with HELLO; return the server's WELCOME header.

    With a ``secret``, the server must prove it knows it too (mutual HMAC). Raises
    ProtocolError (and closes the connection) if the server refuses with an ERROR,
    fails authentication, or answers with anything but a WELCOME of our version.
    """
    if clash := {"type", "version", "role", "nonce"} & info.keys():
        raise ValueError(f"handshake info may not set {sorted(clash)}")
    # The server answers with one frame (WELCOME or ERROR), after a CHALLENGE where we authenticate.
    conn._protocol.end_handshake_after(2 if secret is not None else 1)
    nonce = auth.new_nonce()
    await conn.send({**info, "type": MsgType.HELLO, "version": PROTOCOL_VERSION, "role": role, "nonce": nonce})
    reply = await recv_within(conn, timeout_s, "handshake reply")
    problem = None
    if reply["type"] == MsgType.CHALLENGE:
        server_nonce = reply.get("nonce")
        if secret is None:
            problem = f"server requires a shared secret; pass --secret-file or set ${auth.SECRET_ENV}"
        elif not isinstance(server_nonce, bytes) or not auth.verify(
                auth.proof(secret, b"server", nonce, server_nonce), reply.get("proof")):
            problem = "server failed authentication: its secret differs from ours"
            # In place of our proof, so that the server logs why we hung up (not just that we did).
            await conn.send({"type": MsgType.ERROR, "message": "the client's shared secret differs"})
        else:
            await conn.send({"type": MsgType.AUTH, "proof": auth.proof(secret, b"client", server_nonce, nonce)})
            reply = await recv_within(conn, timeout_s, "WELCOME")
    elif secret is not None and reply["type"] == MsgType.WELCOME:
        problem = "server did not authenticate itself although we have a shared secret; refusing it"
    if problem is None:
        if reply["type"] == MsgType.ERROR:
            problem = f"server refused the handshake: {reply.get('message', 'no reason given')}"
        elif reply["type"] != MsgType.WELCOME:
            problem = f"expected WELCOME, got {reply['type']!r}"
        elif reply.get("version") != PROTOCOL_VERSION:
            problem = f"server speaks protocol version {reply.get('version')!r}, we speak {PROTOCOL_VERSION}"
        else:
            return reply
    conn.close()
    raise ProtocolError(problem)
