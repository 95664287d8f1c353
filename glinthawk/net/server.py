"""Serving: accepting connections, their limits, and the server's half of the handshake.

A server that does a handshake keeps two kinds of connection apart. Those that have not
completed it get a small allowance of their own (``max_unauthenticated``) and a deadline;
when the allowance is full, a newcomer closes the oldest of them instead of being refused,
so an attacker who wants to keep an honest peer out must open connections faster than that
peer completes a handshake. Only peers ``server_handshake`` accepted count against
``max_connections``: unauthenticated ones, however many, never lock them out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from . import auth
from .codec import DEFAULT_MAX_FRAME_BYTES, ProtocolError
from .connection import HANDSHAKE_MAX_FRAME_BYTES, Connection, ConnectionClosed, _FrameProtocol
from .handshake import HANDSHAKE_TIMEOUT_S, recv_within
from .messages import PROTOCOL_VERSION, MsgType
from .netem import NetEm

log = logging.getLogger("glinthawk.net")

MAX_CONNECTIONS = 256  # connections that completed the handshake (all of them, on a server without one)
MAX_UNAUTHENTICATED = 64  # connections still in the handshake
HANDSHAKE_DEADLINE_S = 10.0  # from accept to WELCOME


class _Admission:
    """Which connections a server holds: those still in the handshake (oldest first), and those accepted."""

    def __init__(self, max_connections: int, max_unauthenticated: int | None, deadline_s: float) -> None:
        self.max_connections, self.max_unauthenticated, self.deadline_s = max_connections, max_unauthenticated, deadline_s
        self.accepted: set[_FrameProtocol] = set()
        self.pending: dict[_FrameProtocol, asyncio.TimerHandle] = {}  # insertion order: oldest first

    def arrive(self, protocol: _FrameProtocol) -> bool:
        """Take a new connection, making room for it if need be; False when it was refused."""
        if len(self.accepted) >= self.max_connections:
            log.warning("refusing connection: %d connections open", len(self.accepted))
            protocol.fail(ProtocolError(f"server is at its limit of {self.max_connections} connections; "
                                        "try again later"))
            return False
        protocol.lost.add_done_callback(lambda _: self._forget(protocol))
        if self.max_unauthenticated is None:  # no handshake: every connection is a peer from the start
            self.accepted.add(protocol)
            return True
        if len(self.pending) >= self.max_unauthenticated:
            self._drop(next(iter(self.pending)), "server is at its limit of connections still in the handshake "
                       "and closed the oldest, this one; try again, and complete the handshake promptly")
        loop = asyncio.get_running_loop()
        self.pending[protocol] = loop.call_later(self.deadline_s, self._drop, protocol,
                                                 f"no completed handshake within {self.deadline_s:g} s")
        protocol.admit = lambda: self._admit(protocol)
        return True

    def _admit(self, protocol: _FrameProtocol) -> None:
        """The peer passed the handshake: it counts against ``max_connections`` from now on."""
        deadline = self.pending.pop(protocol, None)
        if deadline is None:
            raise ProtocolError("the server closed this connection during the handshake; connect again")
        deadline.cancel()
        if len(self.accepted) >= self.max_connections:
            raise ProtocolError(f"server is at its limit of {self.max_connections} connections; try again later")
        self.accepted.add(protocol)

    def _drop(self, protocol: _FrameProtocol, message: str) -> None:
        if (deadline := self.pending.pop(protocol, None)) is not None:
            deadline.cancel()
            protocol.refuse(message)

    def _forget(self, protocol: _FrameProtocol) -> None:
        if (deadline := self.pending.pop(protocol, None)) is not None:
            deadline.cancel()
        self.accepted.discard(protocol)


async def start_server(
    on_connection: Callable[[Connection], Awaitable[None]],
    host: str | None,
    port: int,
    *,
    netem: NetEm | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    handshake_frame_bytes: int | None = HANDSHAKE_MAX_FRAME_BYTES,
    max_connections: int = MAX_CONNECTIONS,
    max_unauthenticated: int = MAX_UNAUTHENTICATED,
    handshake_deadline_s: float = HANDSHAKE_DEADLINE_S,
) -> asyncio.Server:
    """Serve: run ``on_connection(conn)`` as a task for every accepted connection.

    The connection is closed when its handler returns or raises; an exception is logged
    and affects no other connection. Frames are limited to ``handshake_frame_bytes`` until
    ``server_handshake`` accepts the peer, then to ``max_frame_bytes``. Until then the
    connection is one of at most ``max_unauthenticated`` (a newcomer closes the oldest) and
    is closed after ``handshake_deadline_s``; accepted peers are at most ``max_connections``,
    beyond which a newcomer gets an ERROR frame and is closed. Pass
    ``handshake_frame_bytes=None`` for a handler that does no handshake: then every
    connection counts against ``max_connections`` from the start.
    """
    loop = asyncio.get_running_loop()
    admission = _Admission(max_connections, None if handshake_frame_bytes is None else max_unauthenticated,
                           handshake_deadline_s)
    handlers: set[asyncio.Task[None]] = set()  # strong references to running handlers

    async def handle(conn: Connection) -> None:
        try:
            await on_connection(conn)
        except (ProtocolError, ConnectionClosed) as exc:
            log.warning("connection from %s ended: %s", conn.peername, exc)
        except Exception:
            log.exception("handler for connection from %s failed", conn.peername)
        finally:
            conn.close()

    def accept(protocol: _FrameProtocol) -> None:
        if admission.arrive(protocol):
            task = loop.create_task(handle(Connection(protocol, netem)))
            handlers.add(task)
            task.add_done_callback(handlers.discard)

    return await loop.create_server(lambda: _FrameProtocol(max_frame_bytes, accept, handshake_frame_bytes), host, port)


async def server_handshake(
    conn: Connection,
    allowed_roles: set[str],
    welcome: Mapping[str, Any] | Callable[[dict], Mapping[str, Any]],
    *,
    secret: bytes | None = None,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> dict:
    """Read the peer's HELLO, check its version, authenticate, check its role, answer WELCOME; return the HELLO.

    ``welcome`` holds the fields to send back, or computes them from the HELLO (what it
    raises refuses the peer, with the exception's message); it runs synchronously right
    before WELCOME is sent, so a claim it makes cannot race another handshake's. With a
    ``secret`` the peer must answer an HMAC challenge before it hears anything else: its
    role, and whatever ``welcome`` would refuse it for, are checked only once it has
    authenticated. On any mismatch the peer gets an ERROR frame whose "message" says what
    is wrong, the connection is closed and ProtocolError is raised. Once the peer is
    accepted, it counts against the server's ``max_connections`` and its handshake frame
    limit is lifted (see ``start_server``).
    """
    hello = await recv_within(conn, timeout_s, "HELLO")
    problem = _hello_problem(hello, secret)
    if problem is None and secret is not None:
        problem = await _challenge(conn, secret, hello["nonce"], timeout_s)
    if problem is None and hello.get("role") not in allowed_roles:
        problem = f"role {hello.get('role')!r} is not accepted here (accepted: {', '.join(sorted(allowed_roles))})"
    if problem is None:
        try:
            conn._protocol.admit()
            fields = welcome(hello) if callable(welcome) else welcome
        except Exception as exc:  # the peer hears why it cannot be served, not just a hang-up
            problem = str(exc) or repr(exc)
        else:
            conn._protocol.end_handshake()  # before WELCOME: the peer may send large frames once it has it
            await conn.send({**fields, "type": MsgType.WELCOME, "version": PROTOCOL_VERSION})
            return hello
    await conn.send({"type": MsgType.ERROR, "message": problem})
    conn.close()
    raise ProtocolError(problem)


def _hello_problem(hello: dict, secret: bytes | None) -> str | None:
    """What is wrong with the HELLO as a protocol message; nothing here depends on who we are."""
    if hello["type"] != MsgType.HELLO:
        return f"expected HELLO, got {hello['type']!r}"
    if hello.get("version") != PROTOCOL_VERSION:
        return f"protocol version mismatch: server speaks {PROTOCOL_VERSION}, client sent {hello.get('version')!r}"
    if secret is not None and not isinstance(hello.get("nonce"), bytes):
        return "HELLO carries no nonce; this server requires authentication"
    return None


async def _challenge(conn: Connection, secret: bytes, client_nonce: bytes, timeout_s: float) -> str | None:
    """Prove ourselves and check the peer's proof; returns the problem, or None when authenticated."""
    nonce = auth.new_nonce()
    await conn.send({"type": MsgType.CHALLENGE, "nonce": nonce,
                     "proof": auth.proof(secret, b"server", client_nonce, nonce)})
    answer = await recv_within(conn, timeout_s, "AUTH")
    if answer["type"] != MsgType.AUTH or not auth.verify(auth.proof(secret, b"client", nonce, client_nonce),
                                                          answer.get("proof")):
        return "authentication failed: wrong or missing shared secret"
    return None
