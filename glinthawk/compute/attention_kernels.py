"""The C-kernel attention paths (``_attention.c``) and their Python wrappers.

Decode rows (one token per sequence) go to the fused decode kernel when it is built and the
store is a float32 or bfloat16 CPU store: it reads each cached K/V row once, at close to
memory bandwidth, spread over torch's thread count (``thread_policy``). When every row is a decode
(the steady state) the kernel also appends the new K/V and takes q and returns the output in
their own dtype, so a step is one call and a few Python lines: Tier 2 runs it once per layer
per micro-batch, between which the caches have gone cold.
Prompt chunks go to the bf16 prefill kernel where the CPU has AVX512_BF16.
An int8 store (``KVStore(kv_dtype=torch.int8)``) runs the same kernels on its int8 rows and
their scales (``_kvint8.h``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from glinthawk.compute import cbind, thread_policy
from glinthawk.compute.cbind import C_DTYPE_CODES, _attention  # None where not built (tests set it so)
from glinthawk.compute.kvcache import KVStore

# The widest instruction set the kernel may pick (its LEVEL_* constants); the CPU's support
# is checked in C. Tests lower it to cover each path.
KERNEL_WIDEST = 0 if _attention is None else _attention.LEVEL_AVX512_BF16


@dataclass(frozen=True)
class FusedDecodes:
    """Decode rows served by the C kernel."""

    rows: torch.Tensor | None  # their rows in the batch; None: every row, and the kernel appends their K/V
    sequences: cbind.DecodeRows  # their rows in the cache, and the work's split over the threads


def fused_decodes(store: KVStore, rows: torch.Tensor | None, bases: list[int], starts: Sequence[int],
                  decodes: Iterable[int]) -> FusedDecodes:
    lengths = torch.tensor([starts[i] + 1 for i in decodes], dtype=torch.int64)
    slices = thread_policy.balanced_slices(lengths.repeat_interleave(store.num_kv_heads),
                                           thread_policy.FUSED_PARALLEL_MIN_WORK)
    return FusedDecodes(rows, cbind.DecodeRows(torch.tensor(bases, dtype=torch.int64), lengths, slices))


def fused_decode_available(store: KVStore) -> bool:
    """Whether decode rows over ``store`` run on the fused C kernel."""
    return (_attention is not None and store.keys.device.type == "cpu" and store.dtype in C_DTYPE_CODES
            and store.head_dim <= _attention.MAX_DIM)  # an int8 store: q, k, v in dtype, K/V as int8


def _scales(store: KVStore, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An int8 store's key and value scales for ``layer``; None otherwise."""
    return (store.key_scales[layer], store.value_scales[layer]) if store.quantized else None


def decode_fused(
    store: KVStore, layer: int, plan: FusedDecodes, q: torch.Tensor, scale: float,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query token per sequence (q: [B, heads, D]) over each one's first ``lengths[i]``
    cached tokens, its slab starting at buffer row ``bases[i]`` (``plan.sequences``).
    ``new_kv`` ([B, kv_heads, D] each): the tokens at ``lengths[i] - 1``, written into the
    store first."""
    query = (q if q.dtype in C_DTYPE_CODES else q.float()).contiguous()
    new_kv = tuple(t.to(store.dtype).contiguous() for t in new_kv) if new_kv else None
    out = cbind.decode_attention(query, new_kv, store.keys[layer], store.values[layer], _scales(store, layer),
                                 plan.sequences, scale, KERNEL_WIDEST)
    return out.to(q.dtype)


def prefill_fused_available(q: torch.Tensor) -> bool:
    """Whether a prefill chunk of ``q`` (in the store's dtype, see ``check_shapes``) runs on
    the C kernel: bf16 on a CPU with AVX512_BF16, head_dim a multiple of PREFILL_DIM_MULTIPLE
    up to MAX_DIM (the cache bf16, or int8 dequantized as it is packed)."""
    return (_attention is not None and KERNEL_WIDEST >= _attention.LEVEL_AVX512_BF16 and q.device.type == "cpu"
            and q.dtype == torch.bfloat16 and q.shape[-1] % _attention.PREFILL_DIM_MULTIPLE == 0
            and q.shape[-1] <= _attention.MAX_DIM and _attention.prefill_supported())


def prefill_fused(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float,
                  key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for a prefill chunk on the C kernel: q [n, heads, D] at positions
    start.. over keys/values [kv_heads, start + n, D], views of one sequence's slab (int8:
    with their scales, [kv_heads, start + n] views)."""
    n, kv_heads = q.shape[0], keys.shape[0]
    packed = cbind.pack_kv(keys, values, None if key_scales is None else (key_scales, value_scales))
    # item = (KV head, block of positions); a block's work grows with its position
    blocks = -(-n // _attention.PREFILL_POSITIONS)
    work = (start + torch.arange(blocks) * _attention.PREFILL_POSITIONS + 1).repeat(kv_heads)
    slices = thread_policy.balanced_slices(work, thread_policy.PREFILL_PARALLEL_MIN_WORK)
    return cbind.prefill_attention(q.contiguous(), packed, start, scale, slices)
