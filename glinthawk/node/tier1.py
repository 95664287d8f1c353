"""Tier 1: weights, scheduling, sampling; attention is sent to the Tier 2 nodes.

``Tier1Node`` is the node's lifecycle, its Tier 2 links, the placement of waiting
requests and its clients. The pieces it is made of each have a module: ``links``
(one Tier 2 node), ``microbatch`` (stepping sequences through the layers), ``merger``
(the one thread that computes), ``batches`` (a client's submission and its spool).

A node that is lost hands its sequences back to the queue: they are placed again and
their KV rebuilt from prompt + tokens generated so far (sampling is counter-based, so the
continuation is the same as without the failure).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path

from glinthawk.compute.layers import warm_up
from glinthawk.compute.loader import Model
from glinthawk.metrics import Tier1Metrics
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import ConnectionClosed, client_handshake, open_connection
from glinthawk.net.server import start_server
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm
from glinthawk.node.batches import Batch
from glinthawk.node.clients import ClientService
from glinthawk.node.links import Tier2Link
from glinthawk.node.merger import StageMerger
from glinthawk.node.microbatch import MicroBatch
from glinthawk.requests import RequestError, error_line, result_line
from glinthawk.scheduling import FairQueue, RunStats
from glinthawk.sequence import Sequence, StepBatch
from glinthawk.settings import Tier1Settings
from glinthawk.step import StageWork
from glinthawk.tokenizer import Tokenizer

log = logging.getLogger("glinthawk.tier1")

RECONNECT_MAX_S = 30.0  # the longest wait between attempts to reach a Tier 2 node that keeps failing
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
                 settings: Tier1Settings | None = None, **overrides):
        """``settings``, or any of its fields as keywords (``micro_batches=2``)."""
        self.settings = dataclasses.replace(settings or Tier1Settings(), **overrides)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.tier2_addresses, self.netem, self.secret = tier2_addresses, netem, secret
        self.last_placed = 0.0  # event-loop time of the latest placement
        self.links: dict[str, Tier2Link] = {}
        self.waiting = FairQueue()  # by batch id: batches take turns for KV room
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
        self._started = time.monotonic()
        self._token_samples: deque[tuple[float, int]] = deque(maxlen=11)  # (time, tokens) once a second
        self.merger: StageMerger | None = None
        self.micro_batch_list: list[MicroBatch] = []
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
        self.merger = StageMerger(self.model, max_rows=settings.max_batch_tokens)
        self.merger.start()
        await self.merger.call(warm_up, self.model, settings.max_batch_tokens, settings.max_seqs)
        self.micro_batch_list = [MicroBatch(self, self.model, self.tokenizer, settings.max_seqs,
                                            settings.max_batch_tokens) for _ in range(settings.micro_batches)]
        for mb in self.micro_batch_list:
            self._spawn(mb.run())
        failures = [f"{address}: {reason}" for address in self.tier2_addresses
                    if (reason := await self._connect(address)) is not None]
        if not self.links:
            raise ConnectionError(f"no Tier 2 node usable ({'; '.join(failures)}); {unusable_hint(failures)}")
        self._spawn(self._reconnect_loop())
        self._spawn(self._sample_throughput())
        self._server = await start_server(self._serve_client, host, port)
        return self._server.sockets[0].getsockname()[1]

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
        for seq in self.waiting:
            batch = self.batch_of.pop(seq.id)
            del batch.running[seq.request.custom_id]
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
        for link in self.links.values():
            link.close()
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

    async def _connect(self, address: str, quiet: bool = False) -> str | None:
        """Connect to a Tier 2 node and introduce ourselves; return why that failed, or None
        (``quiet``: a node already reported down fails at debug level)."""
        host, port = address.rsplit(":", 1)
        cfg = self.model.config
        try:
            conn = await open_connection(host, int(port), netem=self.netem)
            welcome = await client_handshake(conn, "tier1", {
                "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                "dtype": str(self.model.dtype).removeprefix("torch."),
            }, secret=self.secret)
        except (OSError, ConnectionClosed, ProtocolError) as exc:
            log.log(logging.DEBUG if quiet else logging.WARNING, "cannot use Tier 2 node %s: %s%s", address, exc,
                    "" if quiet else "; trying again, less often while it keeps failing")
            return str(exc)
        link = Tier2Link(address, conn, int(welcome["capacity_tokens"]), self.settings.heartbeat_s,
                         self.settings.heartbeat_timeout_s, self.metrics.attention_round_trip)
        self.links[address] = link
        log.info("Tier 2 node %s: %d KV tokens", address, link.capacity_tokens)
        self.place_waiting()
        return None

    async def _reconnect_loop(self) -> None:
        """Bring lost (or never reached) Tier 2 nodes back as soon as they answer. A node that
        keeps failing is tried half as often after each failure (up to every RECONNECT_MAX_S)
        and reported once, not at every attempt."""
        loop = asyncio.get_running_loop()
        every_s = self.settings.reconnect_seconds
        backoff = {address: every_s for address in self.tier2_addresses}
        due: dict[str, float] = {}  # when a node that is down is tried next
        while True:
            await asyncio.sleep(every_s)
            for address in self.tier2_addresses:
                link = self.links.get(address)
                if link is not None and link.alive:
                    backoff[address] = every_s
                    due.pop(address, None)
                    continue
                if loop.time() < due.setdefault(address, loop.time()):
                    continue
                reported = backoff[address] > every_s or address not in self.links  # down since start: reported
                if await self._connect(address, quiet=reported) is None:
                    log.info("Tier 2 node %s (re)joined", address)
                    continue
                backoff[address] = min(2 * backoff[address], max(every_s, RECONNECT_MAX_S))
                due[address] = loop.time() + backoff[address]

    async def _sample_throughput(self) -> None:
        while True:
            self._token_samples.append((time.monotonic(), self.generated_tokens))
            await asyncio.sleep(1.0)

    def status(self) -> dict:
        """The live state of the cluster as Tier 1 sees it (for ``glinthawk status``)."""
        samples = list(self._token_samples) + [(time.monotonic(), self.generated_tokens)]
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        uptime = time.monotonic() - self._started
        return {
            "model": self.model_name,
            "uptime_s": round(uptime, 1),
            "busy_fraction": round(self.merger.stats.busy_seconds / max(uptime, 1e-9), 3) if self.merger else 0.0,
            "tokens_per_s": round((n1 - n0) / max(t1 - t0, 1e-9), 1),
            "generated_tokens": self.generated_tokens,
            "requests": {"admitted": self.stats.admitted, "finished": self.stats.finished,
                         "failed": self.stats.failed, "waiting": len(self.waiting), "running": len(self.batch_of)},
            "batches": len(self.batches),
            "micro_batches_in_flight": self.micro_batches_in_flight,
            "tier2": [{
                "address": link.address, "alive": link.alive, "kv_tokens": link.capacity_tokens,
                "kv_tokens_used": link.used_tokens,
                "sequences": link.sequences,
            } for link in self.links.values()],
        }

    @property
    def micro_batches_in_flight(self) -> int:
        return sum(1 for mb in self.micro_batch_list if mb.size)

    @property
    def capacity_per_node(self) -> int:
        return max((link.capacity_tokens for link in self.links.values()), default=0)

    # -- scheduling (what a micro-batch needs of its node: microbatch.Host) ---------------
    def compute(self, work: StageWork):
        return self.merger.run(work, alone=self.micro_batches_in_flight == 1)

    def wanted(self, seq: Sequence) -> bool:
        return seq.id in self.batch_of

    def record_step(self, batch: StepBatch) -> None:
        self.stats.record_step(batch)

    def place_waiting(self) -> None:
        """Place queued sequences on the node with the most free KV room that can hold them, in
        the micro-batch with the fewest sequences; batches take turns, each in its own order.

        A sequence that waits for room holds back all others, so it is not starved; one that
        no alive node could hold even empty (the nodes large enough are gone) is passed over
        until one (re)joins, so it does not stall the queue.
        """
        alive = [link for link in self.links.values() if link.alive]
        largest = max((link.capacity_tokens for link in alive), default=0)
        placed = False
        while alive and (seq_key := self._next_placeable(largest)) is not None:
            key, seq = seq_key
            links = [link for link in alive if link.free_tokens >= seq.reserve_tokens]
            mb = min(self.micro_batch_list, key=lambda m: m.size)
            if not links or mb.size >= self.settings.max_seqs:
                break
            link = max(links, key=lambda candidate: candidate.free_tokens)
            self.waiting.take(key, seq)
            link.free_tokens -= seq.reserve_tokens
            mb.add(seq, link)
            self.last_placed = asyncio.get_running_loop().time()
            placed = True
        if not self.waiting:
            self._warned_too_large = False
        if placed or len(self.waiting) < self.settings.max_waiting:
            self._room.set()
        if self.waiting and not alive:
            log.error("no Tier 2 node is alive; %d requests wait until one (re)joins", len(self.waiting))

    def _next_placeable(self, largest: int) -> tuple[str, Sequence] | None:
        """The batch whose turn it is and its first sequence that an alive node could hold."""
        for key, queue in self.waiting.turns():
            for seq in queue:
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
        del batch.running[seq.request.custom_id]
        try:
            if error is not None:
                self.stats.failed += 1
                request = seq.request
                line = error_line(RequestError(error, request.line, request.custom_id, request.form))
                await batch.deliver(line, True)
            else:
                self.stats.finished += 1
                await batch.deliver(result_line(seq.request, seq.completion(self.tokenizer), self.model_name), False)
        finally:
            batch.maybe_finish()  # even if the line could not be delivered: the batch must still end
