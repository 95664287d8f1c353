"""Attention over the KV store for a ragged batch (the Tier 2 computation).

A batch packs the new tokens of several sequences: sequence i brings ``counts[i]`` tokens
(1 for decode, more for a prefill chunk) at positions ``starts[i]..starts[i]+counts[i]``.
Each appends its k/v to the store, then attends causally over its own cached past.

GQA without repeating K/V: the ``group`` query heads that share a KV head are folded into
the query-row dimension, so one pass over each KV head's cache serves them all.

Decode rows (one token per sequence) go to the fused C kernel in ``_attention.c``
when it is built and the store is a float32 or bfloat16 CPU store: it reads each cached
K/V row once, at close to memory bandwidth, spread over torch's thread count. The C
kernels run their slices on torch's own OpenMP threads where torch's libgomp can be found
(``omp.torch_openmp``): those threads are still spinning after the matmul before, and a
thread of ours would have to wait for the core one of them holds. When every
row is a decode (the steady state) the kernel also appends the new K/V and takes q and
returns the output in their own dtype, so a step is one call and a few Python lines: Tier
2 runs it once per layer per micro-batch, between which the caches have gone cold.
Otherwise (CUDA, float16, no C compiler at install time) torch ops do the same work.
An int8 store (``KVStore(kv_dtype=torch.int8)``) runs the same kernels on its int8 rows and
their scales (``_kvint8.h``); the torch paths dequantize what they read.

Prompt chunks: short fresh prompts are attended together as one padded batch (their keys
are their own new tokens); longer ones and later chunks go one at a time, to the bf16
prefill kernel in ``_attention.c`` where the CPU has AVX512_BF16, else to SDPA.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glinthawk import omp
from glinthawk.compute.elementwise import C_DTYPE_CODES
from glinthawk.compute.kvcache import KVStore

try:
    from glinthawk.compute import _attention
except ImportError:  # built at install time when a C compiler is present
    _attention = None


# Whether the C kernels run all their slices in one call, on torch's OpenMP threads.
_OPENMP = _attention is not None and (_openmp_entries := omp.torch_openmp()) is not None
if _OPENMP:
    _attention.use_openmp(*_openmp_entries)

# The widest instruction set the kernel may pick (2: AVX512_BF16, 1: AVX-512F, 0: portable
# C); the CPU's support is checked in C. Tests lower it to cover each path.
_KERNEL_WIDEST = 2
# Below this many (cached token x KV head) reads a decode batch is too small to be worth
# handing to several threads: cheap on torch's still-spinning OpenMP threads, dearer on a
# pool of our own, which must wake a thread (measured in docs/PERFORMANCE.md).
_FUSED_PARALLEL_MIN_WORK = 1 << 10 if _OPENMP else 1 << 15
# Likewise for a prefill chunk, in (position block x KV head x visible key) units: about a
# 256-token prompt, below which handing half to another thread costs more than it saves.
_PREFILL_PARALLEL_MIN_WORK = 1 << 13


# On the torch path (no C kernel), CPU decode sequences whose context is at most this long
# are attended together, their K/V gathered into one padded batch: a few large ops instead
# of a few small ones per sequence. Longer contexts are bandwidth-bound, where the gather's
# extra copy would cost more than the per-sequence call overhead it saves. On CUDA every
# decode is batched: there a launch costs more than the gather.
BATCHED_DECODE_MAX_CONTEXT = 512

# Fresh prompts (nothing cached before them) of at most this many tokens are attended
# together, padded into one batch whose keys are their own new tokens: one call per
# short prompt costs more than its math; above 64 tokens the per-prompt C kernel wins.
# Prompts of one length in consecutive rows (a batch of equal prompts) are attended where
# they lie, without the gather (measured in docs/PERFORMANCE.md).
BATCHED_PREFILL_MAX_TOKENS = 64


@dataclass(frozen=True)
class _FusedDecodes:
    """Decode rows served by the C kernel."""

    rows: torch.Tensor | None  # their rows in the batch; None: every row, and the kernel appends their K/V
    bases: torch.Tensor  # int64: each sequence's first buffer row
    lengths: torch.Tensor  # int64: tokens each attends over, its new one included
    slices: torch.Tensor  # int64 [threads, 2]: (first, last) work items per thread; item = (sequence, KV head)


@dataclass(frozen=True)
class _BatchedDecodes:
    """Short decodes gathered into one padded batch (the torch path), index tensors on the store's device."""

    rows: torch.Tensor  # their rows in the batch
    index: torch.Tensor  # store rows to gather, [sequences * longest]; padding re-reads a valid row
    padding: torch.Tensor  # bool [sequences, longest]: True where a position is padding
    longest: int


