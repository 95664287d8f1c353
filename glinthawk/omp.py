"""GNU OpenMP's spin-wait for nodes that share a machine's cores.

After each parallel region libgomp's worker threads spin for ``GOMP_SPINCOUNT`` rounds
before they sleep: 300,000 by default (``LIBGOMP_SPIN_ROUNDS``), about 1 ms on the
2-core AMD EPYC this was measured on. That suits a Tier 1 waiting for one layer's round
trip to Tier 2 with one micro-batch in flight: its workers are still awake when the next
layer stage starts. Interleaved A/B of two-tier loopback runs (bf16, batch 64, one Tier 2
node): 10,000 -> 100,000 rounds gave +7.7%; 100,000 -> the default +1.3% on average over
eight runs in both orders (-2.1% to +4.5%: the noise), a round trip now taking about
0.5 ms. glinthawk used to set 100,000 in its own process at import; it now leaves the
default alone. Single-process decode and prefill do not move with it (10,000 to 300,000
rounds alike), nor does the in-process latency suite.

A spinning worker holds a core, though, and ``glinthawk run`` starts all its nodes on one
machine. ``LocalCluster.spin_rounds_for`` gives ``SHARED_CORES_SPIN_ROUNDS`` to a node
whose waiting workers would hold cores the other nodes need (Tier 1 beside 2 or 3 Tier 2
nodes on 2 cores: its frames otherwise waited behind its spinning worker, 2.7-3.6%
slower), passed to the child as ``GOMP_SPINCOUNT`` unless the user set one.

The C kernels (attention, sampling) run on torch's own OpenMP workers (``torch_openmp``).
Where they cannot find torch's libgomp (another OpenMP runtime, or two copies of libgomp
loaded), the sampler runs on the calling thread alone and attention falls back to Python
threads of its own, which wait for a spinning worker's core: a prefill of two 2048-token
prompts spent 359 ms in attention at 300,000 rounds against 230 at 10,000. Set
``GOMP_SPINCOUNT=10000`` yourself in that case.
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
