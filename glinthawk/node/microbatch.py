"""A micro-batch on Tier 1: sequences that go through the layers together, one step at a time.

Several are in flight at once, each its own coroutine; while one waits for its attention
on Tier 2, the others compute. Its sequences may live on several Tier 2 nodes: at each
layer the batch is split by node, the parts go out at once, and the outputs are joined
back in order (so one micro-batch can be as large as the whole cluster's KV room allows).
What it needs of its node is the narrow ``Host`` below.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

import torch

from glinthawk.compute.loader import Model
from glinthawk.node.links import LinkLost, Tier2Link
from glinthawk.sequence import Sequence, StepBatch, commit_step, pack_step, plan_step
from glinthawk.step import StageWork, run_step
from glinthawk.tokenizer import Tokenizer

log = logging.getLogger("glinthawk.tier1")

_mb_ids = itertools.count()

# An idle micro-batch that gets work waits while a burst of requests is still being placed
# (placements less than GATHER_QUIET_S apart), at most GATHER_MAX_S: a sequence that misses
# a micro-batch's first step waits out that whole step, a round trip per layer.
GATHER_QUIET_S = 0.005
GATHER_MAX_S = 0.25


class Host(Protocol):
    """What a micro-batch needs of its node."""

    last_placed: float  # event-loop time of the latest placement

    def compute(self, work: StageWork) -> Awaitable[Any]: ...

    def wanted(self, seq: Sequence) -> bool:
        """False once the sequence's batch was given up."""

    def place_waiting(self) -> None:
        """KV room was freed."""

    def requeue(self, seqs: list[Sequence]) -> None:
        """These sequences' node was lost: rebuild them elsewhere."""

    async def finish(self, seq: Sequence, error: str | None = None) -> None: ...

    def record_step(self, batch: StepBatch) -> None: ...