@dataclass(frozen=True)
class _BatchedPrefills:
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


@dataclass(frozen=True)
class AttentionPlan:
    """Where a batch's tokens sit in the store and how its sequences are grouped, worked out
    once per step and reused by every layer's ``attend_with``: the index tensors (on the
    store's device, so a CUDA step copies them once, not once per layer) and the thread split.
    Making one ``claim``s the batch's rows: checked against each reservation."""

    store: KVStore
    seq_ids: Sequence[object]
    starts: Sequence[int]
    counts: Sequence[int]
    first_rows: list[int]  # each sequence's first row in the batch
    write_rows: torch.Tensor | None  # store rows of the new K/V; None where the decode kernel appends them
    fused: _FusedDecodes | None
    batched: _BatchedDecodes | None
    batched_prefills: _BatchedPrefills | None
    prefills: list[int]  # other sequences with a prompt chunk, attended one at a time
    long_decodes: list[int]  # torch path: decodes attended one at a time, over threads
    layout: int  # the store's compaction count when planned: a compaction moves the slabs the plan points at

    @property
    def tokens(self) -> int:
        return self.first_rows[-1] + self.counts[-1] if self.counts else 0

    @property
    def stale(self) -> bool:
        """Whether the store has compacted (moved its slabs) since this plan was made."""
        return self.store.compactions != self.layout

    def replanned(self) -> AttentionPlan:
        """The same batch planned again over the store as it is now (after a compaction)."""
        return AttentionPlan.of(self.store, self.seq_ids, self.starts, self.counts)

    @classmethod
    def of(cls, store: KVStore, seq_ids: Sequence[object], starts: Sequence[int],
           counts: Sequence[int]) -> AttentionPlan:
        first_rows = list(itertools.accumulate(counts[:-1], initial=0)) if counts else []
        decodes = [i for i, count in enumerate(counts) if count == 1]
        prefills = [i for i, count in enumerate(counts) if count > 1]
        short_prompts = [i for i in prefills if starts[i] == 0 and counts[i] <= BATCHED_PREFILL_MAX_TOKENS]
        batched_prefills = None
        if len(short_prompts) > 1:
            batched_prefills = _batched_prefills([first_rows[i] for i in short_prompts],
                                                 [counts[i] for i in short_prompts], store.keys.device)
            prefills = sorted(set(prefills) - set(short_prompts))
        parts = {"store": store, "seq_ids": seq_ids, "starts": starts, "counts": counts, "first_rows": first_rows,
                 "prefills": prefills, "batched": None, "batched_prefills": batched_prefills, "long_decodes": [],
                 "layout": store.compactions}
        if fused_decode_available(store):
            if counts and len(decodes) == len(counts):  # the steady state: the kernel appends K/V itself
                bases = store.claim(seq_ids, starts, counts)
                fused = _fused_decodes(store, None, bases, starts, range(len(counts)))
                return cls(**parts, write_rows=None, fused=fused)
            rows = store.rows(seq_ids, starts, counts)
            fused = None
            if decodes:
                bases = [store.start_of(seq_ids[i]) for i in decodes]
                fused = _fused_decodes(store, torch.tensor([first_rows[i] for i in decodes]), bases, starts, decodes)
            return cls(**parts, write_rows=rows, fused=fused)
        rows = store.rows(seq_ids, starts, counts)
        on_gpu = store.keys.device.type == "cuda"  # where the gather is cheap and per-sequence launches are not
        short = [i for i in decodes if on_gpu or starts[i] < BATCHED_DECODE_MAX_CONTEXT]
        if len(short) > 1:
            parts["batched"] = _batched_decodes(store, [first_rows[i] for i in short], [seq_ids[i] for i in short],
                                                [starts[i] + 1 for i in short])
            batched = set(short)
            parts["long_decodes"] = [i for i in decodes if i not in batched]
        else:
            parts["long_decodes"] = decodes
        return cls(**parts, write_rows=rows, fused=None)


