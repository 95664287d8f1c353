"""RMSNorm and RoPE on the calling thread on the CPU; argmax over logits.

Between network round trips torch's OpenMP team goes to sleep, and waking it costs more
than a small elementwise op (see ``_elementwise.c``). These run the same arithmetic, with
the same roundings, in one C loop compiled for the CPU's widest vector unit;
``layers.rms_norm`` and ``rope.apply_rotary`` use them where ``fits`` says so and torch's
ops everywhere else (CUDA, float16, no C compiler at install time). They win at every
batch size measured, as torch's expressions make temporaries of the whole batch
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch

from glinthawk.compute import cbind
from glinthawk.compute.cbind import C_DTYPE_CODES, _elementwise  # None where not built


def fits(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the C loops take ``x`` (with ``others`` of its dtype, contiguous)."""
    return (_elementwise is not None and x.device.type == "cpu" and x.dtype in C_DTYPE_CODES
            and all(t.dtype == x.dtype and t.device == x.device and t.is_contiguous() for t in others))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``layers.rms_norm`` for a contiguous [rows, dim] ``x`` that ``fits``."""
    return cbind.rms_norm(x.contiguous(), weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rope.apply_rotary`` for x [tokens, heads, dim] whose heads are contiguous rows."""
    if x.dim() == 3 and (x.stride(2) != 1 or x.stride(1) != x.shape[2]):
        x = x.contiguous()  # the kernel takes tokens any distance apart, each one's heads contiguous
    return cbind.rotary(x, cos, sin)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, -1)`` for [rows, vocab] logits, on the C loop where it is built
    for them (CPU float32 or bfloat16), as int64 on the CPU."""
    if not fits(logits):
        return torch.argmax(logits, dim=-1).cpu()
    return cbind.argmax(logits.contiguous())


def mask_logits(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> bool:
    """Set to -inf, in place, the logits of ``rows`` whose bit in ``masks`` (int32 [len(rows),
    words]) is 0, on the C loop; False (nothing done) where it does not take these logits."""
    if not fits(logits) or not logits.is_contiguous() or not hasattr(_elementwise, "mask_logits"):
        return False
    rows = rows.to(torch.int64).contiguous()
    masks = masks.to(torch.int32).contiguous()
    cbind.mask_logits(logits, rows, masks)
    return True
