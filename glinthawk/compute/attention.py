"""Attention over the KV store for a ragged batch (the Tier 2 computation): the plan and
the dispatch to the C-kernel paths (``attention_kernels``) and the torch paths
(``attention_torch``); the thread policy they share is in ``thread_policy``.

A batch packs the new tokens of several sequences: sequence i brings ``counts[i]`` tokens
(1 for decode, more for a prefill chunk) at positions ``starts[i]..starts[i]+counts[i]``.
Each appends its k/v to the store, then attends causally over its own cached past.

GQA without repeating K/V: the ``group`` query heads that share a KV head are folded into
the query-row dimension, so one pass over each KV head's cache serves them all.

Decode rows go to the fused C kernel where it serves the store, else to torch ops. Prompt
chunks: short fresh prompts are attended together as one padded batch (their keys are their
own new tokens); longer ones and later chunks go one at a time, to the bf16 prefill kernel
where the CPU has AVX512_BF16, else to SDPA. Decodes of sequences on a shared prefix go
together by prefix (``attention_shared``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from glinthawk.compute import attention_kernels, attention_shared, attention_torch, thread_policy
from glinthawk.compute.attention_kernels import FusedDecodes
from glinthawk.compute.attention_shared import SharedDecodes
from glinthawk.compute.attention_torch import BatchedDecodes, BatchedPrefills
from glinthawk.compute.kvcache import KVStore

# On the torch path (no C kernel), CPU decode sequences whose context is at most this long
# are attended together, their K/V gathered into one padded batch: a few large ops instead
# of a few small ones per sequence. Longer contexts are bandwidth-bound, where the gather's
# extra copy would cost more than the per-sequence call overhead it saves. On CUDA every
# decode is batched: there a launch costs more than the gather.
BATCHED_DECODE_MAX_CONTEXT = 512

# Fresh prompts (nothing cached before them) of at most this many tokens are attended
# together, padded into one batch whose keys are their own new tokens: one call per
# short prompt costs more than its math; above 64 tokens the per-prompt C kernel wins.
# Prompts of one length in consecutive rows (a batch of equal prompts) are attended where
# they lie, without the gather (measured in docs/PERFORMANCE.md).
BATCHED_PREFILL_MAX_TOKENS = 64


@dataclass(frozen=True)
class AttentionPlan:
    """Where a batch's tokens sit in the store and how its sequences are grouped, worked out
    once per step and reused by every layer's ``attend_with``: the index tensors (on the
    store's device, so a CUDA step copies them once, not once per layer) and the thread split.
    Making one ``claim``s the batch's rows: checked against each reservation."""

    store: KVStore
    seq_ids: Sequence[object]
    starts: Sequence[int]
    counts: Sequence[int]
    first_rows: list[int]  # each sequence's first row in the batch
    write_rows: torch.Tensor | None  # store rows of the new K/V; None where the decode kernel appends them
    fused: FusedDecodes | None
    batched: BatchedDecodes | None
    batched_prefills: BatchedPrefills | None
    prefills: list[int]  # other sequences with a prompt chunk, attended one at a time
    long_decodes: list[int]  # torch path: decodes attended one at a time, over threads
    shared: list[SharedDecodes]  # decodes on a shared prefix, by prefix
    layout: int  # the store's compaction count when planned: a compaction moves the slabs the plan points at

    @property
    def tokens(self) -> int:
        return self.first_rows[-1] + self.counts[-1] if self.counts else 0

    @property
    def stale(self) -> bool:
        """Whether the store has compacted (moved its slabs) since this plan was made."""
        return self.store.compactions != self.layout

    def replanned(self) -> AttentionPlan:
        """The same batch planned again over the store as it is now (after a compaction)."""
        return AttentionPlan.of(self.store, self.seq_ids, self.starts, self.counts)

    @classmethod
    def of(cls, store: KVStore, seq_ids: Sequence[object], starts: Sequence[int],
           counts: Sequence[int]) -> AttentionPlan:
        first_rows = list(itertools.accumulate(counts[:-1], initial=0)) if counts else []
        on_prefix = {i for i, seq_id in enumerate(seq_ids) if store.shares(seq_id)}
        decodes = [i for i, count in enumerate(counts) if count == 1 and i not in on_prefix]
        shared_decodes = [i for i, count in enumerate(counts) if count == 1 and i in on_prefix]
        prefills = [i for i, count in enumerate(counts) if count > 1]
        short_prompts = [i for i in prefills if starts[i] == 0 and counts[i] <= BATCHED_PREFILL_MAX_TOKENS]
        batched_prefills = None
        if len(short_prompts) > 1:
            batched_prefills = attention_torch.batched_prefills([first_rows[i] for i in short_prompts],
                                                                [counts[i] for i in short_prompts], store.keys.device)
            prefills = sorted(set(prefills) - set(short_prompts))
        parts = {"store": store, "seq_ids": seq_ids, "starts": starts, "counts": counts, "first_rows": first_rows,
                 "prefills": prefills, "batched": None, "batched_prefills": batched_prefills, "long_decodes": [],
                 "layout": store.compactions}
        if shared_decodes:
            parts["shared"] = attention_shared.shared_decodes(store, first_rows, seq_ids, starts, shared_decodes)
        else:
            parts["shared"] = []
        if attention_kernels.fused_decode_available(store):
            if counts and len(decodes) == len(counts):  # the steady state: the kernel appends K/V itself
                bases = store.claim(seq_ids, starts, counts)
                fused = attention_kernels.fused_decodes(store, None, bases, starts, range(len(counts)))
                return cls(**parts, write_rows=None, fused=fused)
            rows = store.rows(seq_ids, starts, counts)
            fused = None
            if decodes:
                bases = [store.start_of(seq_ids[i]) for i in decodes]
                rows_of_decodes = torch.tensor([first_rows[i] for i in decodes])
                fused = attention_kernels.fused_decodes(store, rows_of_decodes, bases, starts, decodes)
            return cls(**parts, write_rows=rows, fused=fused)
        rows = store.rows(seq_ids, starts, counts)
        on_gpu = store.keys.device.type == "cuda"  # where the gather is cheap and per-sequence launches are not
        short = [i for i in decodes if on_gpu or starts[i] < BATCHED_DECODE_MAX_CONTEXT]
        if len(short) > 1:
            parts["batched"] = attention_torch.batched_decodes(store, [first_rows[i] for i in short],
                                                               [seq_ids[i] for i in short],
                                                               [starts[i] + 1 for i in short])
            batched = set(short)
            parts["long_decodes"] = [i for i in decodes if i not in batched]
        else:
            parts["long_decodes"] = decodes
        return cls(**parts, write_rows=rows, fused=None)


