"""Linear layers: on the CPU, each weight packed once at load time, for oneDNN or our own kernel.

``F.linear`` on the CPU leaves oneDNN (bf16) or MKL (float32) to reorder the weight into
its blocked layout on every call, and MKL takes a slow generic path on non-Intel CPUs.
Reordering once (``pack``) and multiplying with ``torch.ops.mkldnn._linear_pointwise``
(what torch.compile's CPU backend emits for the same job) is faster, with bf16 results equal
bit for bit (figures in docs/PERFORMANCE.md). Elsewhere (CUDA, float16, a torch without
oneDNN) weights stay plain tensors.

float32 weights on a CPU with AVX-512F go to ``_matmul`` instead (``PanelWeight``): at decode
sizes, with each step streaming the weights from memory, oneDNN leaves much of the FMA peak
unused there (figures in docs/PERFORMANCE.md, "float32 matmuls on AVX-512F").

oneDNN keeps a primitive, with scratch memory, for every input shape it sees, so on the
CPU ``linear`` pads the rows to a few fixed counts (``padded_rows``) and resident memory
stays flat under continuous batching; ``layers.warm_up`` runs each count once, at start-up on a
node, and as the run first reaches it in the single-process engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glinthawk.compute import cbind

PANELS = cbind.MATMUL  # whether float32 CPU weights go to _matmul


class PanelWeight(torch.Tensor):
    """A float32 weight [out, in] laid out for ``_matmul`` (``cbind.pack_panels``): its shape,
    dtype and size are the plain weight's, its element order is not, so only ``linear`` reads it."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def panel_weight(weight: torch.Tensor) -> PanelWeight:
    """``weight`` laid out for ``_matmul`` whatever ``panels`` says (the benchmark compares it with oneDNN)."""
    return cbind.pack_panels(weight).as_subclass(PanelWeight)


def panels(weight: torch.Tensor) -> bool:
    """Whether ``pack`` lays ``weight`` out for ``_matmul`` (see ``PANELS``; output rows a multiple of its panel)."""
    return (PANELS and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % cbind.PANEL == 0 and not weight.is_mkldnn)


def packs(weight: torch.Tensor) -> bool:
    """Whether ``pack`` will pack ``weight`` for oneDNN (CPU, float32 or bfloat16, oneDNN at hand, not ``panels``)."""
    if panels(weight):
        return False
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] laid out for ``linear``: a ``PanelWeight`` where ``panels`` says so,
    else in oneDNN's layout (an opaque tensor with the same shape and dtype, and no data
    pointer), or ``weight`` itself where ``packs`` says no."""
    if panels(weight):
        return panel_weight(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight) if packs(weight) else weight


def unpack(weight: torch.Tensor) -> torch.Tensor:
    """The plain weight [out, in] that ``pack`` laid out (a copy where it was packed)."""
    if type(weight) is PanelWeight:
        rows, depth = weight.shape
        plain = weight.as_subclass(torch.Tensor).view(rows // cbind.PANEL, depth, cbind.PANEL)
        return plain.permute(0, 2, 1).reshape(rows, depth)
    return weight.to_dense() if weight.is_mkldnn else weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a plain or ``pack``ed weight; rows padded to ``padded_rows`` where oneDNN serves it."""
    rows = x.shape[0]
    padded = padded_rows(rows) if rows and pads_rows(weight) else rows
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    out = _multiply(x, weight, bias)
    return out if padded == rows else out[:rows]


def _multiply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if type(weight) is PanelWeight:
        out = cbind.panel_linear(x.contiguous(), weight, torch.get_num_threads())
        return out if bias is None else out.add_(bias)
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
