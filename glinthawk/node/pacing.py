"""How many micro-batches Tier 1 keeps in flight, from what their steps measure.

A micro-batch's step is a chain of compute (each stage's share of the merged jobs) and
waits (Tier 2 round trips, and with several stages the way down and back). With micro-batches
of a fixed size, the busiest stage never waits once they cover one whole chain in its compute
time: 1 + (round trip + Tier 2 time) / Tier 1 time with one stage, as DESIGN.md says. But
when the sequences are fewer than the micro-batches could hold (a batch of 128, or KV room
running short), another micro-batch only cuts the others smaller: their compute shrinks, the
waits do not. So the count is the one whose predicted rate, with each micro-batch holding its
share of the sequences, is best; the fewest within SPLIT_TOLERANCE of it, since each split
also costs smaller matmuls and a step's fixed work, which the prediction leaves out.

The prediction cannot see everything: where Tier 2 computes on Tier 1's own cores (loopback),
its attention looks like a wait that another micro-batch would hide, yet cannot run beside
Tier 1. So the pacer also measures the tokens per second each count gets (``Measured``),
leaves a count only once it is measured, tries one fewer where the waits are shorter than
the compute, and between two counts both measured moves only to the better one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

MOST_IN_FLIGHT = 16  # the automatic count's ceiling
WINDOW_STEPS = 32  # steps the estimate is taken over (the latest, from every micro-batch)
SETTLED_STEPS = 8  # steps measured at a count before it is judged
SPLIT_TOLERANCE = 0.15  # see the module docstring; measured in docs/PERFORMANCE.md ("Delay at ordinary batch sizes")
MEASURED_GAIN = 0.05  # more micro-batches must measure this much faster to be taken; less is noise on shared cores
MEASURED_FOR = 256  # steps a measured rate stays comparable, at most (the run changes under it)
SUPPLY_DRIFT = 0.25  # ... and while the sequences available stay within this fraction of what they were
MIX_DRIFT = 0.15  # ... and the tokens a row (prompt chunks against decodes) within this fraction


@dataclass
class Measured:
    """Tokens per second measured at one count, and what the run looked like then."""

    rate: float
    available: int
    mix: float  # tokens per row: a step of prompt chunks does more per row than decodes
    at: int  # the step it was taken at

    def comparable(self, now: "Measured") -> bool:
        return (now.at - self.at <= MEASURED_FOR and abs(now.available - self.available) <= SUPPLY_DRIFT * self.available
                and abs(now.mix - self.mix) <= MIX_DRIFT * self.mix)


class Pacer:
    """``fixed``: a count given by hand; None: the count follows the measurements, never below
    ``least`` (one a stage, or no stage would ever compute while another waits). ``concurrent``:
    where the stages share a machine's cores, how many compute at once (None: all of them); no
    more micro-batches than that are needed to keep the cores busy, and the shared cores, not
    the busiest stage, set the pace."""

    def __init__(self, fixed: int | None, least: int = 1, clock: Callable[[], float] = time.perf_counter,
                 concurrent: int | None = None):
        self.fixed, self.least, self.clock, self.concurrent = fixed, max(1, least), clock, concurrent
        self.most = fixed if fixed is not None else max(MOST_IN_FLIGHT, self.least)
        self.count = fixed if fixed is not None else self.least + 1
        # per step: (compute along the chain, waits along it, the busiest stage's compute, tokens, rows, when)
        self._steps: deque[tuple[float, float, float, int, int, float]] = deque(maxlen=WINDOW_STEPS)
        self._decided = False  # the start count is a guess: the first judgement is not held to it
        self.basis = "nothing measured"  # what the latest change of count was judged from (for the log)
        self.measured: dict[int, Measured] = {}  # the latest rate measured at each count
        self._recorded = self._since_change = 0
        self._tried: dict[int, int] = {}  # when each count was last tried as one fewer
        self._trying_from: int | None = None  # the count a try of one fewer came from

    def at_least(self, stages: int) -> None:
        """The pipeline's stage count, once known: that many micro-batches at the least (as many as
        compute at once, where the stages share cores)."""
        self.least = max(1, min(stages, self.concurrent or stages))
        if self.fixed is None:
            self.most = max(self.most, self.least)
            self.count = max(self.count, self.least + 1)

    def record(self, stages: list, tokens: int, available: int, max_rows: int, rows: int | None = None) -> None:
        """One step: its (compute seconds, waiting seconds, ...) at each stage, the first stage's
        first, its ``tokens`` and ``rows`` (sequences; compute per token is alike in prompt chunks
        and decodes, so the prompts a run starts with do not inflate a decode's estimate);
        ``available``: the sequences Tier 1 could run now (running and waiting), ``max_rows``:
        what one micro-batch may hold."""
        if self.fixed is not None or not stages or tokens < 1:
            return
        self._recorded += 1
        self._since_change += 1
        self._steps.append((sum(s[0] for s in stages), sum(s[1] for s in stages), max(s[0] for s in stages), tokens,
                            rows or tokens, self.clock()))
        chain_compute, waits, busiest, total_tokens, _, _ = (sum(values) for values in zip(*self._steps))
        steps = len(self._steps)
        if busiest <= 0 or steps < SETTLED_STEPS:
            return
        now = self._measure(max(available, 1))
        if self.concurrent:  # stages on shared cores go no faster than their compute spread over them
            busiest = max(busiest, chain_compute / self.concurrent)
        predicted = best_count(busiest / total_tokens, chain_compute / total_tokens, waits / steps, max(available, 1),
                               max_rows, self.least, self.most, current=self.count if self._decided else None)
        count, basis = self._judge(predicted, now, unexplained=waits < busiest, first=not self._decided)
        self._decided = True
        if count != self.count:  # judged afresh at the new count: what a step waits depends on it
            where = "the busiest stage or the shared cores" if self.concurrent else "the busiest stage"
            self.basis = basis or (f"a step of {total_tokens / steps:.0f} tokens: {busiest / steps * 1e3:.1f} ms "
                                   f"compute at {where}, {waits / steps * 1e3:.1f} ms waiting")
            self.count = count
            self._steps.clear()
            self._since_change = 0

    def _measure(self, available: int) -> Measured | None:
        """Tokens per second at the current count, over the steps since it settled: the first two
        rounds after a change regroup the sequences and refill the pipeline, and measure neither count."""
        usable = min(len(self._steps), self._since_change - 2 * self.count)
        if usable < max(SETTLED_STEPS, 2 * self.count):
            return None
        recent = list(self._steps)[-usable:]
        seconds = recent[-1][5] - recent[0][5]
        if seconds <= 0:
            return None
        tokens, rows = sum(step[3] for step in recent[1:]), sum(step[4] for step in recent)
        measured = Measured(tokens / seconds, available, sum(step[3] for step in recent) / rows, self._recorded)
        self.measured[self.count] = measured
        return measured

    def _judge(self, predicted: int, now: Measured | None, unexplained: bool, first: bool) -> tuple[int, str]:
        """The count to run next, and why (empty: as predicted). Where both counts were measured,
        the count moves only to one that measured better (``_better``). One fewer is tried only
        where the waits are shorter than the compute (``unexplained``): there they may be work on
        this machine's cores; waits longer than that are the network, where a try only costs."""
        if self._trying_from is not None:
            if now is None:
                return self.count, ""  # trying one fewer: not measured yet
            before, self._trying_from = self._trying_from, None
            if self._known(before, now) and self._better(before):
                return before, self._why(before)
        if predicted != self.count:
            if now is None:  # after the start guess, a count is measured before it is left
                return (predicted, "") if first else (self.count, "")
            if self._known(predicted, now):
                return (predicted, "") if self._better(predicted) else (self.count, "")
            return predicted, ""
        fewer = self.count - 1
        if now is None or fewer < self.least:
            return self.count, ""
        if self._known(fewer, now):
            return (fewer, self._why(fewer)) if self._better(fewer) else (self.count, "")
        if not unexplained or self._recorded - self._tried.get(fewer, -MEASURED_FOR) < MEASURED_FOR:
            return self.count, ""
        self._tried[fewer], self._trying_from = self._recorded, self.count
        return fewer, f"trying one fewer ({now.rate:.0f} tokens/s measured at {self.count})"

    def _known(self, count: int, now: Measured) -> bool:
        return count in self.measured and self.measured[count].comparable(now)

    def _better(self, other: int) -> bool:
        """Whether ``other`` micro-batches measured better than the current count: more only where
        ``MEASURED_GAIN`` faster, fewer where at least as fast. Between the two the count stays,
        so measurements within noise of each other never send it round in a circle."""
        mine, theirs = self.measured[self.count].rate, self.measured[other].rate
        return theirs >= (1 + MEASURED_GAIN) * mine if other > self.count else theirs >= mine

    def _why(self, chosen: int) -> str:
        return (f"measured {self.measured[chosen].rate:.0f} tokens/s at {chosen}, "
                f"{self.measured[self.count].rate:.0f} at {self.count}")


def best_count(busiest_per_row: float, chain_per_row: float, wait: float, available: int, max_rows: int,
               least: int, most: int, tolerance: float = SPLIT_TOLERANCE, current: int | None = None) -> int:
    """The fewest micro-batches in ``least..most`` whose predicted rows per second are within
    ``tolerance`` of the best count's; from a ``current`` count above that, down only to the
    fewest within half the tolerance (a change regroups the running sequences). With ``m``
    in flight each holds ``r`` rows (its share of ``available``, at most ``max_rows``); a round
    takes the longer of the busiest stage's compute for all of them and one micro-batch's chain
    (its compute along it plus ``wait``)."""
    def rate(m: int) -> float:
        running = min(m, available)  # more micro-batches than sequences leaves some empty
        rows = min(max_rows, available / running)
        return running * rows / max(running * rows * busiest_per_row, rows * chain_per_row + wait, 1e-12)

    rates = {m: rate(m) for m in range(least, most + 1)}
    best = max(rates.values())
    fewest = next(m for m, value in rates.items() if value >= (1 - tolerance) * best)
    if current not in rates or current <= fewest:
        return fewest
    # fewer only where they are clearly good enough: half the tolerance, so that estimates
    # near the boundary do not move the count (and regroup the sequences) back and forth
    return min(current, next(m for m, value in rates.items() if value >= (1 - tolerance / 2) * best))


def regroup_moves(sizes: list[int], count: int, index: int) -> list[tuple[int, int]]:
    """Between micro-batch ``index``'s steps: (to, how many) of its sequences to hand over, so
    that only the first ``count`` micro-batches hold sequences, about evenly. A whole batch is
    often placed before the first step has measured anything; without this the count would
    reach only sequences placed later. A micro-batch gives only what it holds beyond its share
    by more than an eighth, so sizes that merely drift as sequences finish stay put."""
    kept = list(range(min(count, len(sizes))))
    share = math.ceil(sum(sizes) / len(kept)) if kept else 0
    own_share = share if index in kept else 0
    surplus = sizes[index] - own_share
    if surplus <= 0 or (index in kept and surplus <= max(1, share // 8)):
        return []
    sizes = list(sizes)
    moves: dict[int, int] = {}
    for _ in range(surplus):
        to = min((i for i in kept if i != index), key=lambda i: sizes[i], default=None)
        if to is None or sizes[to] >= share:
            break
        sizes[to] += 1
        moves[to] = moves.get(to, 0) + 1
    return sorted(moves.items())