class MicroBatch:
    def __init__(self, host: Host, model: Model, tokenizer: Tokenizer, max_seqs: int, max_batch_tokens: int):
        self.id = next(_mb_ids)
        self.host, self.model, self.tokenizer = host, model, tokenizer
        self.max_seqs, self.max_batch_tokens = max_seqs, max_batch_tokens
        self.seqs: list[Sequence] = []
        self.incoming: list[Sequence] = []
        self.link_of: dict[int, Tier2Link] = {}  # sequence id -> the node holding its KV
        self.on_node: set[int] = set()  # sequences whose reservation has been sent
        self._wake = asyncio.Event()
        self._round_trip_s: float | None = None  # the latest layer's attention round trip
        self._seconds_per_work: float | None = None  # that round trip per query x key pair of its step

    @property
    def size(self) -> int:
        return len(self.seqs) + len(self.incoming)

    def add(self, seq: Sequence, link: Tier2Link) -> None:
        self.link_of[seq.id] = link
        link.sequences += 1
        self.incoming.append(seq)
        self._wake.set()

    def _forget(self, seqs: list[Sequence]) -> dict[Tier2Link, list[int]]:
        """Drop ``seqs`` from this micro-batch and give back their KV room; returns the ids per node."""
        released: dict[Tier2Link, list[int]] = {}
        for seq in seqs:
            link = self.link_of.pop(seq.id)
            link.free_tokens += seq.reserve_tokens
            link.sequences -= 1
            self.on_node.discard(seq.id)
            released.setdefault(link, []).append(seq.id)
        return released

    async def run(self) -> None:
        while True:
            if not self.size:
                await self._wake.wait()
                self._wake.clear()
                await self._gather()
                continue
            self.seqs += self.incoming
            self.incoming.clear()
            await self._drop_given_up()
            if not self.seqs:
                continue
            try:
                await self._step()
            except LinkLost:
                self._requeue_lost()
            except Exception as exc:  # a step that cannot be computed fails its requests, not the node
                log.exception("micro-batch %d failed", self.id)
                await self._fail_all(f"internal error while generating: {exc}")

    async def _gather(self) -> None:
        """Wait until the burst being placed ends, this micro-batch is full, or GATHER_MAX_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GATHER_MAX_S
        while self.size < self.max_seqs and loop.time() < deadline:
            quiet = loop.time() - self.host.last_placed
            if quiet >= GATHER_QUIET_S:
                return
            await asyncio.sleep(GATHER_QUIET_S - quiet)

    async def _release(self, seqs: list[Sequence]) -> None:
        for link, ids in self._forget(seqs).items():
            await link.release(ids)

    async def _drop_given_up(self) -> None:
        """Sequences whose batch was given up (submitted again without --resume) stop here."""
        given_up = [s for s in self.seqs if not self.host.wanted(s)]
        if given_up:
            self.seqs = [s for s in self.seqs if self.host.wanted(s)]
            await self._release(given_up)
            self.host.place_waiting()

    def _requeue_lost(self) -> None:
        """Sequences on a lost node go back to the queue (their KV is rebuilt elsewhere); the
        others simply redo this step, which rewrites the same KV positions."""
        lost = [s for s in self.seqs + self.incoming if not self.link_of[s.id].alive]
        self.seqs = [s for s in self.seqs if s not in lost]
        self.incoming = [s for s in self.incoming if s not in lost]
        self._forget(lost)
        log.warning("micro-batch %d: %d sequences on a lost Tier 2 node go back to the queue", self.id, len(lost))
        self.host.requeue(lost)

    async def _fail_all(self, message: str) -> None:
        failed, self.seqs = self.seqs, []
        await self._release(failed)
        for seq in failed:
            await self.host.finish(seq, error=message)
        self.host.place_waiting()

    def _parts(self, batch: StepBatch) -> list[tuple[Tier2Link, slice, dict]]:
        """Each node's rows of the step (contiguous: the plan is grouped by node), with the
        sequence list and the reservations it sends with layer 0."""
        parts: list[tuple[Tier2Link, slice, dict]] = []
        row = 0
        for link, group in itertools.groupby(zip(batch.seqs, batch.starts, batch.counts),
                                             key=lambda item: self.link_of[item[0].id]):
            group = list(group)
            tokens = sum(count for _, _, count in group)
            fresh = [s for s, _, _ in group if s.id not in self.on_node]
            parts.append((link, slice(row, row + tokens), {
                "seqs": [[s.id, start, count] for s, start, count in group],
                "reserve": [[s.id, s.reserve_tokens] for s in fresh],
            }))
            row += tokens
        return parts

    async def _attend(self, layer: int, parts: list[tuple[Tier2Link, slice, dict]], work: int, q, k, v
                      ) -> torch.Tensor:
        """Layer ``layer``'s attention: each node's rows go out at once, the outputs come back in order.
        The sequence list goes with layer 0 only: Tier 2 plans the step from it once.

        An answer is expected within a multiple of the previous layer's round trip; at layer 0
        (a new step, maybe far larger) of the seconds per unit of attention ``work`` measured
        on the step before; with sequences new to their node, within the heartbeat timeout
        (see ``links.Tier2Link.deadline_for``)."""
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        if layer > 0:
            expected_s = self._round_trip_s
        elif self._seconds_per_work is None or any(header["reserve"] for _, _, header in parts):
            expected_s = None  # new sequences: their room is reserved first, which may compact the store
        else:
            expected_s = self._seconds_per_work * work
        answers = [await link.send_attention(self.id, layer, header if layer == 0 else {}, q[rows], k[rows], v[rows],
                                             expected_s) for link, rows, header in parts]
        if len(answers) == 1:  # awaited directly: a gather would cost a loop pass every layer
            out = await answers[0]
        else:
            outs = await asyncio.gather(*answers, return_exceptions=True)
            for result in outs:
                if isinstance(result, BaseException):
                    raise result
            out = torch.cat(outs)
        self._round_trip_s = loop.time() - sent_at
        self._seconds_per_work = self._round_trip_s / work
        return out

    async def _step(self) -> None:
        # Group the step's sequences by node so each node's rows are one contiguous slice.
        plan = sorted(plan_step(self.seqs, self.max_batch_tokens), key=lambda item: id(self.link_of[item[0].id]))
        batch = pack_step(plan)
        parts = self._parts(batch)
        work = sum(count * (start + count) for start, count in zip(batch.starts, batch.counts))  # query x key pairs

        async def attend(layer: int, q, k, v) -> torch.Tensor:
            out = await self._attend(layer, parts, work, q, k, v)
            if layer == 0:
                self.on_node.update(s.id for s in batch.seqs)
            return out

        next_tokens = await run_step(self.model, batch, self.host.compute, attend)
        self.host.record_step(batch)
        finished = commit_step(batch, next_tokens, self.tokenizer)
        if finished:
            await self._deliver(finished)

    async def _deliver(self, finished: list[Sequence]) -> None:
        for seq in finished:
            self.seqs.remove(seq)
        await self._release(finished)
        for seq in finished:
            try:
                await self.host.finish(seq)
            except Exception:  # one result that cannot be delivered must not hold back the others
                log.exception("line %d: its result could not be delivered and is lost; "
                              "glinthawk submit --resume runs it again", seq.request.line)
        self.host.place_waiting()
