"""Int8 K/V rows with per-token, per-head scales: the torch side of ``_kvint8.h``.

A Tier 2 node may keep its cache as int8 (``--kv-dtype int8``): each row (one token of one
KV head, ``head_dim`` values) becomes ``head_dim`` int8 values and one bfloat16 scale, a
little over half the bytes of a bf16 row, so the same memory holds about twice the tokens.
Per-row scales follow each row's own range: after RoPE, keys differ widely from head to
head and token to token, and one scale per head or per tensor would spend most of the 8
bits on the largest of them. The scale is the row's largest magnitude / 127, rounded *up*
to a bf16 so that it is stored exactly and no value rounds past +-127.

``quantize`` must give exactly what the C kernel's ``quantize_row`` gives (the decode
kernel appends rows itself, other paths write through torch): same float32 division,
same round-half-to-even, same rounding of the scale.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16  # the scales' dtype: 2 bytes a row
QMAX = 127


def row_scales(amax: torch.Tensor) -> torch.Tensor:
    """The scale of each row whose largest magnitude is ``amax`` (float32): amax / 127 rounded
    up to a bf16, or 1 for an all-zero row; as bf16."""
    scale = amax / QMAX
    bits = scale.view(torch.int32)
    rounded = ((bits + 0xFFFF) >> 16 << 16).view(torch.float32)  # positive: adding then truncating rounds up
    return torch.where(amax > 0, rounded, torch.ones_like(rounded)).to(SCALE_DTYPE)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] (float) -> (int8 [..., head_dim], bf16 scales [...]): x ~ q * scale."""
    x = x.float()
    scales = row_scales(x.abs().amax(dim=-1))
    q = torch.round(x / scales.float().unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., head_dim] and their scales [...] -> values in ``dtype`` (products in float32)."""
    return (q.float() * scales.float().unsqueeze(-1)).to(dtype)


def row_bytes(head_dim: int) -> int:
    """Bytes of one int8 row with its scale."""
    return head_dim + SCALE_DTYPE.itemsize
