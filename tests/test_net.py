"""Tests for glinthawk.net: codec, loopback connections, link emulation, handshake, parsers."""

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glinthawk.net import (
    KNOWN_TYPES,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    MsgType,
    NetEm,
    ProtocolError,
    client_handshake,
    decode_frame,
    encode_frame,
    install_event_loop_policy,
    open_connection,
    parse_bandwidth,
    parse_size,
    run,
    server_handshake,
    start_server,
)
from glinthawk.net.codec import DEFAULT_MAX_FRAME_BYTES, DTYPES
from glinthawk.net.connection import HANDSHAKE_MAX_FRAME_BYTES, KEEPALIVE_IDLE_S, KEEPALIVE_PROBES, _FrameProtocol

pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.timeout(30)]

HOST = "127.0.0.1"
MiB = 1 << 20


def frame_body(msg: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytearray:
    """Encode a frame and return its body (without the length prefix) as a bytearray."""
    return bytearray(b"".join(bytes(b) for b in encode_frame(msg, tensors))[4:])


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen, dtype=dtype)


def address_range(buf: bytearray) -> tuple[int, int]:
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    return start, start + len(buf)


# -- messages


def test_message_types() -> None:
    assert PROTOCOL_VERSION == 6
    assert MsgType.ATTN_OUT == "attn_out" and "attn_out" in KNOWN_TYPES
    names = {"HELLO", "WELCOME", "CAPACITY", "ATTN", "ATTN_OUT", "RELEASE", "SUBMIT", "RESULT"}
    assert names | {"ERROR", "PING", "PONG", "DRAIN", "DONE"} <= set(MsgType.__members__)
    assert len(KNOWN_TYPES) == len(MsgType)


# -- codec


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 3, 4), (0, 4), (4, 0, 2)])
def test_codec_roundtrip_dtypes_and_shapes(dtype_name: str, shape: tuple[int, ...]) -> None:
    tensor = sample(DTYPES[dtype_name], shape)
    header, tensors = decode_frame(frame_body({"type": "attn"}, {"t": tensor}), max_tensor_bytes=MiB)
    assert header == {"type": "attn"}
    out = tensors["t"]
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_codec_multiple_tensors_non_contiguous_and_fields() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    inputs = {
        "transposed": base.t(),
        "strided": torch.arange(20, dtype=torch.int64)[::3],
        "half": torch.randn(3, 7).to(torch.bfloat16),
        "flag": torch.tensor([True, False, True]),
    }
    assert not inputs["transposed"].is_contiguous()
    msg = {"type": "attn", "m": 7, "seq_ids": [1, 2, 3], "nested": {"a": [1.5, None, "x"]}, 3: b"raw"}
    header, tensors = decode_frame(frame_body(msg, inputs), max_tensor_bytes=MiB)
    assert header == msg
    assert list(tensors) == list(inputs)
    for name, tensor in inputs.items():
        assert torch.equal(tensors[name], tensor)


def test_codec_no_tensors() -> None:
    buffers = encode_frame({"type": "ping", "t": 1.25})
    assert len(buffers) == 1
    (length,) = struct.unpack(">I", buffers[0][:4])
    assert length == len(buffers[0]) - 4
    assert decode_frame(bytearray(buffers[0][4:]), max_tensor_bytes=0) == ({"type": "ping", "t": 1.25}, {})


def test_encode_does_not_copy_contiguous_tensors() -> None:
    tensor = torch.arange(1000, dtype=torch.float32)
    buffers = encode_frame({"type": "attn"}, {"x": tensor})
    view = buffers[-1]
    assert isinstance(view, memoryview) and view.nbytes == 4000
    assert torch.frombuffer(view, dtype=torch.uint8).data_ptr() == tensor.data_ptr()


