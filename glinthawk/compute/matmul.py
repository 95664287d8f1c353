"""Linear layers: on the CPU, oneDNN with each weight packed once at load time.

``F.linear`` on the CPU leaves oneDNN (bf16) or MKL (float32) to reorder the weight into
its blocked layout on every call, and MKL takes a slow generic path on non-Intel CPUs.
Reordering once (``pack``) and multiplying with ``torch.ops.mkldnn._linear_pointwise``
(what torch.compile's CPU backend emits for the same job) is faster, with bf16 results equal
bit for bit (figures in docs/PERFORMANCE.md). Elsewhere (CUDA, float16, a torch without
oneDNN) weights stay plain tensors.

oneDNN keeps a primitive, with scratch memory, for every input shape it sees, so on the
CPU ``linear`` pads the rows to a few fixed counts (``padded_rows``) and resident memory
stays flat under continuous batching; ``layers.warm_up`` runs each count once, at start-up on a
node, and as the run first reaches it in the single-process engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packs(weight: torch.Tensor) -> bool:
    """Whether ``pack`` will pack ``weight`` (CPU, float32 or bfloat16, oneDNN at hand)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in oneDNN's layout for ``linear`` (an opaque tensor with the same
    shape and dtype, and no data pointer), or ``weight`` itself where ``packs`` says no."""
    return torch.ops.mkldnn._reorder_linear_weight(weight) if packs(weight) else weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a plain or ``pack``ed weight; rows padded to ``padded_rows`` where oneDNN serves it."""
    rows = x.shape[0]
    padded = padded_rows(rows) if rows and pads_rows(weight) else rows
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    out = _multiply(x, weight, bias)
    return out if padded == rows else out[:rows]


def _multiply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pads_rows(weight: torch.Tensor) -> bool:
    """Whether matmuls with ``weight`` go to oneDNN (packed, or CPU 16-bit), where ``linear`` pads rows."""
    return weight.is_mkldnn or (weight.device.type == "cpu" and weight.dtype != torch.float32)


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a bucket: a multiple of 8 up to 64, then of 1/8 of the next
    power of two (padding under a quarter of the rows), so a run sees 4 row counts per octave."""
    step = max(8, (1 << (rows - 1).bit_length()) // 8)
    return -(-rows // step) * step
