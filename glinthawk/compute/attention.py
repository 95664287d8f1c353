"""Attention over the KV store for a ragged batch (the Tier 2 computation).

A batch packs the new tokens of several sequences: sequence i brings ``counts[i]`` tokens
(1 for decode, more for a prefill chunk) at positions ``starts[i]..starts[i]+counts[i]``.
Each appends its k/v to the store, then attends causally over its own cached past.

GQA without repeating K/V: the ``group`` query heads that share a KV head are folded into
the query-row dimension, so one matmul per KV head serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from glinthawk.compute.kvcache import KVStore


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
    """Append k, v and attend. q: [T, heads, D]; k, v: [T, kv_heads, D] -> [T, heads, D]."""
    total = sum(counts)
    if not (q.shape[0] == k.shape[0] == v.shape[0] == total):
        raise ValueError(f"batch carries {q.shape[0]} query rows for {total} tokens")
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    offset = 0
    for seq_id, start, count in zip(seq_ids, starts, counts):
        rows = slice(offset, offset + count)
        store.write(layer, seq_id, start, k[rows], v[rows])
        keys, values = store.view(layer, seq_id, start + count)
        out[rows] = _attend_one(q[rows], keys, values, start, scale)
        offset += count
    return out


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [n, heads, D] of positions start..start+n over keys/values [kv_heads, start+n, D]."""
    n, heads, dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    # [n, heads, D] -> [kv_heads, group * n, D]: rows ordered (g, i).
    q_rows = q.view(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * n, dim)
    if n == 1:
        # Decode: one query per head sees the whole past; plain matmuls beat the fused
        # kernel here (it parallelises over query blocks, of which there is one).
        scores = torch.matmul(q_rows, keys.transpose(1, 2)).float() * scale
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        attended = torch.matmul(probs, values)
    else:
        positions = torch.arange(start, start + n, device=q.device).repeat(group)
        mask = torch.arange(start + n, device=q.device)[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=mask, scale=scale)
    # [kv_heads, group * n, D] -> [n, heads, D]
    return attended.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim)
