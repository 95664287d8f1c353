"""Authentication, bind policy, handshake timeouts, and fuzzing each daemon role."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glinthawk.client import submit
from glinthawk.compute.attention import attend
from glinthawk.compute.kvcache import KVStore
from glinthawk.net.codec import ProtocolError, encode_frame
from glinthawk.net.connection import open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.server import server_handshake, start_server
from glinthawk.net.messages import PROTOCOL_VERSION
from glinthawk.net.messages import MsgType
from glinthawk.node.cli import main as node_main
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results

FUZZ_EXAMPLES = int(os.environ.get("GLINTHAWK_FUZZ_EXAMPLES", "100"))
FRAMES_PER_EXAMPLE = 40
FULL_FUZZ_EXAMPLES = 10_000 // FRAMES_PER_EXAMPLE  # the slow-marked run: 10,000 frames per role


# -- authentication ------------------------------------------------------------------------
async def _handshake(server_secret: bytes | None, client_secret: bytes | None):
    outcome: dict = {}

    async def serve(conn):
        try:
            outcome["hello"] = await server_handshake(conn, {"client"}, {"ok": 1}, secret=server_secret)
        except ProtocolError as exc:
            outcome["server_error"] = str(exc)

    server = await start_server(serve, "127.0.0.1", 0)
    conn = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        outcome["welcome"] = await client_handshake(conn, "client", {}, secret=client_secret)
    except ProtocolError as exc:
        outcome["client_error"] = str(exc)
    finally:
        conn.close()
        await asyncio.sleep(0.05)
        server.close()
    return outcome


async def test_right_secret_is_accepted():
    outcome = await _handshake(b"s3cret", b"s3cret")
    assert outcome["welcome"]["ok"] == 1 and "hello" in outcome


async def test_wrong_secret_is_refused():
    outcome = await _handshake(b"s3cret", b"guess")
    assert "differs" in outcome["client_error"]  # the server's proof does not check out with our secret
    assert "welcome" not in outcome and "hello" not in outcome


async def test_missing_secret_is_refused_before_anything_else_is_read():
    outcome = await _handshake(b"s3cret", None)
    assert "requires a shared secret" in outcome["client_error"]
    assert "hello" not in outcome


async def test_client_with_secret_refuses_an_unauthenticated_server():
    outcome = await _handshake(None, b"s3cret")
    assert "did not authenticate" in outcome["client_error"]


async def test_forged_client_proof_is_refused():
    """A peer that skips the HMAC (sends junk as proof) gets an ERROR and is cut off."""
    outcome: dict = {}

    async def serve(conn):
        try:
            await server_handshake(conn, {"client"}, {}, secret=b"s3cret")
        except ProtocolError as exc:
            outcome["server_error"] = str(exc)

    server = await start_server(serve, "127.0.0.1", 0)
    conn = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    await conn.send({"type": MsgType.HELLO, "version": PROTOCOL_VERSION, "role": "client", "nonce": b"x" * 32})
    challenge, _ = await conn.recv()
    assert challenge["type"] == MsgType.CHALLENGE
    await conn.send({"type": MsgType.AUTH, "proof": b"\0" * 32})
    reply, _ = await conn.recv()
    assert reply["type"] == MsgType.ERROR and "authentication failed" in reply["message"]
    conn.close()
    server.close()
    assert "authentication failed" in outcome["server_error"]


async def test_silent_peer_is_timed_out_in_the_handshake():
    outcome: dict = {}

    async def serve(conn):
        try:
            await server_handshake(conn, {"client"}, {}, timeout_s=0.3)
        except ProtocolError as exc:
            outcome["error"] = str(exc)

    server = await start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    assert await asyncio.wait_for(reader.read(), timeout=10) is not None  # the server closes on us
    writer.close()
    server.close()
    assert "no HELLO within" in outcome["error"]


def test_non_loopback_bind_without_secret_is_refused():
    result = CliRunner().invoke(node_main, ["--role", "tier2", "--listen", "0.0.0.0:0", "--kv-tokens", "16"])
    assert result.exit_code != 0 and "no shared secret" in result.output


def test_secret_stays_out_of_ps_and_logs(tmp_path):
    secret = "do-not-print-this-7f3a"
    (tmp_path / "secret").write_text(secret)
    ready = tmp_path / "addr"
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        node = subprocess.Popen([sys.executable, "-m", "glinthawk.node", "--role", "tier2", "--kv-tokens", "64",
                                 "--listen", "127.0.0.1:0", "--secret-file", str(tmp_path / "secret"),
                                 "--ready-file", str(ready), "--log-level", "debug"], stdout=out, stderr=out)
    try:
        for _ in range(600):
            if ready.exists():
                break
            assert node.poll() is None
            asyncio.run(asyncio.sleep(0.05))
        cmdline = Path(f"/proc/{node.pid}/cmdline").read_bytes().decode()
        assert secret not in cmdline

        async def wrong_peer():
            host, port = ready.read_text().strip().rsplit(":", 1)
            conn = await open_connection(host, int(port))
            with pytest.raises(ProtocolError):
                await client_handshake(conn, "tier1", {}, secret=b"wrong")

        asyncio.run(wrong_peer())
    finally:
        node.terminate()
        node.wait(30)
    assert secret not in log.read_text()


# -- fuzzing -------------------------------------------------------------------------------
def _valid_frames(role: str) -> list[bytes]:
    """Well-formed frames of the kinds a daemon of ``role`` reads, to mutate."""
    q = torch.randn(2, 4, 16)
    kv = torch.randn(2, 2, 16)
    frames = [
        {"type": "hello", "version": PROTOCOL_VERSION, "role": role, "nonce": b"n" * 32, "num_layers": 2, "num_kv_heads": 2,
         "head_dim": 16, "dtype": "float32"},
        {"type": "ping"},
        {"type": "release", "seqs": [1, 2]},
        {"type": "submit", "lines": [[1, b'{"prompt": "hi", "max_tokens": 2}']]},
        {"type": "done"},
    ]
    out = [b"".join(bytes(b) for b in encode_frame(f)) for f in frames]
    attn = {"type": "attn", "mb": 1, "layer": 0, "seqs": [[7, 0, 2]], "reserve": [[7, 8]]}
    later_layer = {"type": "attn", "mb": 1, "layer": 1}  # reuses the step's plan
    out += [b"".join(bytes(b) for b in encode_frame(frame, {"q": q, "k": kv, "v": kv})) for frame in (attn, later_layer)]
    return out


def _mutate(rnd: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rnd.randint(1, 6)):
        choice = rnd.random()
        if choice < 0.5 and data:
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif choice < 0.7 and len(data) > 8:
            del data[rnd.randrange(4, len(data)):]  # truncate (keeps the declared length: a short frame)
        elif choice < 0.85:
            data += rnd.randbytes(rnd.randint(1, 16))
        else:  # lie about the length
            struct.pack_into(">I", data, 0, rnd.choice([0, 1, 7, len(data), 2**31, 2**32 - 1]))
    return bytes(data)


def _random_frame(rnd: random.Random, valid: list[bytes]) -> bytes:
    kind = rnd.random()
    if kind < 0.3:
        body = rnd.randbytes(rnd.randint(0, 64))
        return struct.pack(">I", len(body)) + body
    if kind < 0.5:
        header = msgpack.packb({"type": rnd.choice(["attn", "submit", "hello", "x", 3, None]),
                                "seqs": rnd.choice([[[1, 2, 3]], "x", [None], []]),
                                "lines": rnd.choice([[[1, None]], [[1, 2]], "zz", [[b"a", b"b"]]])})
        body = struct.pack(">I", len(header)) + header
        return struct.pack(">I", len(body)) + body
    return _mutate(rnd, rnd.choice(valid))


async def _throw_frames(port: int, frames: list[bytes]) -> None:
    """Write the frames over as few connections as the server allows, reconnecting when it hangs up."""
    i = 0
    while i < len(frames):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        try:
            for _ in range(8):  # a few frames per connection: later ones exercise post-handshake paths
                if i >= len(frames):
                    break
                writer.write(frames[i])
                i += 1
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def _fuzz_role(port: int, role: str, examples: int) -> int:
    valid = _valid_frames(role)
    thrown = 0

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.integers(min_value=0, max_value=2**32 - 1))
    def one_example(seed):
        nonlocal thrown
        rnd = random.Random(seed)
        frames = [_random_frame(rnd, valid) for _ in range(FRAMES_PER_EXAMPLE)]
        loop.run_until_complete(_throw_frames(port, frames))
        thrown += len(frames)

    loop = asyncio.new_event_loop()
    try:
        await asyncio.to_thread(lambda: one_example())
    finally:
        loop.close()
    return thrown


@pytest.mark.parametrize("examples", [FUZZ_EXAMPLES, pytest.param(FULL_FUZZ_EXAMPLES, marks=pytest.mark.slow)])
async def test_fuzz_tier2_stays_up_and_serves(checkpoint, examples):
    node = Tier2Node(kv_tokens=512)
    port = await node.start("127.0.0.1", 0)
    try:
        thrown = await _fuzz_role(port, "tier1", examples)
        assert thrown >= examples * FRAMES_PER_EXAMPLE
        await asyncio.sleep(0.2)  # let the last fuzz connection go away
        # A real Tier 1 conversation afterwards: attention must match an in-process store.
        conn = await open_connection("127.0.0.1", port)
        await client_handshake(conn, "tier1", {"num_layers": 1, "num_kv_heads": 2, "head_dim": 16,
                                               "dtype": "float32"})
        q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
        await conn.send({"type": "attn", "mb": 5, "layer": 0, "seqs": [[1, 0, 3]], "reserve": [[1, 8]]},
                        {"q": q, "k": k, "v": v})
        while True:
            header, tensors = await conn.recv()
            if header["type"] == MsgType.ATTN_OUT:
                break
        store = KVStore(1, 2, 16, 8)
        store.reserve(1, 8)
        assert torch.allclose(tensors["out"], attend(store, 0, [1], [0], [3], q, k, v), atol=1e-6)
        conn.close()
    finally:
        await node.close()


@pytest.mark.parametrize("examples", [FUZZ_EXAMPLES, pytest.param(FULL_FUZZ_EXAMPLES, marks=pytest.mark.slow)])
async def test_fuzz_tier1_stays_up_and_serves(checkpoint, tmp_path, examples):
    model, tokenizer = checkpoint
    tier2 = Tier2Node(kv_tokens=1024)
    tier2_port = await tier2.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{tier2_port}"], micro_batches=1)
    try:
        port = await tier1.start("127.0.0.1", 0)
        thrown = await _fuzz_role(port, "client", examples)
        assert thrown >= examples * FRAMES_PER_EXAMPLE
        requests = tmp_path / "in.jsonl"
        requests.write_text(json.dumps({"custom_id": "real", "prompt": "The quick", "max_tokens": 4,
                                        "temperature": 0}) + "\n")
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl",
                                                progress=False), timeout=120)
        assert summary.done == 1 and read_results(tmp_path / "out.jsonl")["real"]["completion_tokens"] == 4
    finally:
        await tier1.close()
        await tier2.close()
