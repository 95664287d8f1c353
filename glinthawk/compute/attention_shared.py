"""Decode attention for sequences on a shared prefix (``KVStore.reserve(..., prefix=...)``).

Their tokens lie in two slabs: the prefix, stored once, and each sequence's own rows after
it. The decodes on one prefix are attended together: their queries meet the prefix's keys in
one matrix product (the prefix is read once for all of them, not once per sequence), their
own rows are gathered into a padded batch, and one softmax spans both parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glinthawk.compute.attention_torch import padded_runs
from glinthawk.compute.kvcache import KVStore


@dataclass(frozen=True)
class SharedDecodes:
    """The decode rows of one step that read the same prefix."""

    rows: torch.Tensor  # their rows in the batch
    prefix: object  # the sequence id whose slab holds the prefix
    prefix_length: int
    own_index: torch.Tensor  # store rows of each one's own tokens, [sequences * longest]; padding re-reads a row
    padding: torch.Tensor  # bool [sequences, longest]: True where a position is padding
    longest: int


def shared_decodes(store: KVStore, first_rows: list[int], seq_ids: list[object], starts: list[int],
                   members: list[int]) -> list[SharedDecodes]:
    """The groups, by prefix, of the decodes ``members`` (indices into the batch's lists)."""
    groups: dict[object, list[int]] = {}
    for i in members:
        groups.setdefault(store.prefix_of(seq_ids[i]), []).append(i)
    device = store.keys.device
    plans = []
    for prefix, group in groups.items():
        offset = store.reserved(prefix)
        index, padding = padded_runs([store.start_of(seq_ids[i]) for i in group],
                                     [starts[i] + 1 - offset for i in group])
        plans.append(SharedDecodes(torch.tensor([first_rows[i] for i in group], device=device), prefix, offset,
                                   index.to(device), padding.to(device), padding.shape[1]))
    return plans


def decode_shared(store: KVStore, layer: int, plan: SharedDecodes, q: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence (q: [B, heads, D]) over its prefix and its own tokens."""
    batch, heads, dim = q.shape
    kv_heads = store.num_kv_heads
    group = heads // kv_heads
    prefix_keys, prefix_values = store.view(layer, plan.prefix, plan.prefix_length)  # [kv_heads, L, D]
    own_keys, own_values = (t.view(kv_heads, batch, plan.longest, dim) for t in store.gather(layer, plan.own_index))
    queries = q.to(prefix_keys.dtype).view(batch, kv_heads, group, dim).transpose(0, 1)  # [kv_heads, B, group, D]
    prefix_scores = torch.matmul(queries.reshape(kv_heads, batch * group, dim), prefix_keys.transpose(1, 2))
    prefix_scores = prefix_scores.float().mul_(scale).view(kv_heads, batch, group, plan.prefix_length)
    own_scores = torch.matmul(queries, own_keys.transpose(-1, -2)).float().mul_(scale)  # [kv_heads, B, group, longest]
    own_scores.masked_fill_(plan.padding[None, :, None, :], float("-inf"))
    # One softmax over both parts: a shared maximum, and the two sums of exponentials added.
    highest = torch.maximum(prefix_scores.amax(-1, keepdim=True), own_scores.amax(-1, keepdim=True))
    prefix_weights, own_weights = prefix_scores.sub_(highest).exp_(), own_scores.sub_(highest).exp_()
    total = prefix_weights.sum(-1, keepdim=True) + own_weights.sum(-1, keepdim=True)
    attended = torch.matmul(prefix_weights.view(kv_heads, batch * group, -1).to(prefix_values.dtype), prefix_values)
    attended = attended.view(kv_heads, batch, group, dim).float()
    attended += torch.matmul(own_weights.to(own_values.dtype), own_values).float()
    attended /= total
    return attended.transpose(0, 1).reshape(batch, heads, dim).to(q.dtype)
