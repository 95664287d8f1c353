"""The torch attention paths: where the C kernels do not serve a batch (CUDA, float16, no C
compiler at install time), and for short fresh prompts, which are attended together as one
padded batch (their keys are their own new tokens). An int8 store's rows are dequantized as
they are read (``KVStore.gather`` and ``KVStore.view``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glinthawk.compute.kvcache import KVStore


@dataclass(frozen=True)
class BatchedDecodes:
    """Short decodes gathered into one padded batch (the torch path), index tensors on the store's device."""

    rows: torch.Tensor  # their rows in the batch
    index: torch.Tensor  # store rows to gather, [sequences * longest]; padding re-reads a valid row
    padding: torch.Tensor  # bool [sequences, longest]: True where a position is padding
    longest: int


@dataclass(frozen=True)
class BatchedPrefills:
    """Short fresh prompts padded into one batch, index tensors on the batch's device."""

    sequences: int
    longest: int
    index: torch.Tensor  # rows of the batch, [sequences * longest]; padding repeats a prompt's last row
    valid: torch.Tensor  # int64: the positions in index of prompt tokens, not padding
    rows: torch.Tensor  # index[valid]: the batch rows the outputs go to
    future: torch.Tensor  # bool [longest, longest]: True where the key comes after the query
    run: slice | None  # prompts of one length in consecutive rows: index, rows and valid are all this run

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The batch rows ``index`` names: a view where they are one run, else a copy."""
        return tensor[self.run] if self.run is not None else tensor.index_select(0, self.index)

    def put(self, out: torch.Tensor, padded: torch.Tensor) -> None:
        """Write ``padded`` (a row per ``index`` entry) to its prompt tokens' rows of ``out``, padding dropped."""
        if self.run is not None:
            out[self.run] = padded
        else:
            out.index_copy_(0, self.rows, padded.index_select(0, self.valid))


def padded_runs(firsts: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of ``lengths[i]`` rows from ``firsts[i]``, padded to the longest: the rows
    [sequences * longest] (padding repeats a run's last row, always valid to read) and a
    bool mask [sequences, longest], True where a position is padding."""
    lens = torch.tensor(lengths)
    positions = torch.arange(max(lengths))
    index = torch.tensor(firsts)[:, None] + torch.minimum(positions[None, :], lens[:, None] - 1)
    return index.reshape(-1), positions[None, :] >= lens[:, None]


def batched_decodes(store: KVStore, rows: list[int], seq_ids: list[object], lengths: list[int]) -> BatchedDecodes:
    device = store.keys.device
    index, padding = padded_runs([store.start_of(s) for s in seq_ids], lengths)
    return BatchedDecodes(torch.tensor(rows, device=device), index.to(device), padding.to(device), max(lengths))


def batched_prefills(first_rows: list[int], counts: list[int], device: torch.device) -> BatchedPrefills:
    longest = max(counts)
    index, padding = padded_runs(first_rows, counts)
    valid = (~padding.reshape(-1)).nonzero().squeeze(1)
    future = torch.ones(longest, longest, dtype=torch.bool).triu(1)
    first = first_rows[0]
    one_run = (all(count == longest for count in counts)
               and first_rows == list(range(first, first + len(index), longest)))
    return BatchedPrefills(len(counts), longest, index.to(device), valid.to(device), index[valid].to(device),
                           future.to(device), slice(first, first + len(index)) if one_run else None)


def decode_batched(store: KVStore, layer: int, plan: BatchedDecodes, q: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence (q: [B, heads, D]) over each one's own past, as one padded batch."""
    batch, heads, dim = q.shape
    kv_heads = store.num_kv_heads
    group = heads // kv_heads
    keys, values = (t.view(kv_heads, batch, plan.longest, dim) for t in store.gather(layer, plan.index))
    q_grouped = q.view(batch, kv_heads, group, dim).transpose(0, 1)  # [kv_heads, B, group, D]
    scores = torch.matmul(q_grouped, keys.transpose(-1, -2)).float() * scale  # [kv_heads, B, group, longest]
    scores.masked_fill_(plan.padding[None, :, None, :], float("-inf"))
    attended = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # [kv_heads, B, group, D]
    return attended.transpose(0, 1).reshape(batch, heads, dim)


def prefill_batched(plan: BatchedPrefills, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Causal attention of each short fresh prompt over its own tokens, all prompts in one
    padded batch: q [T, heads, D], k, v [T, kv_heads, D] of the whole batch -> [sequences * longest, heads, D],
    padded rows included (``plan.put`` drops them). A real query sees only earlier tokens of its own prompt,
    never padding."""
    batch, longest = plan.sequences, plan.longest
    heads, dim = q.shape[1:]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    queries = plan.gather(q).reshape(batch, longest, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    keys = plan.gather(k).reshape(batch, longest, kv_heads, dim).permute(0, 2, 3, 1)  # [B, kv_heads, D, L]
    values = plan.gather(v).reshape(batch, longest, kv_heads, dim).transpose(1, 2)  # [B, kv_heads, L, D]
    scores = torch.matmul(queries.reshape(batch, kv_heads, group * longest, dim), keys).float() * scale
    scores = scores.view(batch, kv_heads, group, longest, longest).masked_fill_(plan.future, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(batch, kv_heads, group * longest, longest)
    attended = torch.matmul(probs, values).view(batch, kv_heads, group, longest, dim).permute(0, 3, 1, 2, 4)
    return attended.reshape(batch * longest, heads, dim)


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [n, heads, D] of positions start..start+n over keys/values [kv_heads, start+n, D], in torch ops."""
    n, heads, dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    if n == 1:
        # Decode: the group's query heads become rows of one [group, D] matrix per KV head.
        # Plain matmuls beat the fused kernel here (it parallelises over query blocks, of
        # which there is one).
        scores = torch.matmul(q.view(kv_heads, group, dim), keys.transpose(1, 2)).float() * scale
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).view(1, heads, dim)
    # Prefill chunk: the fused kernel, which maps query heads to their KV head itself (no
    # repeated K/V). A chunk that starts the sequence is plainly causal; a later chunk
    # also sees the whole cached past.
    mask = None
    if start > 0:
        positions = torch.arange(start, start + n, device=q.device)
        mask = torch.arange(start + n, device=q.device)[None, :] <= positions[:, None]
    attended = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                              is_causal=mask is None, scale=scale, enable_gqa=True)
    return attended[0].transpose(0, 1)
