"""One micro-batch's attention at one stage: its rows split by Tier 2 node, sent at once,
joined back in order.

A sequence's rows go to the node holding its KV. On the first stage the step is packed
grouped by node, so each node's rows are one slice; a later stage keeps the first one's
row order (its nodes are other ones), and gathers each node's rows by index instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TypeVar

import torch

from glinthawk.node.links import Tier2Link

T = TypeVar("T")


@dataclass
class Part:
    """One node's share of a step: its rows of the packed batch, and the sequence list and
    reservations that go with the stage's first layer."""

    link: Tier2Link
    rows: slice | torch.Tensor
    header: dict


def split_by_node(links: Seq[Tier2Link], ids: Seq[int], starts: Seq[int], counts: Seq[int],
                  reserve: dict[int, list[int]]) -> list[Part]:
    """The parts of a step whose i-th sequence (``ids[i]``, rows ``counts[i]``) lives on
    ``links[i]``; ``reserve``: the room to reserve for sequences new to their node (``Sequence.room``)."""
    groups: dict[Tier2Link, list[int]] = {}
    for i, link in enumerate(links):
        groups.setdefault(link, []).append(i)
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    parts = []
    for link, members in groups.items():
        first, last = members[0], members[-1]
        if last - first + 1 == len(members):  # consecutive sequences: their rows are one slice
            rows: slice | torch.Tensor = slice(offsets[first], offsets[last + 1])
        else:
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members])
        parts.append(Part(link, rows, {
            "seqs": [[ids[i], starts[i], counts[i]] for i in members],
            "reserve": [[ids[i], *reserve[ids[i]]] for i in members if ids[i] in reserve],
        }))
    return parts


def attention_work(starts: Seq[int], counts: Seq[int]) -> int:
    """Query x key pairs of a step: what its attention time scales with."""
    return sum(count * (start + count) for start, count in zip(starts, counts))


class StepClock:
    """One step's compute and waiting at one stage, and at the stages after it (for ``pacing.Pacer``).

    Waiting counts only time no stage's own work explains: on the CPU the event loop computes,
    so an answer that came during another micro-batch's job is read after it (``held``: seconds
    the loop has computed so far), and a later stage's step may queue behind others there.
    Counted as waiting, either would grow with the number in flight and make any number look
    right. So a stage reports its (compute, wait, elapsed) seconds, and the stage before counts
    as the way there and back only what the next one's elapsed time leaves."""

    def __init__(self, held: Callable[[], float] = lambda: 0.0) -> None:
        self.held = held
        self.compute_s = self.wait_s = 0.0
        self.later: list[list[float]] = []  # (compute, wait, elapsed) of each later stage, as they reported them
        self._started = time.perf_counter()

    def timed_compute(self, compute):
        async def timed(work):
            result = await compute(work)
            self.compute_s += work.seconds
            return result
        return timed

    async def wait(self, answer: Awaitable[T]) -> T:
        loop = asyncio.get_running_loop()
        sent, held = loop.time(), self.held()
        try:
            return await answer
        finally:
            self.wait_s += max(0.0, loop.time() - sent - (self.held() - held))

    async def hand_on(self, answer: Awaitable[tuple[torch.Tensor, list]]) -> torch.Tensor:
        """The later stages' answer (tokens, their timings); of the time it took, what the next
        stage's elapsed time leaves is the way there and back."""
        before = self.wait_s
        tokens, later = await self.wait(answer)
        self.later = [[float(value) for value in timing] for timing in later]
        elapsed = self.later[0][2] if self.later and len(self.later[0]) > 2 else 0.0
        self.wait_s = before + max(0.0, self.wait_s - before - elapsed)
        return tokens

    @property
    def stages(self) -> list[list[float]]:
        """(compute, wait, elapsed) seconds of this stage's step, then of each later stage's."""
        return [[self.compute_s, self.wait_s, time.perf_counter() - self._started], *self.later]


class Fanout:
    """A micro-batch's attention requests at one stage, and the round trips they took, which
    set how long the next answer may take (see ``links.Tier2Link.deadline_for``)."""

    def __init__(self, mb: int, first_layer: int = 0):
        self.mb, self.first_layer = mb, first_layer
        self._round_trip_s: float | None = None  # the latest layer's attention round trip
        self._seconds_per_work: float | None = None  # that round trip per query x key pair of its step

    async def attend(self, layer: int, parts: list[Part], work: int, q, k, v) -> torch.Tensor:
        """Layer ``layer``'s attention: each node's rows go out at once, the outputs come back in order.
        The sequence list goes with the stage's first layer only: Tier 2 plans the step from it once.

        An answer is expected within a multiple of the previous layer's round trip; at the
        first layer (a new step, maybe far larger) of the seconds per unit of attention
        ``work`` measured on the step before; with sequences new to their node, within the
        heartbeat timeout."""
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        local = layer - self.first_layer  # a Tier 2 node holds its stage's layers only
        if local > 0:
            expected_s = self._round_trip_s
        elif self._seconds_per_work is None or any(part.header["reserve"] for part in parts):
            expected_s = None  # new sequences: their room is reserved first, which may compact the store
        else:
            expected_s = self._seconds_per_work * work
        answers = [await part.link.send_attention(self.mb, local, part.header if local == 0 else {}, q[part.rows],
                                                  k[part.rows], v[part.rows], expected_s) for part in parts]
        if len(answers) == 1:  # awaited directly: a gather would cost a loop pass every layer
            out = await answers[0]  # one node holds every sequence: its rows are all rows, in order
        else:
            outs = await asyncio.gather(*answers, return_exceptions=True)
            for result in outs:
                if isinstance(result, BaseException):
                    raise result
            in_order = all(isinstance(p.rows, slice) for p in parts) and [p.rows.start for p in parts] == sorted(
                p.rows.start for p in parts)
            out = torch.cat(outs) if in_order else _scatter(parts, outs, q.shape[0])
        self._round_trip_s = loop.time() - sent_at
        self._seconds_per_work = self._round_trip_s / max(work, 1)
        return out


def _scatter(parts: list[Part], outs: list[torch.Tensor], rows: int) -> torch.Tensor:
    out = outs[0].new_empty((rows, *outs[0].shape[1:]))
    for part, part_out in zip(parts, outs):
        out[part.rows] = part_out
    return out
