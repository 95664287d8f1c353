"""Framed, tensor-carrying TCP connections on asyncio (uvloop when available).

Reading uses ``asyncio.BufferedProtocol``: once a frame's 4-byte length is known (and
within the limit), a bytearray of exactly that size is allocated and the socket reads
straight into it;
``decode_frame`` then wraps the tensors over that bytearray, so a received tensor is
never copied in Python. Sending writes the prefix+header and then each tensor's own
memory.
"""

import asyncio
import collections
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .codec import DEFAULT_MAX_FRAME_BYTES, ProtocolError, decode_frame, encode_frame
from .messages import MsgType
from .netem import DelayedSender, NetEm


Tensors = Mapping[str, torch.Tensor]

_MAX_QUEUED_FRAMES = 64  # received but not yet recv()ed; beyond this, stop reading
_COALESCE_BYTES = 16 << 10  # smaller buffers are joined: a copy is cheaper than a syscall
_LINGER_S = 2.0  # after a protocol error, how long to wait for the peer to hang up
# The limit on frames until the handshake is done, on either end (a server until
# server_handshake accepts the peer, a client until client_handshake has the answer): a
# frame's buffer is allocated once its length prefix arrives, so without it 4 bytes from
# anyone would claim max_frame_bytes. Handshake messages take a few hundred bytes.
HANDSHAKE_MAX_FRAME_BYTES = 64 << 10
CONNECT_TIMEOUT_S = 10.0


class ConnectionClosed(ConnectionError):
    """The connection is closed: the peer hung up at a frame boundary, or we closed it."""


