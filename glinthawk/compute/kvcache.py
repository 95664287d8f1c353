"""The Tier 2 KV store: one preallocated slab per sequence, all layers.

Each sequence reserves ``prompt + max_tokens`` token slots up front, as one contiguous
run of a preallocated buffer. Contiguous K/V per sequence is what lets decode attention
read the cache at memory bandwidth with no gather copy. Accounting is in tokens: a
reservation succeeds whenever enough tokens are free in total; if the free room is
fragmented the store compacts itself (moves the live slabs together) first, so callers
never have to reason about fragmentation.

Layout per layer: K and V are ``[kv_heads, capacity_tokens, head_dim]``, so a
sequence's keys for one head are one contiguous ``[length, head_dim]`` matrix.

The store keeps K/V in the model's dtype (``dtype``, what q, k and v arrive in and the
output leaves in) or, with ``kv_dtype=torch.int8``, quantized (``kvquant``): int8 rows plus
one bf16 scale per token and KV head, ``[kv_heads, capacity_tokens]`` per layer beside K and
V. Capacity is counted in tokens either way; ``bytes_per_token`` includes the scales.

Shared prefixes: a sequence may be reserved *on* another one (``reserve(..., prefix=ID)``),
whose slab holds the K/V of its first tokens (a system prompt, few-shot examples, the prompt
of n samples). It then owns only the rows after them: the prefix is stored once, read by
every sequence on it, and freed when the last of them is (``free`` of a prefix still in use
waits for them).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glinthawk.compute import kvquant


# --kv-dtype (Tier 2 nodes and the single-process engine alike): how a store keeps K/V
# (None: in the dtype the model computes in).
KV_STORAGE = {"auto": None, "int8": torch.int8}


def storage_dtype(kv_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a store keeps K/V in for ``--kv-dtype kv_dtype`` with a model computing in ``dtype``."""
    if kv_dtype not in KV_STORAGE:
        raise ValueError(f"--kv-dtype must be one of {', '.join(KV_STORAGE)}, got {kv_dtype!r}")
    return KV_STORAGE[kv_dtype] or dtype


class KVCapacityError(RuntimeError):
    """A reservation asked for more tokens than the store has free."""


class UnknownSequenceError(KeyError):
    """A sequence id that holds no reservation in this store."""


@dataclass(eq=False)
class _Slab:
    key: object  # the sequence id
    start: int
    reserved: int
    filled: int = 0  # high-water mark of written tokens (what compaction must move)
    prefix: _Slab | None = None  # the slab holding this sequence's first tokens (a shared prefix)
    users: int = 0  # sequences reserved on this slab as their prefix
    freed: bool = False  # freed while in use as a prefix: goes when its last user does

    @property
    def offset(self) -> int:
        """Tokens before this slab's first row: its prefix's."""
        return self.prefix.reserved if self.prefix is not None else 0


