"""The C kernels' bindings: the one place that hands tensors to ``_elementwise``, ``_matmul``,
``_sampling`` and ``_attention``.

The kernels take raw addresses and trust them, so a wrong tensor would be a crash or
silent garbage. Each entry here checks what it passes (on the CPU, a dtype the kernel
takes, the layout it reads, the shapes the call relates) and raises TypeError (dtype) or
ValueError (the rest), naming the kernel and the argument, before any address leaves
Python. Tensor contents (row indices, lengths, slices) are the callers' to get right.
Converting a tensor to what a kernel takes is the callers' choice; these check, and
allocate the outputs (which then need no check).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from glinthawk.compute import thread_policy
from glinthawk.threads import hook_openmp

try:  # built at install time when a C compiler is present
    from glinthawk.compute import _elementwise
except ImportError:
    _elementwise = None
try:
    from glinthawk.compute import _attention
except ImportError:
    _attention = None
try:
    from glinthawk.compute import _sampling
except ImportError:
    _sampling = None
try:
    from glinthawk.compute import _matmul
except ImportError:
    _matmul = None

_BUILT = _elementwise or _attention or _sampling
# The dtypes the C kernels take, by the codes every extension exports from _kernels.h.
C_DTYPE_CODES = {} if _BUILT is None else {torch.float32: _BUILT.FLOAT32, torch.bfloat16: _BUILT.BFLOAT16}
FLOATS = (torch.float32, torch.bfloat16)
_CACHES = (*FLOATS, torch.int8)
INT8 = None if _BUILT is None else _BUILT.INT8
_INT64, _INT32, _BF16 = (torch.int64,), (torch.int32,), (torch.bfloat16,)
_FLOAT32, _FLOAT64 = (torch.float32,), (torch.float64,)
_SLICE_BYTES = 2 * 8  # a slice: (first, last) work items, int64
PANEL = 0 if _matmul is None else _matmul.PANEL  # output columns per panel of a _matmul weight
# Whether _matmul runs here: built, its CPU has AVX-512F, and its slices go to torch's OpenMP
# workers (alone on the calling thread it would lose to oneDNN's team).
MATMUL = _matmul is not None and _matmul.supported() and hook_openmp(_matmul)


def address(kernel: str, name: str, tensor: torch.Tensor, dtypes: Collection[torch.dtype],
            shape: tuple[int, ...] | None = None) -> int:
    """The address of ``tensor``, a contiguous CPU tensor of one of ``dtypes`` (and of
    ``shape`` if given), as ``kernel`` takes its argument ``name``."""
    try:
        if (tensor.is_cpu and tensor.dtype in dtypes and (shape is None or tensor.shape == shape)
                and tensor.is_contiguous()):
            return tensor.data_ptr()
    except AttributeError:  # not a tensor
        pass
    raise _mismatch(kernel, name, tensor, dtypes, shape, "contiguous")


def rows_address(kernel: str, name: str, tensor: torch.Tensor, dtypes: Collection[torch.dtype],
                 shape: tuple[int, ...], stride: int | None = None) -> tuple[int, int]:
    """(address, stride of dim 0) of a CPU ``tensor`` of ``shape`` whose rows along dim 0 are
    each contiguous but may lie any distance apart (a view of a larger buffer): that
    ``stride`` if given, as when two views must share one stride the kernel takes once."""
    try:
        if tensor.is_cpu and tensor.dtype in dtypes and tensor.shape == shape:
            strides = tensor.stride()
            if _rows_contiguous(shape, strides) and (stride is None or shape[0] <= 1 or strides[0] == stride):
                return tensor.data_ptr(), strides[0]
    except AttributeError:
        pass
    layout = "contiguous along every dim but the first" + ("" if stride is None else f", rows {stride} apart")
    raise _mismatch(kernel, name, tensor, dtypes, shape, layout)


def _rows_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for dim in range(len(shape) - 1, 0, -1):
        if shape[dim] != 1 and strides[dim] != expected:  # torch leaves size-1 dims' strides free
            return False
        expected *= shape[dim]
    return True


def dims(kernel: str, name: str, tensor: torch.Tensor, ndim: int) -> torch.Size:
    """``tensor``'s shape, which must have ``ndim`` dims (the others' sizes follow from it)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{kernel}: argument {name!r} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{kernel}: argument {name!r} must be a {ndim}-D tensor, got shape {list(tensor.shape)}")
    return tensor.shape


