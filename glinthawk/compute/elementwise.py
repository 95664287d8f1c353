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

try:
    from glinthawk.compute import _elementwise
except ImportError:  # built at install time when a C compiler is present
    _elementwise = None

# The dtypes the C kernels take, by the codes every extension exports from _kernels.h.
C_DTYPE_CODES = {} if _elementwise is None else {torch.float32: _elementwise.FLOAT32,
                                                 torch.bfloat16: _elementwise.BFLOAT16}


def fits(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the C loops take ``x`` (with ``others`` of its dtype, contiguous)."""
    return (_elementwise is not None and x.device.type == "cpu" and x.dtype in C_DTYPE_CODES
            and all(t.dtype == x.dtype and t.device == x.device and t.is_contiguous() for t in others))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``layers.rms_norm`` for a contiguous [rows, dim] ``x`` that ``fits``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _elementwise.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                          eps, C_DTYPE_CODES[x.dtype])
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rope.apply_rotary`` for x [tokens, heads, dim] whose heads are contiguous rows."""
    tokens, heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim:
        x = x.contiguous()
    out = torch.empty(tokens, heads, dim, dtype=x.dtype)
    _elementwise.rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), tokens, heads, dim,
                        x.stride(0), C_DTYPE_CODES[x.dtype])
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, -1)`` for [rows, vocab] logits, on the C loop where it is built
    for them (CPU float32 or bfloat16), as int64 on the CPU."""
    if not fits(logits):
        return torch.argmax(logits, dim=-1).cpu()
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _elementwise.argmax(logits.data_ptr(), out.data_ptr(), logits.shape[0], logits.shape[1],
                        C_DTYPE_CODES[logits.dtype])
    return out


def mask_logits(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> bool:
    """Set to -inf, in place, the logits of ``rows`` whose bit in ``masks`` (int32 [len(rows),
    words]) is 0, on the C loop; False (nothing done) where it does not take these logits."""
    if not fits(logits) or not logits.is_contiguous() or not hasattr(_elementwise, "mask_logits"):
        return False
    rows = rows.to(torch.int64).contiguous()
    masks = masks.to(torch.int32).contiguous()
    _elementwise.mask_logits(logits.data_ptr(), rows.data_ptr(), rows.shape[0], logits.shape[1], masks.data_ptr(),
                             masks.shape[1], C_DTYPE_CODES[logits.dtype])
    return True