def test_decode_shares_memory_with_the_buffer() -> None:
    body = frame_body({"type": "attn"}, {"a": torch.ones(3, 4), "b": torch.arange(5, dtype=torch.int16)})
    _, tensors = decode_frame(body, max_tensor_bytes=MiB)
    start, end = address_range(body)
    for tensor in tensors.values():
        assert start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= end
        assert tensor.data_ptr() % 16 == start % 16  # the encoder aligns payloads
    tensors["a"][0, 0] = 5.0  # writable, and writes land in the frame buffer
    assert decode_frame(body, max_tensor_bytes=MiB)[1]["a"][0, 0] == 5.0


def test_decode_of_readonly_bytes_gives_usable_tensors() -> None:
    body = bytes(frame_body({"type": "attn"}, {"a": torch.ones(2)}))
    _, tensors = decode_frame(body, max_tensor_bytes=MiB)  # no warning (warnings are errors here)
    tensors["a"] += 1
    assert tensors["a"].tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    ("msg", "tensors", "error"),
    [
        ({"kind": "attn"}, None, "str 'type'"),
        ({"type": "attn", "tensors": []}, None, "reserved"),
        ({"type": "attn"}, {"c": torch.zeros(2, dtype=torch.complex64)}, "unsupported dtype"),
        ({"type": "attn"}, {1: torch.zeros(2)}, "names must be str"),
    ],
)
def test_encode_rejects(msg: dict, tensors: dict | None, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        encode_frame(msg, tensors)


def raw_body(header: object, payload: bytes = b"") -> bytearray:
    packed = msgpack.packb(header)
    return bytearray(struct.pack(">I", len(packed)) + packed + payload)


def with_tensor(spec: list, payload: bytes = bytes(64)) -> bytearray:
    return raw_body({"type": "attn", "tensors": [spec]}, payload)


GOOD = frame_body({"type": "attn"}, {"t": torch.ones(4, 4)})


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (bytearray(b"\x00\x00"), "too short"),
        (GOOD[:-1], "beyond the payload"),
        (bytearray(struct.pack(">I", 100) + b"\x80"), "header length 100 exceeds"),
        (bytearray(struct.pack(">I", 1) + b"\xc1"), "undecodable header"),
        (bytearray(struct.pack(">I", 2) + b"\x81\xa1"), "undecodable header"),
        (bytearray(struct.pack(">I", 5) + b"\xdd\xff\xff\xff\xff"), "undecodable header"),  # 4G-entry array
        (raw_body([1, 2]), "not a map"),
        (raw_body({"seq": 1}), "no str 'type'"),
        (raw_body({"type": 5}), "no str 'type'"),
        (raw_body({"type": "attn", "tensors": {"t": 1}}), "not a list"),
        (with_tensor(["t", "float32", [2]]), "descriptor"),
        (with_tensor([7, "float32", [2], 0, 8]), "name"),
        (with_tensor(["t", "complex64", [2], 0, 16]), "unknown dtype"),
        (with_tensor(["t", "float32", [-1, 2], 0, 8]), "shape"),
        (with_tensor(["t", "float32", [2.0], 0, 8]), "shape"),
        (with_tensor(["t", "float32", [True], 0, 4]), "shape"),
        (with_tensor(["t", "float32", [2], -8, 8]), "offset"),
        (with_tensor(["t", "float32", [2], 0, 12]), "does not take 12 bytes"),
        (with_tensor(["t", "float32", [0, 2**62, 2**62], 0, 0]), "too large"),
        (with_tensor(["t", "float32", [4], 60, 16]), "beyond the payload"),
        (with_tensor(["t", "uint8", [2000], 0, 2000], bytes(2000)), "exceeds the limit"),
        (
            raw_body({"type": "attn", "tensors": [["t", "uint8", [1], 0, 1], ["t", "uint8", [1], 1, 1]]}, b"ab"),
            "repeated",
        ),
    ],
)
def test_decode_rejects(body: bytearray, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_frame(body, max_tensor_bytes=1024)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_decode_fuzz_raises_only_protocol_error(data: bytes, flips: list[tuple[int, int]]) -> None:
    mutated = bytearray(GOOD)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    for body in (bytearray(data), mutated):
        try:
            decode_frame(body, max_tensor_bytes=1024)
        except ProtocolError:
            pass


# -- connections over loopback


@contextlib.asynccontextmanager
async def serving(handler: Callable[[Connection], Awaitable[None]], **kwargs) -> AsyncIterator[int]:
    server = await start_server(handler, HOST, 0, **kwargs)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def echo(conn: Connection) -> None:
    async for header, tensors in conn:
        await conn.send(header, tensors)


async def roundtrip(port: int, **kwargs) -> None:
    """Connect, echo one frame with tensors, check it, close."""
    conn = await open_connection(HOST, port, **kwargs)
    try:
        await conn.send({"type": "ping", "n": 1}, {"x": torch.arange(6).reshape(2, 3)})
        header, tensors = await conn.recv()
        assert header == {"type": "ping", "n": 1}
        assert torch.equal(tensors["x"], torch.arange(6).reshape(2, 3))
    finally:
        conn.close()
        await conn.wait_closed()


async def read_raw_frames(reader: asyncio.StreamReader) -> list[dict]:
    """Read frames from a plain asyncio stream until EOF; return their headers."""
    headers = []
    while prefix := await reader.read(4):
        body = bytearray(await reader.readexactly(struct.unpack(">I", prefix)[0]))
        headers.append(decode_frame(body, max_tensor_bytes=0)[0])
    return headers


@pytest.mark.asyncio
async def test_send_recv_roundtrip() -> None:
    async with serving(echo, handshake_frame_bytes=None) as port:
        conn = await open_connection(HOST, port, handshake_frame_bytes=None)
        assert conn.peername[1] == port and not conn.closed
        big = torch.randn(1024, 1024)  # 4 MiB: many reads, and write flow control
        inputs = {"q": torch.randn(3, 4, 8).to(torch.float16), "big": big, "empty": torch.zeros(0, 4)}
        await conn.send({"type": MsgType.ATTN, "m": 1, "seq_ids": [4, 5, 6]}, inputs)
        await conn.send({"type": MsgType.PING})
        header, tensors = await conn.recv()
        assert header == {"type": "attn", "m": 1, "seq_ids": [4, 5, 6]}
        for name, tensor in inputs.items():
            assert torch.equal(tensors[name], tensor)
        assert await conn.recv() == ({"type": "ping"}, {})
        conn.close()
        assert conn.closed
        await conn.wait_closed()
        with pytest.raises(ConnectionClosed):
            await conn.recv()
        with pytest.raises(ConnectionClosed):
            await conn.send({"type": "ping"})


@pytest.mark.asyncio
async def test_async_for_ends_when_peer_closes() -> None:
    async def greet_and_leave(conn: Connection) -> None:
        for i in range(3):
            await conn.send({"type": "result", "i": i})

    async with serving(greet_and_leave) as port:
        conn = await open_connection(HOST, port)
        assert [header["i"] async for header, _ in conn] == [0, 1, 2]
        assert conn.closed


@pytest.mark.asyncio
async def test_many_unread_frames_pause_and_resume_reading() -> None:
    async def burst(conn: Connection) -> None:
        for i in range(300):  # far more than a connection queues before it stops reading
            await conn.send({"type": "result", "i": i}, {"x": torch.full((256,), i)})
        await conn.wait_closed()

    async with serving(burst) as port:
        conn = await open_connection(HOST, port)
        await asyncio.sleep(0.05)  # let frames pile up unread
        for i in range(300):
            header, tensors = await conn.recv()
            assert header["i"] == i and tensors["x"][0] == i
        conn.close()


def echo_recording_errors() -> tuple[Callable[[Connection], Awaitable[None]], asyncio.Future[BaseException]]:
    """An echo handler, and a future that gets the ProtocolError that ends it."""
    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(conn: Connection) -> None:
        try:
            await echo(conn)
        except ProtocolError as exc:
            outcome.set_result(exc)
            raise

    return handler, outcome


@pytest.mark.asyncio
async def test_oversized_frame_is_refused_and_server_keeps_serving() -> None:
    handler, outcome = echo_recording_errors()

    async with serving(handler, max_frame_bytes=64 * 1024) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(struct.pack(">I", 1 << 30) + b"\x00" * 16)  # claims 1 GiB, over the limit
        headers = await read_raw_frames(reader)  # the server tells why, then hangs up
        writer.close()
        assert headers[0]["type"] == MsgType.ERROR and "exceeds the limit" in headers[0]["message"]
        assert "exceeds the limit" in str(await outcome)
        await roundtrip(port)


@pytest.mark.asyncio
async def test_truncated_frame_is_an_error_and_server_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    handler, outcome = echo_recording_errors()

    async with serving(handler) as port:
        other = await open_connection(HOST, port)
        _, writer = await asyncio.open_connection(HOST, port)
        writer.write(struct.pack(">I", 1000) + b"\x00" * 10)  # promises 1000 bytes, sends 10
        await writer.drain()
        writer.close()
        assert "mid-frame" in str(await outcome)
        await other.send({"type": "ping"})
        assert (await other.recv())[0] == {"type": "ping"}
        other.close()
    assert any("mid-frame" in r.getMessage() for r in caplog.records if r.name == "glinthawk.net")


@pytest.mark.asyncio
async def test_bad_frame_closes_only_that_connection() -> None:
    async with serving(echo, max_frame_bytes=4096) as port:
        bad = await open_connection(HOST, port)
        good = await open_connection(HOST, port)
        await bad.send({"type": "attn"}, {"x": torch.zeros(2048)})  # 8 KiB frame, over 4 KiB
        header, _ = await bad.recv()
        assert header["type"] == MsgType.ERROR and "exceeds the limit" in header["message"]
        with pytest.raises(ConnectionClosed):
            await bad.recv()
        await good.send({"type": "ping"}, {"x": torch.zeros(16)})
        assert torch.equal((await good.recv())[1]["x"], torch.zeros(16))
        good.close()


@pytest.mark.asyncio
async def test_recv_rejects_malformed_frame_then_reports_closed() -> None:
    async def send_garbage(conn: Connection) -> None:
        conn._protocol.transport.write(struct.pack(">II", 6, 2) + b"\x81\xc1")
        await conn.wait_closed()

    async with serving(send_garbage) as port:
        conn = await open_connection(HOST, port)
        with pytest.raises(ProtocolError, match="undecodable header"):
            await conn.recv()
        assert conn.closed
        with pytest.raises(ConnectionClosed):
            await conn.recv()


@pytest.mark.asyncio
async def test_handler_exception_is_logged_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(conn: Connection) -> None:
        async for header, _ in conn:
            if header["type"] == "boom":
                raise RuntimeError("handler blew up")
            await conn.send(header)

    async with serving(handler) as port:
        doomed = await open_connection(HOST, port)
        survivor = await open_connection(HOST, port)
        await doomed.send({"type": "boom"})
        with pytest.raises(ConnectionClosed):
            await doomed.recv()
        await survivor.send({"type": "ping"})
        assert (await survivor.recv())[0] == {"type": "ping"}
        survivor.close()
    assert any(r.exc_info and "handler blew up" in str(r.exc_info[1]) for r in caplog.records)


@pytest.mark.asyncio
async def test_max_connections() -> None:
    """On a server without a handshake every connection counts against the cap from the start."""
    async with serving(echo, max_connections=2, handshake_frame_bytes=None) as port:
        first = await open_connection(HOST, port, handshake_frame_bytes=None)
        second = await open_connection(HOST, port, handshake_frame_bytes=None)
        for conn in (first, second):
            await conn.send({"type": "ping"})
            await conn.recv()
        third = await open_connection(HOST, port, handshake_frame_bytes=None)
        header, _ = await third.recv()
        assert header["type"] == MsgType.ERROR and "limit of 2" in header["message"]
        with pytest.raises(ConnectionClosed):
            await third.recv()
        first.close()
        for _ in range(100):  # the server notices the close asynchronously
            retry = await open_connection(HOST, port, handshake_frame_bytes=None)
            await retry.send({"type": "ping"})
            header, _ = await retry.recv()
            retry.close()
            if header["type"] == "ping":
                break
            await asyncio.sleep(0.01)
        assert header["type"] == "ping"
        second.close()


# -- link emulation


@pytest.mark.asyncio
async def test_delay_applies_to_each_direction() -> None:
    loop = asyncio.get_running_loop()
    async with serving(echo, netem=NetEm(delay_ms=30)) as port:
        conn = await open_connection(HOST, port, netem=NetEm(delay_ms=30))
        start = loop.time()
        await conn.send({"type": "ping"}, {"x": torch.ones(3)})
        header, tensors = await conn.recv()
        assert loop.time() - start >= 0.059
        assert header == {"type": "ping"} and torch.equal(tensors["x"], torch.ones(3))
        conn.close()
        await conn.wait_closed()


@pytest.mark.asyncio
async def test_jitter_preserves_order() -> None:
    async with serving(echo) as port:
        conn = await open_connection(HOST, port, netem=NetEm(delay_ms=3, jitter_ms=3))
        for i in range(50):
            await conn.send({"type": "attn", "i": i}, {"x": torch.full((4,), i)})
        for i in range(50):
            header, tensors = await conn.recv()
            assert header["i"] == i and tensors["x"].tolist() == [i] * 4
        conn.close()


@pytest.mark.asyncio
async def test_bandwidth_cap_serializes_frames() -> None:
    loop = asyncio.get_running_loop()
    async with serving(echo) as port:
        conn = await open_connection(HOST, port, netem=NetEm(bandwidth_bps=8e6))  # 1 MB/s
        start = loop.time()
        for _ in range(3):
            await conn.send({"type": "attn"}, {"x": torch.zeros(20_000, dtype=torch.uint8)})
        for _ in range(3):
            await conn.recv()
        assert loop.time() - start >= 0.06  # 60 kB at 1 MB/s
        conn.close()


@pytest.mark.asyncio
async def test_send_does_not_wait_for_the_delay() -> None:
    arrivals: list[str] = []
    both = asyncio.Event()

    async def record(conn: Connection) -> None:
        async for header, _ in conn:
            arrivals.append(header["tag"])
            if len(arrivals) == 2:
                both.set()

    async with serving(record) as port:
        slow = await open_connection(HOST, port, netem=NetEm(delay_ms=100))
        fast = await open_connection(HOST, port)
        await slow.send({"type": "ping", "tag": "slow"})
        await fast.send({"type": "ping", "tag": "fast"})  # sent after slow.send returned...
        await both.wait()
        assert arrivals == ["fast", "slow"]  # ...yet arrives first: slow.send did not wait
        slow.close()
        fast.close()


@pytest.mark.asyncio
async def test_close_flushes_delayed_frames() -> None:
    received: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

    async def collect(conn: Connection) -> None:
        received.set_result([header["i"] async for header, _ in conn])

    async with serving(collect) as port:
        conn = await open_connection(HOST, port, netem=NetEm(delay_ms=20))
        for i in range(5):
            await conn.send({"type": "ping", "i": i})
        conn.close()
        await conn.wait_closed()
        assert await received == [0, 1, 2, 3, 4]


# -- handshake


async def handshaking_server(conn: Connection) -> None:
    hello = await server_handshake(conn, {"tier2"}, lambda hello: {"node": "t2", "seen_kv": hello["kv"]})
    await conn.send({"type": MsgType.CAPACITY, "role": hello["role"]})
    await echo(conn)


@pytest.mark.asyncio
async def test_handshake_accepts_allowed_role() -> None:
    async with serving(handshaking_server) as port:
        conn = await open_connection(HOST, port)
        welcome = await client_handshake(conn, "tier2", {"kv": 1024})
        assert welcome == {"type": "welcome", "version": PROTOCOL_VERSION, "node": "t2", "seen_kv": 1024}
        assert (await conn.recv())[0] == {"type": "capacity", "role": "tier2"}
        conn.close()


@pytest.mark.asyncio
async def test_frames_after_the_handshake_may_be_large() -> None:
    async with serving(handshaking_server) as port:
        conn = await open_connection(HOST, port)
        await client_handshake(conn, "tier2", {"kv": 1})
        await conn.recv()
        big = torch.randn(MiB)  # 4 MiB, far over the limit before the handshake
        await conn.send({"type": MsgType.ATTN}, {"big": big})
        assert torch.equal((await conn.recv())[1]["big"], big)
        conn.close()


@pytest.mark.asyncio
async def test_a_huge_frame_before_the_handshake_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """Four bytes from a peer that has not introduced itself, claiming a frame of almost
    1 GiB, get it cut off with a reason (they used to make the server allocate it all)."""
    async with serving(handshaking_server) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(struct.pack(">I", DEFAULT_MAX_FRAME_BYTES - 1))
        headers = await read_raw_frames(reader)
        writer.close()
        assert headers[0]["type"] == MsgType.ERROR and "before the handshake" in headers[0]["message"]
        await roundtrip_after_handshake(port)
    assert any("before the handshake exceeds the limit" in r.getMessage() for r in caplog.records)


async def roundtrip_after_handshake(port: int) -> None:
    conn = await open_connection(HOST, port)
    await client_handshake(conn, "tier2", {"kv": 1})
    assert (await conn.recv())[0]["type"] == MsgType.CAPACITY
    conn.close()


def announced_buffer(protocol: _FrameProtocol, length: int) -> int:
    """Feed ``protocol`` a frame's length prefix; return the size of the buffer its next read goes to."""
    protocol.get_buffer(-1)[:4] = struct.pack(">I", length)
    protocol.buffer_updated(4)
    return len(protocol.get_buffer(-1))


@pytest.mark.asyncio
async def test_a_frame_buffer_is_allocated_within_the_handshake_limit() -> None:
    """A frame's buffer is allocated when its length prefix arrives: before the handshake,
    a prefix over the limit gets none; after it, a large frame gets its whole buffer at
    once (the socket reads straight into it)."""
    def fresh() -> _FrameProtocol:
        return _FrameProtocol(DEFAULT_MAX_FRAME_BYTES, lambda _: None, HANDSHAKE_MAX_FRAME_BYTES)

    refused = fresh()
    assert announced_buffer(refused, HANDSHAKE_MAX_FRAME_BYTES + 1) == 4  # still the prefix's own
    assert "before the handshake exceeds the limit" in str(refused.error)
    assert announced_buffer(fresh(), HANDSHAKE_MAX_FRAME_BYTES) == HANDSHAKE_MAX_FRAME_BYTES
    accepted = fresh()
    accepted.end_handshake()
    assert announced_buffer(accepted, 64 * MiB) == 64 * MiB


@pytest.mark.asyncio
async def test_a_huge_frame_from_a_server_before_its_welcome_is_refused() -> None:
    """The same limit on the client's side: a server that answers HELLO with four bytes
    claiming a frame of almost 1 GiB (anyone can pose as a Tier 2 node before it has
    authenticated) is refused, and no buffer of that size is allocated."""
    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(4)
            writer.write(struct.pack(">I", DEFAULT_MAX_FRAME_BYTES - 1))
            await writer.drain()
            await reader.read()  # until the client hangs up
        finally:
            writer.close()

    server = await asyncio.start_server(fake_server, HOST, 0)
    try:
        conn = await open_connection(HOST, server.sockets[0].getsockname()[1])
        with pytest.raises(ProtocolError, match="before the handshake exceeds the limit"):
            await client_handshake(conn, "tier1", {})
        assert conn._protocol._body is None  # no buffer for the frame it claimed
        conn.close()
        await conn.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("secret", [None, b"shared"])
async def test_a_large_frame_in_the_same_read_as_the_welcome_is_accepted(secret: bytes | None) -> None:
    """The client's limit lifts as the server's last handshake frame arrives (WELCOME, after a
    CHALLENGE with a secret), before a large frame sent right behind it is measured."""
    big = torch.randn(MiB)  # 4 MiB

    async def eager_server(conn: Connection) -> None:
        await server_handshake(conn, {"client"}, {}, secret=secret)
        await conn.send({"type": MsgType.RESULT}, {"big": big})  # no request awaited first
        await conn.wait_closed()

    async with serving(eager_server) as port:
        conn = await open_connection(HOST, port)
        await client_handshake(conn, "client", {}, secret=secret)
        header, tensors = await conn.recv()
        assert header["type"] == MsgType.RESULT and torch.equal(tensors["big"], big)
        conn.close()


@pytest.mark.asyncio
async def test_both_ends_probe_a_silent_peer() -> None:
    """TCP keepalive on both ends, so a peer whose host died is dropped (a Tier 2 node would
    otherwise refuse a restarted Tier 1 forever, its old owner's connection never closing)."""
    accepted: list[Connection] = []

    async def hold(conn: Connection) -> None:
        accepted.append(conn)
        await conn.wait_closed()

    async with serving(hold, handshake_frame_bytes=None) as port:
        conn = await open_connection(HOST, port, handshake_frame_bytes=None)
        while not accepted:
            await asyncio.sleep(0.01)
        for end in (conn, accepted[0]):
            sock = end._protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            if hasattr(socket, "TCP_KEEPIDLE"):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
        conn.close()


@pytest.mark.asyncio
async def test_connecting_to_an_address_that_drops_packets_times_out() -> None:
    """A listener whose accept queue is full drops new SYNs, as a dead host's firewall does:
    the connect gives up after its timeout, naming the address, instead of the kernel's two
    minutes of retries (Tier 1's reconnect loop tries its nodes one after another)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        with pytest.raises(TimeoutError, match=f"no answer from 127.0.0.1:{port} within 0.3 s"):
            await open_connection("127.0.0.1", port, timeout_s=0.3)
    finally:
        for sock in (*fillers, listener):
            sock.close()


async def test_handshake_refuses_disallowed_role() -> None:
    async with serving(handshaking_server) as port:
        conn = await open_connection(HOST, port)
        with pytest.raises(ProtocolError, match="role 'tier9' is not accepted"):
            await client_handshake(conn, "tier9", {"kv": 1})
        assert conn.closed


@pytest.mark.asyncio
async def test_handshake_refuses_version_mismatch() -> None:
    async with serving(handshaking_server) as port:
        conn = await open_connection(HOST, port)
        await conn.send({"type": MsgType.HELLO, "version": PROTOCOL_VERSION + 1, "role": "tier2", "kv": 1})
        header, _ = await conn.recv()
        assert header["type"] == MsgType.ERROR and "protocol version mismatch" in header["message"]
        with pytest.raises(ConnectionClosed):
            await conn.recv()


@pytest.mark.asyncio
async def test_client_handshake_checks_the_welcome() -> None:
    async def old_server(conn: Connection) -> None:
        await conn.recv()
        await conn.send({"type": MsgType.WELCOME, "version": 0})
        await conn.wait_closed()

    async with serving(old_server) as port:
        conn = await open_connection(HOST, port)
        with pytest.raises(ProtocolError, match="version 0"):
            await client_handshake(conn, "tier1", {})
        with pytest.raises(ValueError, match="may not set"):
            await client_handshake(conn, "tier1", {"role": "x"})


# -- event loops


def test_run_uses_uvloop_and_connections_work_on_it() -> None:
    async def main() -> str:
        async with serving(echo) as port:
            await roundtrip(port)
            await roundtrip(port, netem=NetEm(delay_ms=1, jitter_ms=1))
        return type(asyncio.get_running_loop()).__module__

    assert run(main()).startswith("uvloop")


class RecordingTransport:
    """Forwards to a real transport and records which write method got what."""

    def __init__(self, transport) -> None:
        self._transport, self.calls = transport, []

    def write(self, data) -> None:
        self.calls.append(("write", [len(data)]))
        self._transport.write(data)

    def writelines(self, buffers) -> None:
        self.calls.append(("writelines", [len(b) for b in buffers]))
        self._transport.writelines(buffers)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def test_a_frame_goes_to_uvloop_in_one_gathered_write() -> None:
    """On uvloop, a frame's header and tensors go to one writelines (one writev), so the
    peer is not woken for each tensor; the frame still arrives whole."""

    async def main() -> list:
        async with serving(echo, handshake_frame_bytes=None) as port:
            conn = await open_connection(HOST, port, handshake_frame_bytes=None)
            recorder = RecordingTransport(conn._protocol.transport)
            conn._protocol.transport = recorder
            tensors = {name: torch.randn(64, 12, 64).to(torch.bfloat16) for name in ("q", "k", "v")}
            await conn.send({"type": MsgType.ATTN, "layer": 3}, tensors)
            header, echoed = await conn.recv()
            assert header == {"type": "attn", "layer": 3}
            assert all(torch.equal(echoed[name], tensors[name]) for name in tensors)
            conn.close()
            await conn.wait_closed()
            return recorder.calls

    (call,) = run(main())
    assert call[0] == "writelines" and call[1][1:] == [64 * 12 * 64 * 2] * 3


@pytest.mark.parametrize(
    "scenario",
    [
        test_send_recv_roundtrip,
        test_oversized_frame_is_refused_and_server_keeps_serving,
        test_bad_frame_closes_only_that_connection,
        test_max_connections,
        test_jitter_preserves_order,
    ],
)
def test_scenarios_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    run(scenario())


def test_install_event_loop_policy() -> None:
    previous = asyncio.get_event_loop_policy()
    try:
        assert install_event_loop_policy()
        assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(previous)


# -- parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("1000000", 1_000_000),
        ("1.5GB", 1_500_000_000),
        ("4k", 4096),
        ("2G", 2 << 30),
        (" 10 kib ", 10240),
        ("64B", 64),
        (123, 123),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "8XB", "8 G B", "1,5GB", -3, None, True, 1.5])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100Mbit", 100e6),
        ("1Gbit", 1e9),
        ("1gbit/s", 1e9),
        ("10Mbps", 10e6),
        ("50MB/s", 400e6),
        ("1MiB/s", 8 * 2**20),
        ("2500", 2500.0),
        (1e9, 1e9),
    ],
)
def test_parse_bandwidth(text: str | float, expected: float) -> None:
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "10Mb", "0", "0Mbit", "-5Mbit", "10 Mbit/h", 0, float("inf"), None])
def test_parse_bandwidth_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_bandwidth(text)  # type: ignore[arg-type]


def test_netem_validates() -> None:
    assert not NetEm().active and NetEm(jitter_ms=1).active and NetEm(bandwidth_bps=1e6).active
    for bad in (dict(delay_ms=-1), dict(jitter_ms=float("nan")), dict(bandwidth_bps=0)):
        with pytest.raises(ValueError):
            NetEm(**bad)
