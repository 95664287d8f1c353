"""GNU OpenMP's spin-wait, set before torch loads it.

After each parallel region libgomp's worker threads spin for ``GOMP_SPINCOUNT`` rounds
(300,000 by default: milliseconds) before they sleep. 100,000 rounds (about 0.3 ms here)
bridge a Tier 1's wait for one layer's round trip to Tier 2 with one micro-batch in
flight, so its workers are awake when the next layer stage starts: interleaved A/B of
two-tier loopback runs (2 AMD EPYC cores, bf16, batch 64, one Tier 2 node), 10,000 ->
100,000 rounds gave +7.7%; 30,000 rounds did nothing. A worker spinning longer holds a
core that another process on the same machine may want, which is why it is not the
default's milliseconds. ``glinthawk run`` starts all its nodes on one machine and gives
each process the spin that suits it there (``LocalCluster.spin_rounds_for``):
``SHARED_CORES_SPIN_ROUNDS`` where the other nodes need the cores its waiting workers
would hold.

Single-process decode and prefill do not move with it (10,000 to 300,000 rounds alike:
batch-128 decode 3443-3515 tok/s, a prefill of two 2048-token prompts 952-995 ms), now
that the C attention kernels run on torch's own OpenMP threads. Where torch's libgomp
cannot be found they fall back to Python threads of their own (``attention._run_slices``),
which have to wait for a spinning worker's core: that prefill's attention took 359 ms at
300,000 rounds against 230 at 10,000.
"""

from __future__ import annotations

import os
import sys

SPIN_ROUNDS = 100_000
SHARED_CORES_SPIN_ROUNDS = 10_000  # still bridges the gaps between back-to-back torch ops
_USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
_set_here = False  # GOMP_SPINCOUNT in this environment is glinthawk's, not the user's


def shorten_spin_wait() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the user set it or ``OMP_WAIT_POLICY``; True if set.

    libgomp reads its environment once, when it is loaded with torch: a process that
    imported torch before glinthawk keeps the default."""
    global _set_here
    if "torch" in sys.modules or any(name in os.environ for name in _USER_SETTINGS):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_ROUNDS)
    _set_here = True
    return True


def child_spin_env(rounds: int) -> dict[str, str]:
    """Environment for a child process whose workers should spin ``rounds``: nothing where
    the user chose the spin-wait (``OMP_WAIT_POLICY``, or a ``GOMP_SPINCOUNT`` of their own)."""
    if "OMP_WAIT_POLICY" in os.environ or ("GOMP_SPINCOUNT" in os.environ and not _set_here):
        return {}
    return {"GOMP_SPINCOUNT": str(rounds)}
