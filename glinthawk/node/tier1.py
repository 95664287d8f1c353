"""Tier 1: weights, scheduling, sampling; attention is sent to the Tier 2 nodes.

``Tier1Node`` is the node's lifecycle, the placement of waiting requests and its
clients. The pieces it is made of each have a module: ``pool`` and ``links`` (its Tier 2
nodes), ``microbatch`` (stepping sequences through the layers), ``merger`` (the one thread
that computes), ``batches`` (a client's submission and its spool). As the first of several
pipeline stages (``next_stage``) it also places every sequence on the later stages' nodes
(``pipeline``) and hands each step on (``chain``); later stages are ``stage.StageNode``.

A node that is lost hands its sequences back to the queue: they are placed again and
their KV rebuilt from prompt + tokens generated so far (sampling is counter-based, so the
continuation is the same as without the failure).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import uuid
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from glinthawk.compute.graphs import stage_graphs
from glinthawk.compute.layers import warm_up
from glinthawk.compute.loader import Model
from glinthawk.metrics import Tier1Metrics
from glinthawk.net.connection import ConnectionClosed
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm
from glinthawk.net.server import start_server
from glinthawk.node.batches import Batch
from glinthawk.node.chain import ChainEvents, Downstream, NextStage, handoff_header
from glinthawk.node.clients import ClientService
from glinthawk.node.links import Tier2Link
from glinthawk.node.merger import StageMerger
from glinthawk.node.microbatch import Account, MicroBatch, Route
from glinthawk.node.pacing import Pacer, regroup_moves
from glinthawk.node.pipeline import LaterStages
from glinthawk.node.placement import Placer
from glinthawk.node.pool import Tier2Pool
from glinthawk.node.status import Throughput, tier1_status
from glinthawk.requests import RequestError
from glinthawk.results import error_line, result_line
from glinthawk.prefix import Prefix, PrefixCache
from glinthawk.scheduling import FairQueue, RunStats
from glinthawk.sequence import Sequence, StepBatch
from glinthawk.settings import Tier1Settings
from glinthawk.step import StageWork
from glinthawk.tokenizer import Tokenizer

log = logging.getLogger("glinthawk.tier1")

DRAIN_TIMEOUT_S = 60.0  # on SIGTERM, how long running requests may take to finish (cluster.py waits longer)


def unusable_hint(reasons: list[str]) -> str:
    """What to do when no Tier 2 node could be used, from why each failed: a node that answered but
    refused the handshake is running already, so starting nodes is no advice for it."""
    if any("secret" in reason for reason in reasons):
        return "the shared secrets differ: give Tier 1 and every Tier 2 node the same --secret-file " \
               "(or $GLINTHAWK_SECRET)"
    if any("refused the handshake" in reason or "protocol version" in reason for reason in reasons):
        return "fix what each node reports above"
    return "start any that are not running (glinthawk-node --role tier2 --listen HOST:PORT)"


class Tier1Node(ClientService):
    def __init__(self, model: Model, tokenizer: Tokenizer, tier2_addresses: list[str], *, netem: NetEm | None = None,
                 model_name: str = "glinthawk", secret: bytes | None = None, spool_dir: Path | None = None,
                 settings: Tier1Settings | None = None, next_stage: str | None = None, **overrides):
        """``settings``, or any of its fields as keywords (``micro_batches=2``); ``next_stage``:
        HOST:PORT of the stage that serves the layers after this model's (see ``load_model``'s ``layers``)."""
        self.settings = dataclasses.replace(settings or Tier1Settings(), **overrides)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.tier2_addresses, self.netem, self.secret = tier2_addresses, netem, secret
        self.last_placed = 0.0  # event-loop time of the latest placement
        self.waiting = FairQueue()  # by batch id: batches take turns for KV room
        self.prefixes = PrefixCache(enabled=self.settings.prefix_cache)
        self.placer = Placer(self.prefixes, self._release_on)
        self._warned_too_large = False  # a waiting sequence fits no alive node (warned once until the queue empties)
        self.batches: dict[str, Batch] = {}
        self.batch_of: dict[int, Batch] = {}  # sequence id -> its batch
        # A temporary one is made when the first result is spooled, so a node that never spools
        # (or fails to start) leaves none behind.
        self._owns_spool_dir = spool_dir is None
        self.spool_dir = Path(spool_dir or Path(tempfile.gettempdir()) / f"glinthawk-spool-{uuid.uuid4().hex[:12]}")
        if spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.stats = RunStats()
        self.metrics = Tier1Metrics(self)
        self.pool = Tier2Pool(tier2_addresses, model, self.settings, netem=netem, secret=secret,
                              round_trip=self.metrics.attention_round_trip, on_change=lambda link: self.place_waiting())
        self.downstream: Downstream | None = None
        if next_stage is not None:
            events = ChainEvents(nodes=self._stage_nodes_changed, lost_nodes=lambda lost: self.later.mark_lost(lost),
                                 down=self.stop_run, up=self._chain_whole)
            self.downstream = Downstream(next_stage, model, self.settings, events, netem=netem, secret=secret)
        self.later = LaterStages(self._send_down)
        self.chain_down: str | None = None  # why the run stopped: a later stage is unreachable
        self.throughput = Throughput(lambda: self.generated_tokens)
        self.merger: StageMerger | None = None
        self.micro_batch_list: list[MicroBatch] = []
        # how many of them take sequences
        self.pacer = Pacer(self.settings.micro_batches, concurrent=self.settings.concurrent_stages)
        self._room = asyncio.Event()  # set when a client's handler may read more input
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._draining = False

    @property
    def generated_tokens(self) -> int:
        return self.stats.generated_tokens

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        settings = self.settings
        self.merger = StageMerger(self.model, max_rows=settings.max_batch_tokens,
                                  graphs=stage_graphs(self.model, settings.cuda_graphs, settings.max_batch_tokens))
        self.merger.start()
        await self.merger.call(warm_up, self.model, settings.max_batch_tokens, settings.max_seqs)
        self.micro_batch_list = [MicroBatch(self, self.model, self.tokenizer, settings.max_seqs,
                                            settings.max_batch_tokens) for _ in range(self.pacer.most)]
        for mb in self.micro_batch_list:
            self._spawn(mb.run())
        failures = await self.pool.connect_all()
        if self.tier2_addresses and not self.links:
            raise ConnectionError(f"no Tier 2 node usable ({'; '.join(failures)}); {unusable_hint(failures)}")
        if not self.tier2_addresses:
            log.info("no Tier 2 node listed: requests wait until nodes join (glinthawk-node --role tier2 --join "
                     "THIS_HOST:PORT)")
        if self.downstream is not None:
            await self._connect_downstream()
        self._spawn(self.pool.reconnect_forever())
        self._spawn(self.throughput.sample_forever())
        self._server = await start_server(self._serve_client, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def _connect_downstream(self) -> None:
        reason = await self.downstream.connect()
        if reason is not None:
            raise ConnectionError(f"the next stage at {self.downstream.address} cannot be used: {reason}; start the "
                                  "stages from the last one, each with --next naming the one after it")
        self.later.reset(self.downstream.link.stages)
        self.pacer.at_least(1 + len(self.later.nodes))  # a micro-batch for every stage to compute
        self._spawn(self.downstream.keep_up())

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop taking input and hand back what has not started; finish what runs, for up to ``timeout_s``.

        Handed-back requests simply get no result line: ``glinthawk submit --resume`` runs them.
        """
        self._draining = True
        self._room.set()
        for batch in list(self.batches.values()):
            if batch.conn is not None and not batch.conn.closed:
                try:
                    await batch.conn.send({"type": MsgType.DRAIN, "message": "Tier 1 is shutting down; "
                                           "requests not yet started are handed back (rerun with --resume)"})
                except (ConnectionClosed, ConnectionError):
                    pass
        for seq in self.waiting:  # (a request with n choices some of which run is handed back whole)
            batch = self.batch_of.pop(seq.id)
            batch.running.pop(seq.request.custom_id, None)
            batch.maybe_finish()
        self.waiting.clear()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.batch_of and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.batch_of:
            log.warning("drain timed out; %d running requests handed back", len(self.batch_of))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        self.pool.close()
        if self.downstream is not None:
            self.downstream.close()
        if self.merger is not None:
            await self.merger.close()
        self._remove_spool_dir()

    def _remove_spool_dir(self) -> None:
        """Remove the temporary spool directory, unless results no client came back for are in it."""
        if not self._owns_spool_dir:
            return
        try:
            self.spool_dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("results of batches whose clients did not come back are kept in %s, a JSONL file of "
                        "result lines per batch id; a restarted node cannot hand them over, so take what you "
                        "need from there", self.spool_dir)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def status(self) -> dict:
        """The live state of the cluster as Tier 1 sees it (for ``glinthawk status``)."""
        return tier1_status(self)

    @property
    def micro_batches_in_flight(self) -> int:
        return sum(1 for mb in self.micro_batch_list if mb.size)

    @property
    def links(self) -> dict[str, Tier2Link]:
        return self.pool.links

    @property
    def capacity_per_node(self) -> int:
        """The most KV one sequence can have: the largest node's, in the stage whose largest is smallest."""
        stages = [self.links.values(), *self.later.nodes.values()]
        return min(max((node.capacity_tokens for node in nodes), default=0) for nodes in stages)

    # -- the later pipeline stages ------------------------------------------------------
    async def _send_down(self, header: dict) -> None:
        await self.downstream.send(header)

    def _stage_nodes_changed(self, header: dict) -> None:
        self.later.update(int(header.get("stage", -1)), list(header.get("nodes") or ()))
        self.place_waiting()

    def _chain_whole(self, link: NextStage) -> None:
        self.later.reset(link.stages)
        if self.chain_down is not None:
            log.info("every stage answers again; the run can be resumed (glinthawk submit --resume)")
        self.chain_down = None
        self.place_waiting()

    def stop_run(self, message: str) -> None:
        """A later stage is unreachable: every batch stops with ``message`` (its client keeps what
        was written and can --resume once the stage is back); new batches are refused until then."""
        if self.chain_down is not None:
            return
        self.chain_down = f"{message}; restart it, then rerun with --resume"
        log.error("the run stops: %s", self.chain_down)
        self.later.mark_all_lost()
        for batch in list(self.batches.values()):
            conn = batch.conn
            self._give_up(batch)
            if conn is not None and not conn.closed:
                self._spawn(self._tell_and_close(conn, self.chain_down))

    @staticmethod
    async def _tell_and_close(conn, message: str) -> None:
        try:
            await conn.send({"type": MsgType.ERROR, "message": message})
        except (ConnectionClosed, ConnectionError):
            pass
        conn.close()

    # -- scheduling (what a micro-batch needs of its node: microbatch.Host) ---------------
    def compute(self, work: StageWork):
        return self.merger.run(work, alone=self.micro_batches_in_flight == 1)

    def forward(self, mb: int, batch: StepBatch, routes: Seq[Route], reserve: dict[int, list[int]],
                hidden: torch.Tensor):
        return self.downstream.forward(mb, handoff_header(mb, batch, routes, reserve), hidden, batch.masks)

    def pace(self, stages: list[list[float]], tokens: int, rows: int) -> None:
        running, before = sum(mb.size for mb in self.micro_batch_list), self.pacer.count
        self.pacer.record(stages, tokens, running + len(self.waiting), self.settings.max_seqs, rows)
        if self.pacer.count != before:
            log.info("micro-batches in flight: %d -> %d (%d sequences; %s)", before, self.pacer.count, running,
                     self.pacer.basis)

    def regroup(self, mb: MicroBatch) -> None:
        index = self.micro_batch_list.index(mb)
        for to, count in regroup_moves([m.size for m in self.micro_batch_list], self.pacer.count, index):
            mb.hand_over(count, self.micro_batch_list[to])

    def computed_s(self) -> float:
        return self.merger.loop_seconds() if self.merger is not None else 0.0

    def wanted(self, seq: Sequence) -> bool:
        return seq.id in self.batch_of or seq.holds is not None

    def prefix_filled(self, prefix: Prefix) -> None:
        prefix.ready = True

    def prefix_gone(self, prefix: Prefix) -> None:
        self.prefixes.drop(prefix)

    def _release_on(self, node: Account, seq_ids: list[int]) -> None:
        self._spawn(node.release(seq_ids))

    def record_step(self, batch: StepBatch) -> None:
        self.stats.record_step(batch)

    def place_waiting(self) -> None:
        """Place queued sequences (``placement.Placer``: the node with the most free KV room that
        can hold them, or the nodes of the shared prefix they read) in the micro-batch with the
        fewest sequences; batches take turns, each in its own order.

        A sequence that waits for room holds back all others, so it is not starved; one that
        no alive node could hold even empty (the nodes large enough are gone) is passed over
        until one (re)joins, so it does not stall the queue; so is one whose prefix is being filled.
        """
        stages = [self.pool.placeable, *self.later.placeable()]  # a sequence takes a node of each (not a leaving one)
        largest = min(max((node.capacity_tokens for node in nodes), default=0) for nodes in stages)
        placed = False
        held_back: set[int] = set()  # waiting for a prefix to be filled
        self.placer.drop_lost()
        self.placer.evict_leaving()
        while all(stages) and (seq_key := self._next_placeable(largest, held_back)) is not None:
            key, seq = seq_key
            mb = min(self.micro_batch_list[:self.pacer.count], key=lambda m: m.size)
            if mb.size >= self.settings.max_seqs:
                break
            choice = self.placer.choose(seq, stages, self.waiting.peers(seq))
            if choice.kind == "full":
                break
            if choice.kind != "go":  # its prefix is being filled (now, by the holder placed here)
                held_back.add(seq.id)
                if choice.kind == "fill":
                    self._place(choice.prefix.holder, choice.route, mb)
                    placed = True
                continue
            if choice.prefix is not None:
                seq.share(choice.prefix)
            self.waiting.take(key, seq)
            self._place(seq, choice.route, mb)
            placed = True
        if not self.waiting:
            self._warned_too_large = False
        if placed or len(self.waiting) < self.settings.max_waiting:
            self._room.set()
        if self.waiting and not all(stages):
            log.error("no Tier 2 node is alive (and not leaving)%s; %d requests wait until one (re)joins",
                      " in some stage" if len(stages) > 1 else "", len(self.waiting))

    def _place(self, seq: Sequence, route: Route, mb: MicroBatch) -> None:
        for node in route:
            node.free_tokens -= seq.reserve_tokens
        mb.add(seq, route)
        self.last_placed = asyncio.get_running_loop().time()

    def _next_placeable(self, largest: int, held_back: set[int]) -> tuple[str, Sequence] | None:
        """The batch whose turn it is and its first sequence that an alive node could hold (and
        that does not wait for a prefix)."""
        for key, queue in self.waiting.turns():
            for seq in queue:
                if seq.id in held_back:
                    continue
                if seq.reserve_tokens <= largest:
                    return key, seq
                if not self._warned_too_large:
                    log.warning("line %d of batch %s needs %d KV tokens but the largest alive Tier 2 node holds "
                                "%d; it waits until a node large enough (re)joins, and requests behind it go first",
                                seq.request.line, key, seq.reserve_tokens, largest)
                    self._warned_too_large = True
        return None

    def requeue(self, seqs: list[Sequence]) -> None:
        """Sequences whose node was lost: rebuild their KV from token history on another node."""
        by_batch: dict[str, list[Sequence]] = {}
        for seq in seqs:
            batch = self.batch_of.get(seq.id)
            if batch is None:
                continue  # its batch was given up
            seq.num_cached = 0
            by_batch.setdefault(batch.id, []).append(seq)
        for key, lost in by_batch.items():
            self.waiting.push_front(key, lost)
        self.place_waiting()

    async def finish(self, seq: Sequence, error: str | None = None) -> None:
        """Deliver a sequence's result (or, with ``error``, an error line in its request's form)."""
        batch = self.batch_of.pop(seq.id, None)
        if batch is None:
            return  # its batch was given up
        group = seq.samples
        if group is not None:
            if not group.finish(seq, None if error is not None else seq.completion(self.tokenizer), error):
                return  # the request's other choices are still running
            error = group.error
        if batch.running.pop(seq.request.custom_id, None) is None:
            return  # handed back (drain): a resumed run answers it
        try:
            if error is not None:
                self.stats.failed += 1
                request = seq.request
                line = error_line(RequestError(error, request.line, request.custom_id, request.form))
                await batch.deliver(line, True)
            else:
                self.stats.finished += 1
                done = group.completions if group is not None else seq.completion(self.tokenizer)
                await batch.deliver(result_line(seq.request, done, self.model_name), False)
        finally:
            batch.maybe_finish()  # even if the line could not be delivered: the batch must still end
