"""The Tier 2 node over the wire: a step is planned from its first frame, for all its layers."""

from __future__ import annotations

import threading

import pytest
import torch

from glinthawk.compute.attention import attend
from glinthawk.compute.kvcache import KVStore
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.messages import MsgType
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

LAYERS, HEADS, KV_HEADS, DIM = 2, 2, 1, 8


def qkv(tokens: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(tokens, HEADS, DIM, generator=g), "k": torch.randn(tokens, KV_HEADS, DIM, generator=g),
            "v": torch.randn(tokens, KV_HEADS, DIM, generator=g)}


async def connect(node: Tier2Node, port: int):
    conn = await open_connection("127.0.0.1", port)
    await client_handshake(conn, "tier1", {"num_layers": LAYERS, "num_kv_heads": KV_HEADS, "head_dim": DIM,
                                           "dtype": "float32"})
    return conn


async def attn(conn, tensors: dict[str, torch.Tensor], **fields) -> tuple[dict, dict]:
    await conn.send({"type": MsgType.ATTN, **fields}, tensors)
    return await conn.recv()


async def test_later_layers_reuse_the_steps_plan_even_after_a_compaction():
    """Only a step's first frame lists its sequences. Another micro-batch's reservation that
    compacts the store mid-step moves this one's slab: its later layers must follow it."""
    node = Tier2Node(kv_tokens=24)
    port = await node.start("127.0.0.1", 0)
    reference = KVStore(LAYERS, KV_HEADS, DIM, 8)
    reference.reserve(11, 8)
    try:
        conn = await connect(node, port)
        header, _ = await attn(conn, qkv(1, seed=0), mb=2, layer=0, seqs=[[10, 0, 1]], reserve=[[10, 8]])
        assert header["type"] == MsgType.ATTN_OUT
        prompt = qkv(5, seed=1)
        header, out = await attn(conn, prompt, mb=1, layer=0, seqs=[[11, 0, 5]], reserve=[[11, 8]])
        assert torch.allclose(out["out"], attend(reference, 0, [11], [0], [5], **prompt), atol=1e-5)
        await conn.send({"type": MsgType.RELEASE, "seqs": [10]})
        # 8 free tokens at the front, 8 at the end: 10 more need a compaction, which moves sequence 11.
        header, _ = await attn(conn, qkv(1, seed=2), mb=3, layer=0, seqs=[[12, 0, 1]], reserve=[[12, 10]])
        assert header["type"] == MsgType.ATTN_OUT and node.store.compactions == 1
        header, out = await attn(conn, prompt, mb=1, layer=1)
        assert header["type"] == MsgType.ATTN_OUT
        assert torch.allclose(out["out"], attend(reference, 1, [11], [0], [5], **prompt), atol=1e-5)
        decode = qkv(1, seed=3)  # the next step: one token each layer, over what the prompt wrote
        for layer in range(LAYERS):
            fields = {"seqs": [[11, 5, 1]]} if layer == 0 else {}
            header, out = await attn(conn, decode, mb=1, layer=layer, **fields)
            assert torch.allclose(out["out"], attend(reference, layer, [11], [5], [1], **decode), atol=1e-5)
        conn.close()
    finally:
        await node.close()


async def test_a_frame_without_seqs_and_no_step_to_reuse_gets_an_error():
    node = Tier2Node(kv_tokens=16)
    port = await node.start("127.0.0.1", 0)
    try:
        conn = await connect(node, port)
        header, _ = await attn(conn, qkv(1, seed=0), mb=9, layer=1)
        assert header["type"] == MsgType.ERROR and header["mb"] == 9
        assert "micro-batch 9" in header["message"] and "seqs" in header["message"]
        # A step whose first frame fails (its reservation does not fit) leaves no plan behind.
        header, _ = await attn(conn, qkv(1, seed=0), mb=4, layer=0, seqs=[[1, 0, 1]], reserve=[[1, 99]])
        assert header["type"] == MsgType.ERROR and "KV store full" in header["message"]
        header, _ = await attn(conn, qkv(1, seed=0), mb=4, layer=1)
        assert header["type"] == MsgType.ERROR and "micro-batch 4" in header["message"]
        header, _ = await attn(conn, qkv(1, seed=0), mb=4, layer=0, seqs=[[1, 0, 1]], reserve=[[1, 4]])
        assert header["type"] == MsgType.ATTN_OUT  # the node goes on serving
        conn.close()
    finally:
        await node.close()


