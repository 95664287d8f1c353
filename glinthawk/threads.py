"""Thread policy: how many threads each glinthawk process computes with, on which thread
Tier 1 computes, and how long OpenMP workers spin-wait. Everything else asks here.

- A node takes ``--threads`` (``use_threads``); ``glinthawk run`` starts all its nodes on
  one machine and gives each a share of its cores (``CoreShares``).
- libgomp's workers spin ``GOMP_SPINCOUNT`` rounds after each parallel region before they
  sleep. The default (``LIBGOMP_SPIN_ROUNDS``, about 1 ms) keeps a Tier 1's workers awake
  through one layer's round trip to Tier 2, so glinthawk leaves it alone, except for a
  ``glinthawk run`` node whose spinning workers would hold cores the other nodes need;
  a spin-wait the user set always wins.
- The C kernels (attention, sampling) run on torch's own OpenMP workers (``hook_openmp``):
  those are still spinning after the matmul before. Where torch's libgomp cannot be found
  they run on threads of their own, which wait for a spinning worker's core: set
  ``GOMP_SPINCOUNT=10000`` yourself in that case.

How one kernel call splits its work over the threads is ``compute/thread_policy.py``. The
measurements behind these choices are in docs/PERFORMANCE.md. torch is imported only where
a function needs it: the supervisor of ``glinthawk run`` never loads it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass

LIBGOMP_SPIN_ROUNDS = 300_000  # libgomp's own default, with GOMP_SPINCOUNT unset
SHARED_CORES_SPIN_ROUNDS = 10_000  # still bridges the gaps between back-to-back torch ops
_USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what a child process's torch starts with


def use_threads(threads: int, children: bool = False) -> None:
    """Torch threads in this process; with ``children``, also (through ``THREAD_VARIABLES``) in
    every process it starts from now on."""
    import torch

    torch.set_num_threads(threads)
    if children:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(threads)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def computes_on_own_thread(device_type: str) -> bool:
    """Whether Tier 1 computes on a thread of its own rather than the event loop's: on CUDA,
    so the loop moves frames while the GPU works. Not on the CPU: torch's libgomp gives
    every thread that starts parallel work a team of workers of its own, and with more
    workers than cores it cuts their spin-wait short, so a second computing thread slows
    every stage."""
    return device_type != "cpu"


@dataclass(frozen=True)
class CoreShares:
    """Torch threads and spin-wait for each node of a ``LocalCluster``: all of them share this
    machine's cores. ``in_flight``: Tier 1's micro-batches (None: it measures the count);
    ``tier1_threads``: Tier 1's threads where they are given (the planner's loopback check
    models one thread a process)."""

    stages: int
    tier2_nodes: int
    in_flight: int | None
    tier1_threads: int | None = None

    def threads_for(self, name: str) -> int:
        """Torch threads for node ``name``.

        A pool of full width in every node would oversubscribe the cores, and spinning pools
        slow every node several times over, so each Tier 2 node gets an equal share. With one
        stage Tier 1, whose matmuls are most of the work, gets every core whatever the number
        in flight: with one the tiers take turns (measured with 1 Tier 2 node on 2 cores, bf16:
        0.49 of the single process against 0.39 with 1 thread each); with several, Tier 2's
        attention at ordinary contexts is brief beside Tier 1's work (batch 128 on 2 cores and
        2 Tier 2 nodes, 10 ms delay, 4 in flight: 358 tok/s against 297 with a share).
        """
        cores = os.cpu_count() or 1
        if name == "tier1" and self.tier1_threads:
            return self.tier1_threads
        if name == "tier1" and self.stages == 1:
            return cores
        return max(1, cores // (self.stages * (self.tier2_nodes + 1)))

    def concurrent_stages(self) -> int:
        """How many Tier 1 stages compute at once on these cores: the cores over a stage's threads."""
        return max(1, min(self.stages, (os.cpu_count() or 1) // self.threads_for("tier1")))

    def spin_rounds_for(self, name: str) -> int:
        """libgomp spin-wait rounds for node ``name``.

        While a node waits for the others, its OpenMP workers spin on all but one of its
        threads' cores. libgomp's long default keeps them awake for its next stage where the
        nodes working meanwhile fit on the cores left; where they do not, they would wait for
        the spinning workers.
        """
        cores = os.cpu_count() or 1
        others = (self.tier2_nodes * self.threads_for("tier2") if name == "tier1"
                  else self.threads_for("tier1"))
        held = self.threads_for(name) - 1
        return LIBGOMP_SPIN_ROUNDS if others <= cores - held else SHARED_CORES_SPIN_ROUNDS

    def env_for(self, name: str) -> dict[str, str]:
        """Node ``name``'s environment: this one, with its spin-wait (unless the user set one)."""
        return {**os.environ, **child_spin_env(self.spin_rounds_for(name))}


def child_spin_env(rounds: int) -> dict[str, str]:
    """Environment for a child process whose workers should spin ``rounds``: nothing where
    that is libgomp's default, or where the user chose the spin-wait (``GOMP_SPINCOUNT``,
    ``OMP_WAIT_POLICY``), which the child inherits."""
    if rounds == LIBGOMP_SPIN_ROUNDS or any(name in os.environ for name in _USER_SETTINGS):
        return {}
    return {"GOMP_SPINCOUNT": str(rounds)}


def hook_openmp(extension) -> bool:
    """Hand a C kernel module (``use_openmp``, ``_openmp.h``) torch's OpenMP runtime, so that it
    runs its slices on torch's workers; False where there is no module or no runtime to hand."""
    entries = torch_openmp() if extension is not None else None
    if entries is None:
        return False
    extension.use_openmp(*entries)
    return True


@functools.cache
def torch_openmp() -> tuple[int, int, int] | None:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` in
    the GNU OpenMP runtime torch loaded, or None: not Linux, no libgomp, or more than one."""
    import torch

    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().rsplit("/", 1)[-1].startswith("libgomp")}
        if len(paths) != 1:
            return None
        runtime = ctypes.CDLL(paths.pop())
        return tuple(ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value
                     for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
    except (OSError, AttributeError):
        return None
