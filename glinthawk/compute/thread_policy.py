"""How the attention paths split one kernel call's work over the process's threads, and our
own pool where torch's OpenMP threads are not ours.

How many threads a process has, and whose they are, is ``glinthawk.threads``. The C
kernels run their slices on torch's own OpenMP threads where ``threads.hook_openmp`` found
torch's libgomp: those threads are still spinning after the matmul before, and a thread of
ours would have to wait for the core one of them holds. Elsewhere each slice is one call on
a pool of our own.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from glinthawk.threads import hook_openmp

try:
    from glinthawk.compute import _attention
except ImportError:  # built at install time when a C compiler is present
    _attention = None


# Whether the C kernels run all their slices in one call, on torch's OpenMP threads.
OPENMP = hook_openmp(_attention)

# Below this many (cached token x KV head) reads a decode batch is too small to be worth
# handing to several threads: cheap on torch's still-spinning OpenMP threads, dearer on a
# pool of our own, which must wake a thread (measured in docs/PERFORMANCE.md).
FUSED_PARALLEL_MIN_WORK = 1 << 10 if OPENMP else 1 << 15
# Likewise for a prefill chunk, in (position block x KV head x visible key) units: about a
# 256-token prompt, below which handing half to another thread costs more than it saves.
PREFILL_PARALLEL_MIN_WORK = 1 << 13


def balanced_slices(work: torch.Tensor, serial_below: int = 0) -> torch.Tensor:
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


def run_slices(run: Callable[[int, int], None], count: int) -> None:
    """``run(first, n)``, a C kernel's call over ``n`` of its ``count`` (first, last)
    work-item slices (``balanced_slices``) from slice ``first``: all in one call where the
    kernels have torch's OpenMP threads, else one call per slice, over our own threads."""
    if count == 1 or OPENMP:
        run(0, count)
    else:
        in_parallel(lambda row: run(row, 1), [(row,) for row in range(count)])


def in_parallel(fn: Callable[..., None], slices: list[tuple]) -> None:
    """``fn(*args)`` for each of ``slices``: the first on this thread, the others on a pool."""
    pending = [_pool(len(slices) - 1).submit(fn, *args) for args in slices[1:]] if len(slices) > 1 else []
    fn(*slices[0])
    for future in pending:
        future.result()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode-attention")
