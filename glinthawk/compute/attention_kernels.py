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

from glinthawk.compute import thread_policy
from glinthawk.compute.elementwise import C_DTYPE_CODES
from glinthawk.compute.kvcache import KVStore

try:
    from glinthawk.compute import _attention
except ImportError:  # built at install time when a C compiler is present
    _attention = None


# The widest instruction set the kernel may pick (its LEVEL_* constants); the CPU's support
# is checked in C. Tests lower it to cover each path.
KERNEL_WIDEST = 0 if _attention is None else _attention.LEVEL_AVX512_BF16


@dataclass(frozen=True)
class FusedDecodes:
    """Decode rows served by the C kernel."""

    rows: torch.Tensor | None  # their rows in the batch; None: every row, and the kernel appends their K/V
    bases: torch.Tensor  # int64: each sequence's first buffer row
    lengths: torch.Tensor  # int64: tokens each attends over, its new one included
    slices: torch.Tensor  # int64 [threads, 2]: (first, last) work items per thread; item = (sequence, KV head)


def fused_decodes(store: KVStore, rows: torch.Tensor | None, bases: list[int], starts: Sequence[int],
                  decodes: Iterable[int]) -> FusedDecodes:
    lengths = torch.tensor([starts[i] + 1 for i in decodes], dtype=torch.int64)
    slices = thread_policy.balanced_slices(lengths.repeat_interleave(store.num_kv_heads),
                                           thread_policy.FUSED_PARALLEL_MIN_WORK)
    return FusedDecodes(rows, torch.tensor(bases, dtype=torch.int64), lengths, slices)


def fused_decode_available(store: KVStore) -> bool:
    """Whether decode rows over ``store`` run on the fused C kernel."""
    return (_attention is not None and store.keys.device.type == "cpu" and store.dtype in C_DTYPE_CODES
            and store.head_dim <= _attention.MAX_DIM)  # an int8 store: q, k, v in dtype, K/V as int8


def _scale_args(store: KVStore, layer: int) -> tuple[int, int, int]:
    """The C kernels' (key_scales, value_scales, scale_stride) for ``layer``: zeros unless int8."""
    if not store.quantized:
        return 0, 0, 0
    key_scales, value_scales = store.key_scales[layer], store.value_scales[layer]
    return key_scales.data_ptr(), value_scales.data_ptr(), key_scales.stride(0)


def decode_fused(
    store: KVStore, layer: int, plan: FusedDecodes, q: torch.Tensor, scale: float,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query token per sequence (q: [B, heads, D]) over each one's first ``plan.lengths``
    cached tokens, its slab starting at buffer row ``plan.bases[i]``. ``new_kv`` ([B,
    kv_heads, D] each): the tokens at ``lengths[i] - 1``, written into the store first."""
    batch, heads, dim = q.shape
    kv_heads = store.num_kv_heads
    query = (q if q.dtype in C_DTYPE_CODES else q.float()).contiguous()
    out = torch.empty_like(query)
    new_keys, new_values = (t.to(store.dtype).contiguous() for t in new_kv) if new_kv else (None, None)
    keys, values = store.keys[layer], store.values[layer]
    key_scales, value_scales, scale_stride = _scale_args(store, layer)
    kv_code = _attention.INT8 if store.quantized else C_DTYPE_CODES[store.dtype]

    def run(slices: int, count: int) -> None:
        _attention.decode_attention(
            query.data_ptr(), out.data_ptr(), 0 if new_keys is None else new_keys.data_ptr(),
            0 if new_values is None else new_values.data_ptr(), keys.data_ptr(), values.data_ptr(), key_scales,
            value_scales, plan.bases.data_ptr(), plan.lengths.data_ptr(), slices, count, heads, kv_heads, dim,
            keys.stride(0), scale_stride, kv_code, C_DTYPE_CODES[query.dtype], scale, KERNEL_WIDEST)

    thread_policy.run_slices(run, plan.slices)
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
    n, heads, dim = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    key_words, value_words = _attention.packed_kv_words(length, dim)
    packed_keys = torch.empty(kv_heads, key_words, dtype=torch.int32)
    packed_values = torch.empty(kv_heads, value_words, dtype=torch.int32)
    scales = (0, 0, 0) if key_scales is None else (key_scales.data_ptr(), value_scales.data_ptr(),
                                                   key_scales.stride(0))
    _attention.pack_kv(keys.data_ptr(), values.data_ptr(), *scales[:2], packed_keys.data_ptr(),
                       packed_values.data_ptr(), length, kv_heads, dim, keys.stride(0), scales[2])
    query = q.contiguous()
    out = torch.empty_like(query)

    def run(slices: int, count: int) -> None:
        _attention.prefill_attention(query.data_ptr(), out.data_ptr(), packed_keys.data_ptr(),
                                     packed_values.data_ptr(), start, n, heads, kv_heads, dim, scale, slices, count)

    # item = (KV head, block of positions); a block's work grows with its position
    blocks = -(-n // _attention.PREFILL_POSITIONS)
    work = (start + torch.arange(blocks) * _attention.PREFILL_POSITIONS + 1).repeat(kv_heads)
    thread_policy.run_slices(run, thread_policy.balanced_slices(work, thread_policy.PREFILL_PARALLEL_MIN_WORK))
    return out