class KVStore:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_dtype: torch.dtype | None = None,
    ):
        if capacity_tokens <= 0:
            raise ValueError(f"KV capacity must be at least one token, got {capacity_tokens}")
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in (dtype, torch.int8):
            raise ValueError(f"a KV store keeps {dtype} K/V as {dtype} or int8, not {kv_dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.capacity_tokens = capacity_tokens
        self.dtype, self.kv_dtype = dtype, kv_dtype
        # torch.empty does not touch the pages: resident memory grows only as tokens are written.
        shape = (num_layers, num_kv_heads, capacity_tokens, head_dim)
        self.keys = torch.empty(shape, dtype=kv_dtype, device=device)
        self.values = torch.empty(shape, dtype=kv_dtype, device=device)
        # int8: each row's scale (kvquant), [layers, kv_heads, capacity_tokens]; None otherwise.
        self.key_scales = self.value_scales = None
        if self.quantized:
            self.key_scales = torch.empty(shape[:-1], dtype=kvquant.SCALE_DTYPE, device=device)
            self.value_scales = torch.empty(shape[:-1], dtype=kvquant.SCALE_DTYPE, device=device)
        self._slabs: dict[object, _Slab] = {}
        self._free: list[tuple[int, int]] = [(0, capacity_tokens)]  # (start, length), sorted, coalesced
        self.compactions = 0

    # -- accounting -------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.kv_dtype == torch.int8

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype)

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token

    @property
    def free_tokens(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def used_tokens(self) -> int:
        return self.capacity_tokens - self.free_tokens

    @property
    def filled_tokens(self) -> int:
        """Tokens whose K/V have been written (what actually occupies memory)."""
        # list() copies the values in one step under the GIL: safe beside the attention thread.
        return sum(slab.filled for slab in list(self._slabs.values()))

    @property
    def num_sequences(self) -> int:
        return len(self._slabs)

    def __contains__(self, seq_id: object) -> bool:
        slab = self._slabs.get(seq_id)
        return slab is not None and not slab.freed

    def reserved(self, seq_id: object) -> int:
        return self._slab(seq_id).reserved

    # -- reserve / free ---------------------------------------------------------------
    def reserve(self, seq_id: object, tokens: int, prefix: object = None) -> None:
        """Set aside room for ``tokens`` tokens of ``seq_id`` (all layers); with ``prefix``, its
        tokens come after the whole of that (written) sequence's, which it reads but never writes."""
        if seq_id in self._slabs:
            raise ValueError(f"sequence {seq_id!r} already holds a KV reservation")
        if tokens <= 0:
            raise ValueError(f"a reservation needs at least one token, got {tokens}")
        shared = None
        if prefix is not None:
            shared = self._slab(prefix)
            if shared.filled < shared.reserved or shared.freed or shared.prefix is not None:
                raise ValueError(f"sequence {seq_id!r}: prefix {prefix!r} is not a whole written sequence of its own")
        if tokens > self.free_tokens:
            raise KVCapacityError(
                f"KV store full: sequence {seq_id!r} needs {tokens} tokens, {self.free_tokens} of "
                f"{self.capacity_tokens} are free"
            )
        index = self._best_fit(tokens)
        if index is None:
            self._compact()
            index = 0
        start, length = self._free[index]
        if length == tokens:
            del self._free[index]
        else:
            self._free[index] = (start + tokens, length - tokens)
        self._slabs[seq_id] = _Slab(seq_id, start, tokens, prefix=shared)
        if shared is not None:
            shared.users += 1

    def free(self, seq_id: object) -> None:
        slab = self._slab(seq_id)
        slab.freed = True
        if slab.users == 0:
            self._drop(seq_id, slab)

    def _drop(self, seq_id: object, slab: _Slab) -> None:
        del self._slabs[seq_id]
        self._insert_free(slab.start, slab.reserved)
        prefix = slab.prefix
        if prefix is not None:
            prefix.users -= 1
            if prefix.freed and prefix.users == 0:
                self._drop(prefix.key, prefix)

    def prefix_of(self, seq_id: object) -> object:
        """The sequence whose slab holds ``seq_id``'s first tokens, or None."""
        prefix = self._slab(seq_id).prefix
        return None if prefix is None else prefix.key

    def shares(self, seq_id: object) -> bool:
        """Whether ``seq_id`` reads a shared prefix (so its tokens are in two slabs)."""
        return self._slab(seq_id).prefix is not None

    def _best_fit(self, tokens: int) -> int | None:
        best = None
        for i, (_, length) in enumerate(self._free):
            if length >= tokens and (best is None or length < self._free[best][1]):
                best = i
        return best

    def _insert_free(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self._free, (start, length))
        self._free.insert(i, (start, length))
        if i + 1 < len(self._free) and start + length == self._free[i + 1][0]:
            self._free[i] = (start, length + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev_start, prev_length = self._free[i - 1]
            self._free[i - 1] = (prev_start, prev_length + self._free.pop(i)[1])

    def _compact(self) -> None:
        """Slide every slab to the front so all free room is one run at the end."""
        cursor = 0
        for slab in sorted(self._slabs.values(), key=lambda s: s.start):
            if slab.start != cursor and slab.filled:
                src = slice(slab.start, slab.start + slab.filled)
                dst = slice(cursor, cursor + slab.filled)
                # Moving left may overlap the source; clone makes the copy safe.
                for tensor in (self.keys, self.values, self.key_scales, self.value_scales):
                    if tensor is not None:
                        tensor[:, :, dst] = tensor[:, :, src].clone()
            slab.start = cursor
            cursor += slab.reserved
        self._free = [(cursor, self.capacity_tokens - cursor)] if cursor < self.capacity_tokens else []
        self.compactions += 1

    # -- data -------------------------------------------------------------------------
    def _slab(self, seq_id: object) -> _Slab:
        slab = self._slabs.get(seq_id)
        if slab is None or slab.freed:
            raise UnknownSequenceError(f"sequence {seq_id!r} holds no KV reservation")
        return slab

    def claim(self, seq_ids: Sequence[object], starts: Sequence[int], counts: Sequence[int]) -> list[int]:
        """Check tokens start..start+count of each sequence against its reservation, record
        them as written (the high-water mark), and return the buffer row of each sequence's
        token 0 (for one on a prefix, where it would be: its own rows follow at token offset)."""
        slabs = [self._slab(seq_id) for seq_id in seq_ids]
        for seq_id, slab, start, count in zip(seq_ids, slabs, starts, counts):
            offset = slab.offset
            if start < offset or count < 0 or start + count > offset + slab.reserved or slab.users:
                held = f"tokens {offset}..{offset + slab.reserved} after its prefix" if offset else slab.reserved
                raise KVCapacityError(f"sequence {seq_id!r}: tokens {start}..{start + count} exceed its reservation "
                                      f"of {held}" + (" (a prefix in use is read-only)" if slab.users else ""))
        for slab, start, count in zip(slabs, starts, counts):  # all checked: nothing half-recorded
            slab.filled = max(slab.filled, start + count - slab.offset)
        return [slab.start - slab.offset for slab in slabs]

    def rows(self, seq_ids: Sequence[object], starts: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
        """Buffer rows of tokens start..start+count of each sequence, packed in batch order
        (``claim``ed: checked and recorded as written)."""
        bases = [base + start for base, start in zip(self.claim(seq_ids, starts, counts), starts)]
        counts_t = torch.tensor(counts, dtype=torch.int64)
        first = torch.cumsum(counts_t, 0) - counts_t  # index of each sequence's first token in the batch
        offsets = torch.arange(int(counts_t.sum())) - torch.repeat_interleave(first, counts_t)
        return (torch.repeat_interleave(torch.tensor(bases, dtype=torch.int64), counts_t) + offsets).to(self.keys.device)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([tokens, kv_heads, head_dim]) at buffer ``rows`` (from ``rows()``), one copy each
        (an int8 store: quantized, with their scales)."""
        if not self.quantized:
            self.keys[layer].index_copy_(1, rows, k.transpose(0, 1).to(self.dtype))
            self.values[layer].index_copy_(1, rows, v.transpose(0, 1).to(self.dtype))
            return
        for data, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            q, scale = kvquant.quantize(x.transpose(0, 1))
            data[layer].index_copy_(1, rows, q)
            scales[layer].index_copy_(1, rows, scale)

    def start_of(self, seq_id: object) -> int:
        """The first buffer row of ``seq_id``'s own slab (its token 0 unless it is on a prefix)."""
        return self._slab(seq_id).start

    def token_rows(self, seq_id: object, length: int) -> torch.Tensor:
        """Buffer rows of tokens 0..length-1 (int64, on the store's device): the prefix's, then its own."""
        slab = self._slab(seq_id)
        offset = slab.offset
        own = torch.arange(slab.start, slab.start + length - offset)
        if offset:
            own = torch.cat([torch.arange(slab.prefix.start, slab.prefix.start + offset), own])
        return own.to(self.keys.device)

    def stored(self, layer: int, seq_id: object, length: int) -> tuple[torch.Tensor, ...]:
        """The first ``length`` tokens as stored: keys and values, [kv_heads, length, head_dim]
        views, and for an int8 store their scales, [kv_heads, length] views (a sequence on a
        prefix: ``view`` or ``token_rows``, as its tokens are in two slabs)."""
        slab = self._slab(seq_id)
        if slab.prefix is not None:
            raise ValueError(f"sequence {seq_id!r} reads a shared prefix: its tokens are not one slab")
        if length > slab.filled:
            raise ValueError(f"sequence {seq_id!r}: asked for {length} cached tokens, only {slab.filled} written")
        rows = slice(slab.start, slab.start + length)
        if self.quantized:
            return (self.keys[layer, :, rows], self.values[layer, :, rows], self.key_scales[layer, :, rows],
                    self.value_scales[layer, :, rows])
        return self.keys[layer, :, rows], self.values[layer, :, rows]

    def view(self, layer: int, seq_id: object, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` tokens in ``dtype``: two [kv_heads, length,
        head_dim] views (an int8 store, or a sequence on a shared prefix: copies)."""
        slab = self._slab(seq_id)
        if slab.prefix is not None:
            if length - slab.offset > slab.filled:
                raise ValueError(f"sequence {seq_id!r}: asked for {length} cached tokens, only "
                                 f"{slab.offset + slab.filled} written")
            return self.gather(layer, self.token_rows(seq_id, length))
        parts = self.stored(layer, seq_id, length)
        if not self.quantized:
            return parts
        keys, values, key_scales, value_scales = parts
        return kvquant.dequantize(keys, key_scales, self.dtype), kvquant.dequantize(values, value_scales, self.dtype)

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of buffer rows ``index`` in ``dtype``: two [kv_heads, len(index), head_dim] copies."""
        keys, values = self.keys[layer].index_select(1, index), self.values[layer].index_select(1, index)
        if not self.quantized:
            return keys, values
        return (kvquant.dequantize(keys, self.key_scales[layer].index_select(1, index), self.dtype),
                kvquant.dequantize(values, self.value_scales[layer].index_select(1, index), self.dtype))


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """Bytes of K and V (with an int8 store's scales) one token occupies across all layers."""
    row = kvquant.row_bytes(head_dim) if kv_dtype == torch.int8 else head_dim * kv_dtype.itemsize
    return 2 * num_layers * num_kv_heads * row