def _fused_decodes(store: KVStore, rows: torch.Tensor | None, bases: list[int], starts: Sequence[int],
                   decodes: Iterable[int]) -> _FusedDecodes:
    lengths = torch.tensor([starts[i] + 1 for i in decodes], dtype=torch.int64)
    slices = _balanced_slices(lengths.repeat_interleave(store.num_kv_heads), _FUSED_PARALLEL_MIN_WORK)
    return _FusedDecodes(rows, torch.tensor(bases, dtype=torch.int64), lengths, slices)


def _padded(firsts: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of ``lengths[i]`` rows from ``firsts[i]``, padded to the longest: the rows
    [sequences * longest] (padding repeats a run's last row, always valid to read) and a
    bool mask [sequences, longest], True where a position is padding."""
    lens = torch.tensor(lengths)
    positions = torch.arange(max(lengths))
    index = torch.tensor(firsts)[:, None] + torch.minimum(positions[None, :], lens[:, None] - 1)
    return index.reshape(-1), positions[None, :] >= lens[:, None]


def _batched_decodes(store: KVStore, rows: list[int], seq_ids: list[object], lengths: list[int]) -> _BatchedDecodes:
    device = store.keys.device
    index, padding = _padded([store.start_of(s) for s in seq_ids], lengths)
    return _BatchedDecodes(torch.tensor(rows, device=device), index.to(device), padding.to(device), max(lengths))


def _batched_prefills(first_rows: list[int], counts: list[int], device: torch.device) -> _BatchedPrefills:
    longest = max(counts)
    index, padding = _padded(first_rows, counts)
    valid = (~padding.reshape(-1)).nonzero().squeeze(1)
    future = torch.ones(longest, longest, dtype=torch.bool).triu(1)
    first = first_rows[0]
    one_run = (all(count == longest for count in counts)
               and first_rows == list(range(first, first + len(index), longest)))
    return _BatchedPrefills(len(counts), longest, index.to(device), valid.to(device), index[valid].to(device),
                            future.to(device), slice(first, first + len(index)) if one_run else None)


def attend(
    store: KVStore,
    layer: int,
    seq_ids: Sequence[object],
    starts: Sequence[int],
    counts: Sequence[int],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Append k, v and attend. q: [T, heads, D]; k, v: [T, kv_heads, D] -> [T, heads, D].

    For one layer; a step that runs every layer makes one ``AttentionPlan`` and calls ``attend_with``."""
    return attend_with(checked_plan(store, seq_ids, starts, counts, q, k, v), layer, q, k, v)


def checked_plan(store: KVStore, seq_ids: Sequence[object], starts: Sequence[int], counts: Sequence[int],
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionPlan:
    """``AttentionPlan.of``, once q, k and v are checked to carry a row per token: a bad
    batch is refused before the plan claims any of its rows."""
    check_shapes(store, q, k, v, sum(counts))
    return AttentionPlan.of(store, seq_ids, starts, counts)


def attend_with(plan: AttentionPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attend`` for a batch planned once: append k, v to layer ``layer`` and attend."""
    check_shapes(plan.store, q, k, v, plan.tokens)
    if plan.stale:
        raise ValueError("the KV store compacted after this batch was planned: use plan.replanned()")
    store = plan.store
    scale = q.shape[-1] ** -0.5
    if plan.write_rows is None:  # every row is a decode on the C kernel, which appends the K/V
        return _decode_fused(store, layer, plan.fused, q, scale, new_kv=(k, v))
    store.write(layer, plan.write_rows, k, v)
    out = torch.empty_like(q)
    inference = torch.is_inference_mode_enabled()  # thread-local: worker threads must match the caller

    def attend_each(indices: Iterable[int]) -> None:
        with torch.inference_mode(inference):
            for i in indices:
                first, count, start = plan.first_rows[i], plan.counts[i], plan.starts[i]
                out[first:first + count] = _attend_cached(store, layer, plan.seq_ids[i], q[first:first + count],
                                                          start, scale)

    if plan.fused is not None:
        out[plan.fused.rows] = _decode_fused(store, layer, plan.fused, q[plan.fused.rows], scale)
    if plan.batched is not None:
        rows = plan.batched.rows
        out[rows] = _decode_batched(store, layer, plan.batched, q[rows], scale)
    if plan.batched_prefills is not None:
        plan.batched_prefills.put(out, _prefill_batched(plan.batched_prefills, q, k, v, scale))
    attend_each(plan.prefills)  # SDPA and the prefill kernel use every core themselves
    long_decodes = plan.long_decodes
    workers = min(torch.get_num_threads(), len(long_decodes))
    if workers > 1:
        # One small kernel chain per sequence cannot use several cores; several sequences
        # at once can (torch releases the GIL, and each writes only its own rows of out).
        _in_parallel(attend_each, [(long_decodes[w::workers],) for w in range(workers)])
    else:
        attend_each(long_decodes)
    return out


def check_shapes(store: KVStore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int) -> None:
    """Refuse q, k, v that do not fit the store (the C kernels trust their shapes, and a
    Tier 2 node takes them from the network): q [tokens, heads, D], k and v [tokens,
    kv_heads, D] with the store's kv_heads, D and dtype, heads a multiple of kv_heads."""
    kv_heads, dim = store.num_kv_heads, store.head_dim
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 3 or tensor.dtype != store.dtype:
            raise ValueError(f"{name} must be a 3-D {store.dtype} tensor [tokens, heads, head_dim] for this KV "
                             f"store, got {tensor.dtype} of shape {list(tensor.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0] == tokens):
        raise ValueError(f"batch carries {q.shape[0]} query rows for {tokens} tokens")
    if k.shape[1:] != (kv_heads, dim) or v.shape[1:] != (kv_heads, dim):
        raise ValueError(f"k and v must be [tokens, {kv_heads}, {dim}] for this KV store, "
                         f"got {list(k.shape)} and {list(v.shape)}")
    if q.shape[2] != dim or q.shape[1] == 0 or q.shape[1] % kv_heads:
        raise ValueError(f"q must be [tokens, a multiple of {kv_heads} heads, {dim}] for this KV store, "
                         f"got {list(q.shape)}")


def fused_decode_available(store: KVStore) -> bool:
    """Whether decode rows over ``store`` run on the fused C kernel."""
    return (_attention is not None and store.keys.device.type == "cpu" and store.dtype in C_DTYPE_CODES
            and store.head_dim <= 256)  # MAX_DIM in the C file; an int8 store: q, k, v in dtype, K/V as int8


_INT8_CODE = 2  # INT8 in _kernels.h: an int8 store, its rows quantized


def _scale_args(store: KVStore, layer: int) -> tuple[int, int, int]:
    """The C kernels' (key_scales, value_scales, scale_stride) for ``layer``: zeros unless int8."""
    if not store.quantized:
        return 0, 0, 0
    key_scales, value_scales = store.key_scales[layer], store.value_scales[layer]
    return key_scales.data_ptr(), value_scales.data_ptr(), key_scales.stride(0)


def _decode_fused(
    store: KVStore, layer: int, plan: _FusedDecodes, q: torch.Tensor, scale: float,
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
    kv_code = _INT8_CODE if store.quantized else C_DTYPE_CODES[store.dtype]

    def run(slices: int, count: int) -> None:
        _attention.decode_attention(
            query.data_ptr(), out.data_ptr(), 0 if new_keys is None else new_keys.data_ptr(),
            0 if new_values is None else new_values.data_ptr(), keys.data_ptr(), values.data_ptr(), key_scales,
            value_scales, plan.bases.data_ptr(), plan.lengths.data_ptr(), slices, count, heads, kv_heads, dim,
            keys.stride(0), scale_stride, kv_code, C_DTYPE_CODES[query.dtype], scale, _KERNEL_WIDEST)

    _run_slices(run, plan.slices)
    return out.to(q.dtype)


def _prefill_fused_available(q: torch.Tensor) -> bool:
    """Whether a prefill chunk of ``q`` (in the store's dtype, see ``check_shapes``) runs on
    the C kernel: bf16 on a CPU with AVX512_BF16, head_dim a multiple of 32 up to 256 (the
    cache bf16, or int8 dequantized as it is packed)."""
    return (_attention is not None and _KERNEL_WIDEST >= 2 and q.device.type == "cpu"
            and q.dtype == torch.bfloat16 and q.shape[-1] % 32 == 0 and q.shape[-1] <= 256
            and _attention.prefill_supported())


def _attend_cached(store: KVStore, layer: int, seq_id: object, q: torch.Tensor, start: int,
                   scale: float) -> torch.Tensor:
    """``_attend_one`` over the sequence's first ``start + n`` cached tokens. An int8 store's
    prompt chunk goes to the prefill kernel straight from its int8 rows (dequantized as they
    are packed, in one pass); elsewhere an int8 store's rows are dequantized first."""
    length = start + q.shape[0]
    if store.quantized and q.shape[0] > 1 and _prefill_fused_available(q):
        keys, values, key_scales, value_scales = store.stored(layer, seq_id, length)
        return _prefill_fused(q, keys, values, start, scale, key_scales, value_scales)
    keys, values = store.view(layer, seq_id, length)
    return _attend_one(q, keys, values, start, scale)


def _prefill_fused(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float,
                   key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """``_attend_one`` for a prefill chunk on the C kernel: q [n, heads, D] at positions
    start.. over keys/values [kv_heads, start + n, D], views of one sequence's slab (int8:
    with their scales, [kv_heads, start + n] views)."""
    n, heads, dim = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    tiles = -(-length // 64) * 4  # key_tiles() in _attention.c: 16-key tiles, a multiple of 4
    packed_keys = torch.empty(kv_heads, tiles * 16 * dim // 2, dtype=torch.int32)
    packed_values = torch.empty(kv_heads, (length + 1) // 2 * dim, dtype=torch.int32)
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
    _run_slices(run, _balanced_slices((start + torch.arange(blocks) * _attention.PREFILL_POSITIONS + 1)
                                      .repeat(kv_heads), _PREFILL_PARALLEL_MIN_WORK))
    return out


def _balanced_slices(work: torch.Tensor, serial_below: int = 0) -> torch.Tensor:
    """Items 0..len(work)-1 as contiguous (first, last) slices of about equal ``work`` (per
    item), one per torch thread; one slice when the total is below ``serial_below``. As the
    C kernels take them: int64 [slices, 2]."""
    items = len(work)
    workers = min(torch.get_num_threads(), items)
    cumulative = torch.cumsum(work, 0)
    if workers <= 1 or int(cumulative[-1]) < serial_below:
        return torch.tensor([[0, items]], dtype=torch.int64)
    goals = cumulative[-1] * torch.arange(1, workers) // workers
    bounds = torch.searchsorted(cumulative, goals, right=True).tolist()
    return torch.tensor(list(itertools.pairwise([0, *bounds, items])), dtype=torch.int64)


def _run_slices(run: Callable[[int, int], None], slices: torch.Tensor) -> None:
    """``run(slices, count)``, a C kernel's call over (first, last) work-item ``slices``
    (``_balanced_slices``): all in one call where the kernels have torch's OpenMP threads,
    else one call per slice, over our own threads."""
    count = slices.shape[0]
    if count == 1 or _OPENMP:
        run(slices.data_ptr(), count)
    else:
        _in_parallel(lambda row: run(slices[row].data_ptr(), 1), [(row,) for row in range(count)])


def _in_parallel(fn: Callable[..., None], slices: list[tuple]) -> None:
    """``fn(*args)`` for each of ``slices``: the first on this thread, the others on a pool."""
    pending = [_pool(len(slices) - 1).submit(fn, *args) for args in slices[1:]] if len(slices) > 1 else []
    fn(*slices[0])
    for future in pending:
        future.result()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode-attention")


def _decode_batched(store: KVStore, layer: int, plan: _BatchedDecodes, q: torch.Tensor, scale: float) -> torch.Tensor:
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


def _prefill_batched(plan: _BatchedPrefills, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
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


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [n, heads, D] of positions start..start+n over keys/values [kv_heads, start+n, D]."""
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
    if _prefill_fused_available(q):
        return _prefill_fused(q, keys, values, start, scale)
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
