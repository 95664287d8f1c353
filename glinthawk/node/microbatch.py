"""A micro-batch on Tier 1: sequences that go through the layers together, one step at a time.

Several are in flight at once, each its own coroutine; while one waits for its attention
on Tier 2, the others compute. Its sequences may live on several Tier 2 nodes: at each
layer the batch is split by node, the parts go out at once, and the outputs are joined
back in order (so one micro-batch can be as large as the whole cluster's KV room allows).
With pipeline stages, a sequence holds KV on one node of every stage (its ``route``); the
step's hidden states go on to the next stage, and its tokens come back. What a micro-batch
needs of its node is the narrow ``Host`` below.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable
from collections.abc import Sequence as Seq
from typing import Any, Protocol

import torch

from glinthawk.compute.loader import Model
from glinthawk.compute.logprobs import Sampled
from glinthawk.node.chain import RemoteNode, StageLost
from glinthawk.node.fanout import Fanout, StepClock, attention_work, split_by_node
from glinthawk.node.links import LinkLost, Tier2Link
from glinthawk.prefix import Prefix
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


Account = Tier2Link | RemoteNode  # a node's KV room as placement sees it (its own, or a later stage's)
Route = tuple[Account, ...]  # a sequence's node at each stage, this one's first


class Host(Protocol):
    """What a micro-batch needs of its node."""

    last_placed: float  # event-loop time of the latest placement

    def compute(self, work: StageWork) -> Awaitable[Any]: ...

    def forward(self, mb: int, batch: StepBatch, routes: Seq[Route], reserve: dict[int, list[int]],
                hidden: torch.Tensor) -> Awaitable[tuple[Sampled, list]]:
        """Hand a step's hidden states on to the next stage; its sampled tokens, and each later
        stage's (compute, wait) seconds (pipeline stages only)."""

    def pace(self, stages: list[list[float]], tokens: int, rows: int) -> None:
        """A step's (compute, wait) seconds at each stage, its tokens and rows (``pacing.Pacer``)."""

    def regroup(self, mb: "MicroBatch") -> None:
        """Between ``mb``'s steps: hand its sequences to others where the count has changed."""

    def computed_s(self) -> float:
        """Seconds the event loop has spent computing (``merger.StageMerger.loop_seconds``)."""

    def wanted(self, seq: Sequence) -> bool:
        """False once the sequence's batch was given up."""

    def place_waiting(self) -> None:
        """KV room was freed."""

    def prefix_filled(self, prefix: Prefix) -> None:
        """A shared prefix's holder is done: its readers may be placed (it keeps its room)."""

    def prefix_gone(self, prefix: Prefix) -> None:
        """A shared prefix's holder stopped before it was filled (its node was lost, its step failed)."""

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
        self.route_of: dict[int, Route] = {}  # sequence id -> the nodes holding its KV
        self.on_node: set[int] = set()  # sequences whose room every node of their route has reserved
        self.fanout = Fanout(self.id)
        self._wake = asyncio.Event()

    @property
    def size(self) -> int:
        return len(self.seqs) + len(self.incoming)

    def add(self, seq: Sequence, route: Route) -> None:
        self.route_of[seq.id] = route
        for account in route:
            account.sequences += 1
        self.incoming.append(seq)
        self._wake.set()

    def hand_over(self, count: int, to: "MicroBatch") -> None:
        """Move ``count`` of this micro-batch's sequences (between its steps) to ``to``: their KV and
        its reservation stay where they are; they only step with other sequences from now on."""
        moved, self.seqs = self.seqs[len(self.seqs) - count:], self.seqs[:len(self.seqs) - count]
        for seq in moved:
            to.route_of[seq.id] = self.route_of.pop(seq.id)
            if seq.id in self.on_node:
                self.on_node.discard(seq.id)
                to.on_node.add(seq.id)
        to.incoming += moved
        to._wake.set()

    def _forget(self, seqs: list[Sequence]) -> dict[Account, list[int]]:
        """Drop ``seqs`` from this micro-batch and give back their KV room; returns the ids per node."""
        released: dict[Account, list[int]] = {}
        for seq in seqs:
            for account in self.route_of.pop(seq.id):
                account.free_tokens += seq.reserve_tokens
                account.sequences -= 1
                released.setdefault(account, []).append(seq.id)
            self.on_node.discard(seq.id)
            seq.unshare()
            if seq.holds is not None:
                self.host.prefix_gone(seq.holds)
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
            self.host.regroup(self)
            await self._drop_given_up()
            if not self.seqs:
                continue
            try:
                await self._step()
            except LinkLost:
                await self._requeue_lost()
            except StageLost:  # the run was stopped (Tier1Node.stop_run): its sequences were given up
                await self._drop_given_up()
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
        for account, ids in self._forget(seqs).items():
            await account.release(ids)

    async def _drop_given_up(self) -> None:
        """Sequences whose batch was given up (submitted again without --resume) stop here."""
        given_up = [s for s in self.seqs if not self.host.wanted(s)]
        if given_up:
            self.seqs = [s for s in self.seqs if self.host.wanted(s)]
            await self._release(given_up)
            self.host.place_waiting()

    async def _requeue_lost(self) -> None:
        """Sequences on a lost node go back to the queue (their KV is rebuilt elsewhere, and
        given back on their other stages' nodes); the others simply redo this step, which
        rewrites the same KV positions."""
        lost = [s for s in self.seqs + self.incoming if not all(a.alive for a in self.route_of[s.id])]
        self.seqs = [s for s in self.seqs if s not in lost]
        self.incoming = [s for s in self.incoming if s not in lost]
        for account, ids in self._forget(lost).items():
            await account.release(ids)  # a lost node's account skips it
        log.warning("micro-batch %d: %d sequences on a lost Tier 2 node go back to the queue", self.id, len(lost))
        self.host.requeue(lost)

    async def _fail_all(self, message: str) -> None:
        failed, self.seqs = self.seqs, []
        await self._release(failed)
        for seq in failed:
            await self.host.finish(seq, error=message)
        self.host.place_waiting()

    async def _step(self) -> None:
        # Group the step's sequences by node so each node's rows are one contiguous slice.
        plan = sorted(plan_step(self.seqs, self.max_batch_tokens), key=lambda item: id(self.route_of[item[0].id][0]))
        batch = pack_step(plan)
        ids = [s.id for s in batch.seqs]
        routes = [self.route_of[i] for i in ids]
        reserve = {s.id: s.room for s in batch.seqs if s.id not in self.on_node}
        parts = split_by_node([route[0] for route in routes], ids, batch.starts, batch.counts, reserve)
        work = attention_work(batch.starts, batch.counts)

        clock = StepClock(self.host.computed_s)

        async def attend(layer: int, q, k, v) -> torch.Tensor:
            return await clock.wait(self.fanout.attend(layer, parts, work, q, k, v))

        next_tokens = await run_step(self.model, batch, clock.timed_compute(self.host.compute), attend)
        if not self.model.is_last:  # a pipeline's first stage: the rest of the model is downstream
            next_tokens = await clock.hand_on(self.host.forward(self.id, batch, [route[1:] for route in routes],
                                                                reserve, next_tokens))
        self.host.pace(clock.stages, sum(batch.counts), len(batch.counts))
        self.on_node.update(ids)  # every node of their route has reserved their room
        self.host.record_step(batch)
        finished = commit_step(batch, next_tokens, self.tokenizer)
        if finished:
            await self._deliver(finished)

    async def _deliver(self, finished: list[Sequence]) -> None:
        for seq in finished:
            self.seqs.remove(seq)
        filled = [seq for seq in finished if seq.holds is not None]
        for seq in filled:  # a prefix is filled: its holder leaves, its room stays (the prefix cache's now)
            finished.remove(seq)
            for account in self.route_of.pop(seq.id):
                account.sequences -= 1
            self.on_node.discard(seq.id)
            self.host.prefix_filled(seq.holds)
        await self._release(finished)
        for seq in finished:
            try:
                await self.host.finish(seq)
            except Exception:  # one result that cannot be delivered must not hold back the others
                log.exception("line %d: its result could not be delivered and is lost; "
                              "glinthawk submit --resume runs it again", seq.request.line)
        self.host.place_waiting()