def attend(
    store: KVStore,
    layer: int,
    seq_ids: Sequence[object],
    starts: Sequence[int],
    counts: Sequence[int],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Append k, v and attend. q: [T, heads, D]; k, v: [T, kv_heads, D] -> [T, heads, D].

    For one layer; a step that runs every layer makes one ``AttentionPlan`` and calls ``attend_with``."""
    return attend_with(checked_plan(store, seq_ids, starts, counts, q, k, v), layer, q, k, v)


def checked_plan(store: KVStore, seq_ids: Sequence[object], starts: Sequence[int], counts: Sequence[int],
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionPlan:
    """``AttentionPlan.of``, once q, k and v are checked to carry a row per token: a bad
    batch is refused before the plan claims any of its rows."""
    check_shapes(store, q, k, v, sum(counts))
    return AttentionPlan.of(store, seq_ids, starts, counts)


def attend_with(plan: AttentionPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attend`` for a batch planned once: append k, v to layer ``layer`` and attend."""
    check_shapes(plan.store, q, k, v, plan.tokens)
    if plan.stale:
        raise ValueError("the KV store compacted after this batch was planned: use plan.replanned()")
    store = plan.store
    scale = q.shape[-1] ** -0.5
    if plan.write_rows is None:  # every row is a decode on the C kernel, which appends the K/V
        return attention_kernels.decode_fused(store, layer, plan.fused, q, scale, new_kv=(k, v))
    store.write(layer, plan.write_rows, k, v)
    out = torch.empty_like(q)
    inference = torch.is_inference_mode_enabled()  # thread-local: worker threads must match the caller

    def attend_each(indices: Iterable[int]) -> None:
        with torch.inference_mode(inference):
            for i in indices:
                first, count, start = plan.first_rows[i], plan.counts[i], plan.starts[i]
                out[first:first + count] = _attend_cached(store, layer, plan.seq_ids[i], q[first:first + count],
                                                          start, scale)

    if plan.fused is not None:
        out[plan.fused.rows] = attention_kernels.decode_fused(store, layer, plan.fused, q[plan.fused.rows], scale)
    if plan.batched is not None:
        rows = plan.batched.rows
        out[rows] = attention_torch.decode_batched(store, layer, plan.batched, q[rows], scale)
    if plan.batched_prefills is not None:
        plan.batched_prefills.put(out, attention_torch.prefill_batched(plan.batched_prefills, q, k, v, scale))
    for shared in plan.shared:
        out[shared.rows] = attention_shared.decode_shared(store, layer, shared, q[shared.rows], scale)
    attend_each(plan.prefills)  # SDPA and the prefill kernel use every core themselves
    long_decodes = plan.long_decodes
    workers = min(torch.get_num_threads(), len(long_decodes))
    if workers > 1:
        # One small kernel chain per sequence cannot use several cores; several sequences
        # at once can (torch releases the GIL, and each writes only its own rows of out).
        thread_policy.in_parallel(attend_each, [(long_decodes[w::workers],) for w in range(workers)])
    else:
        attend_each(long_decodes)
    return out


def check_shapes(store: KVStore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int) -> None:
    """Refuse q, k, v that do not fit the store (the C kernels trust their shapes, and a
    Tier 2 node takes them from the network): q [tokens, heads, D], k and v [tokens,
    kv_heads, D] with the store's kv_heads, D and dtype, heads a multiple of kv_heads."""
    kv_heads, dim = store.num_kv_heads, store.head_dim
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 3 or tensor.dtype != store.dtype:
            raise ValueError(f"{name} must be a 3-D {store.dtype} tensor [tokens, heads, head_dim] for this KV "
                             f"store, got {tensor.dtype} of shape {list(tensor.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0] == tokens):
        raise ValueError(f"batch carries {q.shape[0]} query rows for {tokens} tokens")
    if k.shape[1:] != (kv_heads, dim) or v.shape[1:] != (kv_heads, dim):
        raise ValueError(f"k and v must be [tokens, {kv_heads}, {dim}] for this KV store, "
                         f"got {list(k.shape)} and {list(v.shape)}")
    if q.shape[2] != dim or q.shape[1] == 0 or q.shape[1] % kv_heads:
        raise ValueError(f"q must be [tokens, a multiple of {kv_heads} heads, {dim}] for this KV store, "
                         f"got {list(q.shape)}")


def _attend_cached(store: KVStore, layer: int, seq_id: object, q: torch.Tensor, start: int,
                   scale: float) -> torch.Tensor:
    """``_attend_one`` over the sequence's first ``start + n`` cached tokens. An int8 store's
    prompt chunk goes to the prefill kernel straight from its int8 rows (dequantized as they
    are packed, in one pass); elsewhere an int8 store's rows are dequantized first."""
    length = start + q.shape[0]
    if store.quantized and q.shape[0] > 1 and attention_kernels.prefill_fused_available(q) \
            and not store.shares(seq_id):
        keys, values, key_scales, value_scales = store.stored(layer, seq_id, length)
        return attention_kernels.prefill_fused(q, keys, values, start, scale, key_scales, value_scales)
    keys, values = store.view(layer, seq_id, length)
    return _attend_one(q, keys, values, start, scale)


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [n, heads, D] of positions start..start+n over keys/values [kv_heads, start+n, D]: a
    prefill chunk on the C kernel where it serves it, else torch ops (a decode always: plain
    matmuls beat the prefill kernel for one query row)."""
    if q.shape[0] > 1 and attention_kernels.prefill_fused_available(q):
        return attention_kernels.prefill_fused(q, keys, values, start, scale)
    return attention_torch.attend_one(q, keys, values, start, scale)