async def test_frames_are_attended_in_order_on_the_event_loops_thread():
    """Frames sent back to back, a RELEASE among them, are attended one after another on
    the event loop's thread (the one thread that touches torch) and answered in order."""
    node = Tier2Node(kv_tokens=32)
    computed: list[tuple[object, int]] = []
    compute = node._compute
    node._compute = lambda session, header, tensors: computed.append((header["mb"], threading.get_ident())) or compute(
        session, header, tensors)
    port = await node.start("127.0.0.1", 0)
    reference = KVStore(LAYERS, KV_HEADS, DIM, 32)
    try:
        conn = await connect(node, port)
        first, second, third = qkv(3, seed=1), qkv(2, seed=2), qkv(4, seed=3)
        await conn.send({"type": MsgType.ATTN, "mb": 1, "layer": 0, "seqs": [[1, 0, 3]], "reserve": [[1, 8]]}, first)
        await conn.send({"type": MsgType.RELEASE, "seqs": [1]})
        await conn.send({"type": MsgType.ATTN, "mb": 2, "layer": 0, "seqs": [[2, 0, 2]], "reserve": [[2, 8]]}, second)
        await conn.send({"type": MsgType.ATTN, "mb": 2, "layer": 1}, second)
        await conn.send({"type": MsgType.ATTN, "mb": 3, "layer": 0, "seqs": [[3, 0, 4]], "reserve": [[3, 8]]}, third)
        answers = [await conn.recv() for _ in range(4)]
        reference.reserve(1, 8)
        expected = [attend(reference, 0, [1], [0], [3], **first)]
        reference.free(1)
        reference.reserve(2, 8)
        expected += [attend(reference, layer, [2], [0], [2], **second) for layer in range(LAYERS)]
        reference.reserve(3, 8)
        expected.append(attend(reference, 0, [3], [0], [4], **third))
        assert [(h["type"], h["mb"]) for h, _ in answers] == [(MsgType.ATTN_OUT, mb) for mb in (1, 2, 2, 3)]
        for (_, out), want in zip(answers, expected):
            assert torch.allclose(out["out"], want, atol=1e-5)
        assert computed == [(mb, threading.get_ident()) for mb in (1, 2, 2, 3)]
        assert 1 not in node.store and 2 in node.store
        conn.close()
    finally:
        await node.close()


@pytest.mark.parametrize("kv_memory,reason", [(100, "holds no token of 128 B"),
                                              (1 << 60, "cannot allocate a KV store")])
async def test_a_kv_memory_that_fits_no_store_is_told_to_tier1(kv_memory, reason):
    """The node sizes its store from Tier 1's HELLO; when that fails, Tier 1 hears why (it used to
    see the connection close, and the reason was only in the node's own log)."""
    node = Tier2Node(kv_memory=kv_memory)
    port = await node.start("127.0.0.1", 0)
    try:
        with pytest.raises(ProtocolError, match=f"server refused the handshake: .*{reason}"):
            await connect(node, port)
    finally:
        await node.close()


async def test_tier1_reports_why_no_tier2_node_is_usable(checkpoint):
    model, tokenizer = checkpoint
    node = Tier2Node(kv_memory=1)
    port = await node.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{port}"], micro_batches=1)
    try:
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}: server refused the handshake: --kv-memory 1 B "
                                                  "holds no token"):
            await tier1.start("127.0.0.1", 0)
    finally:
        await tier1.close()
        await node.close()


@pytest.mark.parametrize("tier1_secret,tier2_secret", [(b"one", b"two"), (None, b"two"), (b"one", None)])
async def test_tier1_says_the_secrets_differ_when_they_do(checkpoint, tier1_secret, tier2_secret):
    """The hint used to be "start any that are not running", for a node that was running but held another
    secret (or none)."""
    model, tokenizer = checkpoint
    node = Tier2Node(kv_tokens=1024, secret=tier2_secret)
    port = await node.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{port}"], micro_batches=1, secret=tier1_secret)
    try:
        with pytest.raises(ConnectionError) as info:
            await tier1.start("127.0.0.1", 0)
    finally:
        await tier1.close()
        await node.close()
    assert "the shared secrets differ" in str(info.value) and "not running" not in str(info.value)


async def test_tier1_says_start_the_nodes_when_none_answers(checkpoint):
    model, tokenizer = checkpoint
    tier1 = Tier1Node(model, tokenizer, ["127.0.0.1:1"], micro_batches=1)
    try:
        with pytest.raises(ConnectionError, match="start any that are not running"):
            await tier1.start("127.0.0.1", 0)
    finally:
        await tier1.close()
