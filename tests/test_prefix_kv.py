"""Shared prefixes in the Tier 2 KV store: a sequence reserved on another one's slab reads
that prefix (stored once) and writes only its own rows; attention over the two slabs equals
attention over one slab holding the same tokens."""

from __future__ import annotations

import pytest
import torch

from glinthawk.compute.attention import attend
from glinthawk.compute.kvcache import KVCapacityError, KVStore, UnknownSequenceError

LAYERS, KV_HEADS, HEADS, DIM = 2, 2, 4, 8


def new_store(capacity: int = 256, dtype=torch.float32, kv_dtype=None) -> KVStore:
    return KVStore(LAYERS, KV_HEADS, DIM, capacity, dtype=dtype, kv_dtype=kv_dtype)


def qkv(n: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HEADS, DIM, generator=g).to(dtype), torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype),
            torch.randn(n, KV_HEADS, DIM, generator=g).to(dtype))


def step(store: KVStore, batch: list[tuple[object, int, int, int]], dtype=torch.float32) -> list[torch.Tensor]:
    """Attend one step on every layer: batch = (seq id, start, count, seed); outputs per layer."""
    ids, starts, counts, seeds = zip(*batch)
    outs = []
    for layer in range(LAYERS):
        parts = [qkv(count, seed * 10 + layer, dtype) for count, seed in zip(counts, seeds)]
        q, k, v = (torch.cat([p[i] for p in parts]) for i in range(3))
        outs.append(attend(store, layer, list(ids), list(starts), list(counts), q, k, v))
    return outs


def test_prefix_is_held_once_and_freed_with_its_last_user():
    store = new_store(64)
    store.reserve("p", 10)
    with pytest.raises(ValueError, match="not a whole written sequence"):
        store.reserve("a", 5, prefix="p")  # nothing of the prefix written yet
    step(store, [("p", 0, 10, 1)])
    store.reserve("a", 5, prefix="p")
    store.reserve("b", 7, prefix="p")
    assert store.used_tokens == 22 and store.prefix_of("a") == "p" and store.shares("b") and not store.shares("p")
    with pytest.raises(ValueError, match="not a whole written sequence"):
        store.reserve("c", 3, prefix="a")  # no prefix of a prefix
    with pytest.raises(KVCapacityError, match="exceed"):
        store.rows(["a"], [9], [1])  # a follower never writes the prefix's rows
    with pytest.raises(KVCapacityError, match="read-only"):
        store.rows(["p"], [9], [1])
    store.free("p")  # still read by a and b: it stays, but is gone as a sequence of its own
    assert "p" not in store and store.used_tokens == 22
    with pytest.raises(UnknownSequenceError):
        store.free("p")
    store.free("a")
    assert store.used_tokens == 17
    store.free("b")
    assert store.used_tokens == 0 and store.num_sequences == 0


@pytest.mark.parametrize("dtype,kv_dtype,tolerance", [
    (torch.float32, None, 1e-5), (torch.bfloat16, None, 2e-2), (torch.float32, torch.int8, 1e-5)])
def test_attention_on_a_prefix_equals_one_slab(attention_path, dtype, kv_dtype, tolerance):
    """Followers of a 12-token prefix vs the same tokens in slabs of their own, through a
    prefill of their suffixes and decode steps, beside a sequence with no prefix."""
    shared, alone = new_store(dtype=dtype, kv_dtype=kv_dtype), new_store(dtype=dtype, kv_dtype=kv_dtype)
    prefix, suffixes, steps = 12, {"a": 3, "b": 5, "c": 1}, 4
    shared.reserve("p", prefix)
    step(shared, [("p", 0, prefix, 7)], dtype)
    for seq, suffix in suffixes.items():
        shared.reserve(seq, suffix + steps, prefix="p")
        alone.reserve(seq, prefix + suffix + steps)
        step(alone, [(seq, 0, prefix, 7)], dtype)  # the same prefix tokens, in its own slab
    for s in (shared, alone):
        s.reserve("plain", 20)
    first = [(seq, prefix, suffix, ord(seq)) for seq, suffix in suffixes.items()] + [("plain", 0, 6, 3)]
    for got, want in zip(step(shared, first, dtype), step(alone, first, dtype)):
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)
    for n in range(steps - 1):
        batch = [(seq, prefix + suffix + n, 1, 100 * n + ord(seq)) for seq, suffix in suffixes.items()]
        batch.append(("plain", 6 + n, 1, 50 + n))
        for got, want in zip(step(shared, batch, dtype), step(alone, batch, dtype)):
            torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


def test_compaction_moves_a_prefix_and_its_readers():
    store = new_store(40)
    store.reserve("gap", 8)
    store.reserve("p", 6)
    step(store, [("p", 0, 6, 2)])
    store.reserve("a", 4, prefix="p")
    step(store, [("a", 6, 2, 3)])
    before = [store.view(layer, "a", 8) for layer in range(LAYERS)]
    store.free("gap")
    store.reserve("big", 30)  # only fits once the slabs move together
    assert store.compactions == 1
    for layer, (keys, values) in enumerate(before):
        got_keys, got_values = store.view(layer, "a", 8)
        assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
