"""How many micro-batches Tier 1 keeps in flight, from what their steps measure.

A micro-batch's step is a chain of compute (each stage's share of the merged jobs) and
waits (Tier 2 round trips, and with several stages the way down and back). The busiest
stage never waits once the micro-batches in flight cover one whole chain in its compute
time: 1 + (round trip + Tier 2 time) / Tier 1 time with one stage, as DESIGN.md says;
generally, the chain's length over the busiest stage's compute. More than that would only
cut each micro-batch's batch smaller.
"""

from __future__ import annotations

import math
from collections import deque

MOST_IN_FLIGHT = 16  # the automatic count's ceiling
WINDOW_STEPS = 32  # steps the estimate is taken over (the latest, from every micro-batch)


class Pacer:
    """``fixed``: a count given by hand; None: the count follows the measurements, never below
    ``least`` (one a stage, or no stage would ever compute while another waits)."""

    def __init__(self, fixed: int | None, least: int = 1):
        self.fixed, self.least = fixed, max(1, least)
        self.most = fixed if fixed is not None else max(MOST_IN_FLIGHT, self.least)
        self.count = fixed if fixed is not None else self.least + 1
        self._steps: deque[tuple[float, float]] = deque(maxlen=WINDOW_STEPS)  # (chain seconds, busiest compute)

    def at_least(self, least: int) -> None:
        """The pipeline's stage count, once known: that many micro-batches at the least."""
        self.least = max(1, least)
        if self.fixed is None:
            self.most = max(self.most, self.least)
            self.count = max(self.count, self.least + 1)

    def record(self, stages: list) -> None:
        """One step's (compute seconds, waiting seconds, ...) at each stage, the first stage's first."""
        if self.fixed is not None or not stages:
            return
        self._steps.append((sum(s[0] + s[1] for s in stages), max(s[0] for s in stages)))
        chain, busiest = (sum(values) for values in zip(*self._steps))
        if busiest > 0:
            self.count = min(self.most, max(self.least, math.ceil(chain / busiest)))