def _mismatch(kernel: str, name: str, tensor: object, dtypes: Collection[torch.dtype],
              shape: tuple[int, ...] | None, layout: str) -> Exception:
    where = f"{kernel}: argument {name!r}"
    if not isinstance(tensor, torch.Tensor):
        return TypeError(f"{where} must be a tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        return ValueError(f"{where} must be on the CPU, got {tensor.device}")
    if tensor.dtype not in dtypes:
        return TypeError(f"{where} must be {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    if shape is not None and tensor.shape != shape:
        return ValueError(f"{where} must have shape {list(shape)}, got {list(tensor.shape)}")
    return ValueError(f"{where} must be {layout}, got strides {tensor.stride()} for shape {list(tensor.shape)}")


# -- _elementwise ---------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight over x's last dim (any leading dims)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"rms_norm: argument 'x' must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: argument 'x' must be [..., dim] with dim > 0, got shape {list(x.shape)}")
    dim = x.shape[-1]
    x_at = address("rms_norm", "x", x, FLOATS)
    weight_at = address("rms_norm", "weight", weight, (x.dtype,), (dim,))
    out = torch.empty_like(x)
    _elementwise.rms_norm(x_at, weight_at, out.data_ptr(), x.numel() // dim, dim, eps, C_DTYPE_CODES[x.dtype])
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin; x [tokens, heads, dim], its tokens any distance apart."""
    tokens, heads, dim = shape = dims("rotary", "x", x, 3)
    x_at, token_stride = rows_address("rotary", "x", x, FLOATS, shape)
    cos_at = address("rotary", "cos", cos, (x.dtype,), (tokens, dim))
    sin_at = address("rotary", "sin", sin, (x.dtype,), (tokens, dim))
    out = torch.empty(tokens, heads, dim, dtype=x.dtype)
    _elementwise.rotary(x_at, cos_at, sin_at, out.data_ptr(), tokens, heads, dim, token_stride, C_DTYPE_CODES[x.dtype])
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row of logits [rows, vocab]'s first maximum, int64 [rows]."""
    rows, vocab = dims("argmax", "logits", logits, 2)
    logits_at = address("argmax", "logits", logits, FLOATS)
    out = torch.empty(rows, dtype=torch.int64)
    _elementwise.argmax(logits_at, out.data_ptr(), rows, vocab, C_DTYPE_CODES[logits.dtype])
    return out


def mask_logits(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> None:
    """Logits of ``rows`` (int64 [n]) whose bit in masks (int32 [n, words]) is 0 to -inf, in place."""
    _, vocab = dims("mask_logits", "logits", logits, 2)
    n, words = dims("mask_logits", "rows", rows, 1)[0], dims("mask_logits", "masks", masks, 2)[1]
    _elementwise.mask_logits(address("mask_logits", "logits", logits, FLOATS),
                             address("mask_logits", "rows", rows, _INT64), n, vocab,
                             address("mask_logits", "masks", masks, _INT32, (n, words)), words,
                             C_DTYPE_CODES[logits.dtype])


# -- _matmul ---------------------------------------------------------------------------

def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight [n, k] (n a multiple of PANEL) laid out as _matmul's panels, in a
    tensor of the same shape: [n / PANEL, k, PANEL] in memory."""
    n, k = dims("pack_panels", "weight", weight, 2)
    weight_at = address("pack_panels", "weight", weight, _FLOAT32)
    if n % PANEL:
        raise ValueError(f"pack_panels: argument 'weight' must have a multiple of {PANEL} rows, got {n}")
    out = torch.empty_like(weight)
    _matmul.pack_panels(weight_at, out.data_ptr(), n, k)
    return out


def panel_linear(x: torch.Tensor, panels: torch.Tensor, threads: int) -> torch.Tensor:
    """x [m, k] times the transpose of a weight [n, k] that ``pack_panels`` laid out, over up
    to ``threads`` of torch's OpenMP workers: float32 [m, n]."""
    m, k = dims("panel_linear", "x", x, 2)
    n = dims("panel_linear", "panels", panels, 2)[0]
    x_at = address("panel_linear", "x", x, _FLOAT32)
    panels_at = address("panel_linear", "panels", panels, _FLOAT32, (n, k))
    out = torch.empty(m, n, dtype=torch.float32)
    if m:
        _matmul.linear(x_at, panels_at, out.data_ptr(), m, n, k, max(1, threads))
    return out


# -- _sampling ------------------------------------------------------------------------

def sample(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           min_p: torch.Tensor, top_p: torch.Tensor, draws: torch.Tensor, out: torch.Tensor, threads: int) -> None:
    """out[rows[r]] = the token drawn from logits row rows[r] with the r-th parameters."""
    k = "sample"
    batch, vocab = dims(k, "logits", logits, 2)
    count = dims(k, "rows", rows, 1)[0]
    one = (count,)
    _sampling.sample(address(k, "logits", logits, FLOATS), address(k, "rows", rows, _INT64), count, vocab,
                     C_DTYPE_CODES[logits.dtype], address(k, "temperature", temperature, _FLOAT32, one),
                     address(k, "top_k", top_k, _INT64, one), address(k, "min_p", min_p, _FLOAT32, one),
                     address(k, "top_p", top_p, _FLOAT32, one), address(k, "draws", draws, _FLOAT64, one),
                     address(k, "out", out, _INT64, (batch,)), threads)


# -- _attention -----------------------------------------------------------------------

def _scales(kernel: str, cache: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None,
            shape: tuple[int, int]) -> tuple[int, int, int]:
    """(key_scales, value_scales, their dim-0 stride) for an int8 ``cache``; zeros otherwise."""
    if cache.dtype != torch.int8:
        if scales is not None:
            raise TypeError(f"{kernel}: argument 'scales' must be None for a {cache.dtype} cache")
        return 0, 0, 0
    if scales is None:
        raise TypeError(f"{kernel}: argument 'scales' must be the key and value scales of an int8 cache, got None")
    key_at, stride = rows_address(kernel, "key_scales", scales[0], _BF16, shape)
    value_at, _ = rows_address(kernel, "value_scales", scales[1], _BF16, shape, stride)
    return key_at, value_at, stride


@dataclass(frozen=True, eq=False)
class DecodeRows:
    """Which rows of a layer's cache ``decode_attention`` reads, and its work's split: the
    same for every layer of a step, so checked once, when made."""

    bases: torch.Tensor  # int64 [batch]: each sequence's first buffer row
    lengths: torch.Tensor  # int64 [batch]: tokens each attends over, its new one included
    slices: torch.Tensor  # int64 [count, 2]: (first, last) work items per call; item = (sequence, KV head)
    batch: int = field(init=False)
    addresses: tuple[int, int, int] = field(init=False)  # bases, lengths, slices

    def __post_init__(self) -> None:
        k = "decode_attention"
        batch = dims(k, "bases", self.bases, 1)[0]
        count = dims(k, "slices", self.slices, 2)[0]
        addresses = (address(k, "bases", self.bases, _INT64), address(k, "lengths", self.lengths, _INT64, (batch,)),
                     address(k, "slices", self.slices, _INT64, (count, 2)))
        object.__setattr__(self, "batch", batch)
        object.__setattr__(self, "addresses", addresses)


def decode_attention(q: torch.Tensor, new_kv: tuple[torch.Tensor, torch.Tensor] | None, keys: torch.Tensor,
                     values: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None, rows: DecodeRows,
                     scale: float, widest: int) -> torch.Tensor:
    """Attention of q [batch, heads, dim] (one token per sequence; the output likewise) over
    one layer's contiguous keys/values [kv_heads, capacity, dim] (int8: with their bf16
    ``scales``, [kv_heads, capacity] each), at ``rows``; ``new_kv`` [batch, kv_heads, dim]
    each (in the cache's dtype; an int8 cache's in q's) written at row lengths[i] - 1 first."""
    k = "decode_attention"
    batch, heads, dim = shape = dims(k, "q", q, 3)
    kv_heads, capacity, kv_dim = cache_shape = dims(k, "keys", keys, 3)
    if kv_dim != dim or not isinstance(rows, DecodeRows) or rows.batch != batch:
        got = f"{rows.batch} sequences' DecodeRows" if isinstance(rows, DecodeRows) else type(rows).__name__
        raise ValueError(f"{k}: q {list(shape)} needs keys [kv_heads, capacity, {dim}] and DecodeRows of {batch} "
                         f"sequences, got keys {list(cache_shape)} and {got}")
    q_at = address(k, "q", q, FLOATS)
    keys_at = address(k, "keys", keys, _CACHES)
    values_at = address(k, "values", values, (keys.dtype,), cache_shape)
    key_scales, value_scales, scale_stride = _scales(k, keys, scales, (kv_heads, capacity))
    new_keys = new_values = 0
    if new_kv is not None:
        new_dtype, new_shape = (q.dtype if keys.dtype == torch.int8 else keys.dtype,), (batch, kv_heads, dim)
        new_keys = address(k, "new_keys", new_kv[0], new_dtype, new_shape)
        new_values = address(k, "new_values", new_kv[1], new_dtype, new_shape)
    bases_at, lengths_at, slices_at = rows.addresses
    kv_code = INT8 if keys.dtype == torch.int8 else C_DTYPE_CODES[keys.dtype]
    out = torch.empty_like(q)
    out_at = out.data_ptr()

    def call(first: int, number: int) -> None:  # slices first..first+number-1
        _attention.decode_attention(q_at, out_at, new_keys, new_values, keys_at, values_at, key_scales, value_scales,
                                    bases_at, lengths_at, slices_at + first * _SLICE_BYTES, number, heads, kv_heads,
                                    dim, capacity * dim, scale_stride, kv_code, C_DTYPE_CODES[q.dtype], scale, widest)

    thread_policy.run_slices(call, rows.slices.shape[0])
    return out


def _packed_shapes(kv_heads: int, length: int, dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    key_words, value_words = _attention.packed_kv_words(length, dim)
    return (kv_heads, key_words), (kv_heads, value_words)


def pack_kv(keys: torch.Tensor, values: torch.Tensor,
            scales: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys/values [kv_heads, length, dim] (bf16, or int8 with bf16 ``scales``
    [kv_heads, length]; KV heads any distance apart) packed for ``prefill_attention``."""
    k = "pack_kv"
    kv_heads, length, dim = shape = dims(k, "keys", keys, 3)
    keys_at, head_stride = rows_address(k, "keys", keys, (torch.bfloat16, torch.int8), shape)
    values_at, _ = rows_address(k, "values", values, (keys.dtype,), shape, head_stride)
    key_scales, value_scales, scale_stride = _scales(k, keys, scales, (kv_heads, length))
    key_shape, value_shape = _packed_shapes(kv_heads, length, dim)
    packed = torch.empty(*key_shape, dtype=torch.int32), torch.empty(*value_shape, dtype=torch.int32)
    _attention.pack_kv(keys_at, values_at, key_scales, value_scales, packed[0].data_ptr(), packed[1].data_ptr(),
                       length, kv_heads, dim, head_stride, scale_stride)
    return packed


def prefill_attention(q: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], start: int, scale: float,
                      slices: torch.Tensor) -> torch.Tensor:
    """Causal attention of q (bf16 [n, heads, dim]; the output likewise) at positions
    start.. over the first start + n tokens, as ``pack_kv`` packed them."""
    k = "prefill_attention"
    n, heads, dim = dims(k, "q", q, 3)
    q_at = address(k, "q", q, _BF16)
    kv_heads = dims(k, "packed_keys", packed[0], 2)[0]
    key_shape, value_shape = _packed_shapes(kv_heads, start + n, dim)
    keys_at = address(k, "packed_keys", packed[0], _INT32, key_shape)
    values_at = address(k, "packed_values", packed[1], _INT32, value_shape)
    count = dims(k, "slices", slices, 2)[0]
    slices_at = address(k, "slices", slices, _INT64, (count, 2))
    out = torch.empty_like(q)
    out_at = out.data_ptr()

    def call(first: int, number: int) -> None:  # slices first..first+number-1
        _attention.prefill_attention(q_at, out_at, keys_at, values_at, start, n, heads, kv_heads, dim, scale,
                                     slices_at + first * _SLICE_BYTES, number)

    thread_policy.run_slices(call, count)
    return out