# A peer whose host died (or whose network went) sends no FIN: without probes its
# connection stays open forever, and a Tier 2 node would keep refusing a restarted Tier 1
# as "already served". The kernel answers probes for a process busy computing, so only a
# dead peer is dropped: after KEEPALIVE_IDLE_S of silence, KEEPALIVE_PROBES unanswered
# probes KEEPALIVE_INTERVAL_S apart (25 s in all).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 5, 3


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                          ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, option):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class _FrameProtocol(asyncio.BufferedProtocol):
    """Transport callbacks: cut the byte stream into frame bodies, track write flow control."""

    def __init__(self, max_frame_bytes: int, on_made: Callable[["_FrameProtocol"], None],
                 handshake_frame_bytes: int | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        # in force until end_handshake(), or until the frames end_handshake_after() names have
        # arrived; None: max_frame_bytes from the start
        self.handshake_frame_bytes = handshake_frame_bytes
        self._handshake_frames: int | None = None
        self._frames_received = 0
        self._on_made = on_made
        # called by server_handshake as it accepts the peer; a server sets it to count the peer
        # against its limit (raising ProtocolError at the limit)
        self.admit: Callable[[], None] = lambda: None
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.frames: collections.deque[bytearray] = collections.deque()
        self.error: ProtocolError | None = None  # to raise once, after the queued frames
        self.closed_reason: str | None = None  # set once no more frames can arrive
        self._prefix = bytearray(4)
        self._body: bytearray | None = None  # None while reading the length prefix
        self._filled = 0
        self._discard: bytearray | None = None  # after a protocol error: read into this, drop
        self._reading_paused = False
        self._frame_waiter: asyncio.Future[None] | None = None
        self.last_frame_bytes = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._gathers = False  # whether transport.writelines gathers without copying; see write()

    # -- reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        self._gathers = type(transport).__module__.startswith("uvloop") or sys.version_info >= (3, 12)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keep_alive(sock)
        self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._discard is not None:
            return memoryview(self._discard)
        target = self._prefix if self._body is None else self._body
        return memoryview(target)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._discard is not None:
            return
        self._filled += nbytes
        if self._body is None:
            if self._filled < 4:
                return
            length = int.from_bytes(self._prefix, "big")
            if self.handshake_frame_bytes is not None and length > self.handshake_frame_bytes:
                self.fail(ProtocolError(f"frame of {length} bytes before the handshake exceeds the limit of "
                                        f"{self.handshake_frame_bytes}; a handshake comes first"))
                return
            if length > self.max_frame_bytes:
                self.fail(ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}"))
                return
            if length < 4:
                self.fail(ProtocolError(f"frame of {length} bytes is too short to hold a header length"))
                return
            self._body = bytearray(length)
            self._filled = 0
        elif self._filled == len(self._body):
            self.frames.append(self._body)
            self._body = None
            self._filled = 0
            self._frames_received += 1
            if self._handshake_frames is not None and self._frames_received >= self._handshake_frames:
                self.end_handshake()
            if len(self.frames) >= _MAX_QUEUED_FRAMES and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True
            self._wake_reader()

    def eof_received(self) -> bool:
        return False  # let the transport close itself; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed_reason is None:
            self.closed_reason = f"connection lost: {exc}" if exc else "peer closed the connection"
            if self._body is not None or self._filled:
                want = len(self._body) if self._body is not None else 4
                self.error = ProtocolError(f"peer closed mid-frame, after {self._filled} of {want} bytes")
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self.lost.set_result(None)

    async def receive(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Decode the next frame; at the end of the stream raise the pending
        ProtocolError once, then ConnectionClosed."""
        if self._frame_waiter is not None and not self._frame_waiter.done():
            raise RuntimeError("another task is already waiting in recv() on this connection")
        while True:
            while not self.frames:
                if self.error is not None:
                    error, self.error = self.error, None
                    raise error
                if self.closed_reason is not None:
                    raise ConnectionClosed(self.closed_reason)
                self._frame_waiter = asyncio.get_running_loop().create_future()
                await self._frame_waiter
            body = self.frames.popleft()
            self.last_frame_bytes = len(body) + 4
            if self._reading_paused and len(self.frames) < _MAX_QUEUED_FRAMES // 2:
                self._reading_paused = False
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.resume_reading()
            try:
                return decode_frame(body, max_tensor_bytes=self.max_frame_bytes)
            except ProtocolError as exc:
                self.fail(exc)

    def end_handshake(self) -> None:
        """The peer is accepted: frames up to max_frame_bytes from now on."""
        self.handshake_frame_bytes = None

    def end_handshake_after(self, frames: int) -> None:
        """The handshake takes the peer's first ``frames`` frames: the limit lifts as the last
        of them arrives, here, before a next frame in the same read is measured against it."""
        self._handshake_frames = frames
        if self._frames_received >= frames:
            self.end_handshake()

    def _wake_reader(self) -> None:
        if self._frame_waiter is not None and not self._frame_waiter.done():
            self._frame_waiter.set_result(None)

    def fail(self, error: ProtocolError) -> None:
        """Stop the connection on a protocol violation and tell the peer why.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the ERROR frame before the peer reads it. So this half-closes instead,
        drops whatever still arrives, and closes when the peer hangs up or after
        ``_LINGER_S``.
        """
        if self.closed_reason is None:
            self.error = error
            self.closed_reason = f"closed after a protocol error: {error}"
        self.frames.clear()
        self._body = None
        self._filled = 0
        transport = self.transport
        if transport is None or transport.is_closing() or self._discard is not None:
            return
        self._discard = bytearray(64 << 10)
        self.write(encode_frame({"type": MsgType.ERROR, "message": str(error)}))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def refuse(self, message: str) -> None:
        """Tell the peer why in an ERROR frame and close at once. For peers not yet accepted,
        which may be closed as fast as an attacker opens them: ``fail``'s linger would hold a
        socket and a buffer for each."""
        if self.closed_reason is None:
            self.error = ProtocolError(message)
            self.closed_reason = f"closed: {message}"
        self.frames.clear()
        self.write(encode_frame({"type": MsgType.ERROR, "message": message}))
        self.close()
        self._wake_reader()

    # -- writing

    def write(self, buffers: list[memoryview | bytes]) -> None:
        """Write buffers in order, without joining large ones into a copy.

        Where the transport's ``writelines`` hands the buffers to one gathering system
        call (uvloop's; asyncio's from Python 3.12) it takes them all: the peer then wakes
        once per frame, not once per tensor. Python 3.11's asyncio joins what
        ``writelines`` gets into one copy, so there small buffers are joined here and
        large ones written one call each.
        """
        if self.transport is None or self.transport.is_closing():
            return
        if self._gathers:
            self.transport.writelines(buffers)
            return
        small = bytearray()
        for buffer in buffers:
            if len(buffer) < _COALESCE_BYTES:
                small += buffer
                continue
            if small:
                self.transport.write(small)
                small = bytearray()
            self.transport.write(buffer)
        if small:
            self.transport.write(small)

    def pause_writing(self) -> None:
        self._drain_waiter = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._drain_waiter = None

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._drain_waiter is not None:
            await asyncio.shield(self._drain_waiter)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Connection:
    """A framed connection carrying msgpack headers and tensors; see ``send`` and ``recv``.

    Iterate with ``async for header, tensors in conn`` until the peer closes cleanly.
    """

    def __init__(self, protocol: _FrameProtocol, netem: NetEm | None = None) -> None:
        self._protocol = protocol
        self.bytes_sent = 0  # frame bytes handed to the transport (for metrics)
        self.bytes_received = 0
        self._sender = DelayedSender(protocol, netem) if netem is not None and netem.active else None

    @property
    def peername(self) -> Any:
        assert self._protocol.transport is not None
        return self._protocol.transport.get_extra_info("peername")

    @property
    def sockname(self) -> Any:
        """This end's address (the one a peer that dialed out is reached at, on its network)."""
        assert self._protocol.transport is not None
        return self._protocol.transport.get_extra_info("sockname")

    @property
    def closed(self) -> bool:
        """Whether close() was called or the connection has ended; send() then fails."""
        return self._protocol.closed_reason is not None

    async def send(self, msg: Mapping, tensors: Tensors | None = None) -> None:
        """Send one frame.

        Without a NetEm this writes at once and waits only while the socket's write
        buffer is full. With one, the frame is queued for its due time and this returns
        at once. Either way the connection may keep references to the tensors' memory
        until they are on the wire, so the caller must not modify them afterwards.
        """
        if self.closed:
            raise ConnectionClosed("send on a closed connection")
        buffers = encode_frame(msg, tensors)
        self.bytes_sent += sum(memoryview(b).nbytes for b in buffers)
        if self._sender is not None:
            await self._sender.put(buffers)
        else:
            self._protocol.write(buffers)
            await self._protocol.drain()

    async def recv(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Receive one frame as ``(header, tensors)``; tensors are views over its own buffer.

        Raises ProtocolError on a malformed, oversized or truncated frame, after which the
        connection is closed (the peer gets an ERROR frame saying why); ConnectionClosed
        once the connection has ended (and on every call after that).
        """
        header, tensors = await self._protocol.receive()
        self.bytes_received += self._protocol.last_frame_bytes
        return header, tensors

    def __aiter__(self) -> "Connection":
        return self

    async def __anext__(self) -> tuple[dict, dict[str, torch.Tensor]]:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Close after writing what was already sent (including frames a NetEm holds back)."""
        if self.closed:
            return
        self._protocol.closed_reason = "connection closed locally"
        if self._sender is not None:
            self._sender.close()
        else:
            self._protocol.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._protocol.lost)


async def open_connection(
    host: str,
    port: int,
    *,
    netem: NetEm | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    handshake_frame_bytes: int | None = HANDSHAKE_MAX_FRAME_BYTES,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> Connection:
    """Connect to ``host:port``; TimeoutError after ``timeout_s`` (an address that drops
    packets would otherwise hold the caller for the kernel's two minutes of SYN retries).

    As on a server, frames are limited to ``handshake_frame_bytes`` until ``client_handshake``
    has the server's answer (a server we have not authenticated could otherwise make us
    allocate ``max_frame_bytes`` with 4 bytes); pass None to a server that does no handshake.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):  # in this task: no extra loop pass before the caller's first send
            _, protocol = await loop.create_connection(
                lambda: _FrameProtocol(max_frame_bytes, lambda _: None, handshake_frame_bytes), host, port)
    except TimeoutError:
        raise TimeoutError(f"no answer from {host}:{port} within {timeout_s:g} s") from None
    return Connection(protocol, netem)
