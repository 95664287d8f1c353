"""GNU OpenMP's spin-wait for nodes that share a machine's cores.

After each parallel region libgomp's workers spin ``GOMP_SPINCOUNT`` rounds before they
sleep. The default (``LIBGOMP_SPIN_ROUNDS``, about 1 ms) keeps a Tier 1's workers awake
through one layer's round trip to Tier 2, so glinthawk leaves it alone. But a spinning
worker holds a core, and ``glinthawk run`` starts all its nodes on one machine:
``LocalCluster.spin_rounds_for`` gives ``SHARED_CORES_SPIN_ROUNDS`` to a node whose waiting
workers would hold cores the other nodes need, unless the user set the spin-wait.

The C kernels (attention, sampling) run on torch's own OpenMP workers (``torch_openmp``).
Where torch's libgomp cannot be found, they run on threads of their own, which wait for a
spinning worker's core: set ``GOMP_SPINCOUNT=10000`` yourself in that case. The
measurements behind these choices are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

LIBGOMP_SPIN_ROUNDS = 300_000  # libgomp's own default, with GOMP_SPINCOUNT unset
SHARED_CORES_SPIN_ROUNDS = 10_000  # still bridges the gaps between back-to-back torch ops
_USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def child_spin_env(rounds: int) -> dict[str, str]:
    """Environment for a child process whose workers should spin ``rounds``: nothing where
    that is libgomp's default, or where the user chose the spin-wait (``GOMP_SPINCOUNT``,
    ``OMP_WAIT_POLICY``), which the child inherits."""
    if rounds == LIBGOMP_SPIN_ROUNDS or any(name in os.environ for name in _USER_SETTINGS):
        return {}
    return {"GOMP_SPINCOUNT": str(rounds)}


@functools.cache
def torch_openmp() -> tuple[int, int, int] | None:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` in
    the GNU OpenMP runtime torch loaded (for the C kernels' ``use_openmp``), or None: not
    Linux, no libgomp, or more than one."""
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
