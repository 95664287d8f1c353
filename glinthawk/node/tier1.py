"""Tier 1: weights, scheduling, sampling; attention is sent to the Tier 2 nodes.

Structure:
- ``Tier2Link``: one connection to a Tier 2 node, with Tier 1's own accounting of its
  free KV tokens (placement never over-commits) and the futures of micro-batches whose
  attention is out on that node.
- ``MicroBatch``: a set of sequences living on one node that step together through the
  layers. Several per node are in flight at once; each runs as its own coroutine.
- ``StageMerger`` (merger.py): runs every micro-batch that is ready at the same stage as
  one batch, on the one thread that computes (on the CPU, the event loop's).
- ``Batch``: a client's submission; SUBMIT frames in, RESULT frames out as each request
  finishes, spooled to disk while no client is attached.

A node that is lost hands its sequences back to the queue: they are placed again and
their KV rebuilt from prompt + tokens generated so far (sampling is counter-based, so the
continuation is the same as without the failure).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import Histogram

from glinthawk.compute.layers import warm_up
from glinthawk.compute.loader import Model
from glinthawk.compute.rope import rotary
from glinthawk.engine import Intake
from glinthawk.metrics import Tier1Metrics
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import (
    Connection,
    ConnectionClosed,
    client_handshake,
    open_connection,
    server_handshake,
    start_server,
)
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm
from glinthawk.node.merger import StageMerger, StageWork
from glinthawk.requests import RequestError, error_line, parse_line, result_line
from glinthawk.sequence import Sequence, commit_step, pack_step, plan_step
from glinthawk.tokenizer import Tokenizer

log = logging.getLogger("glinthawk.tier1")


@dataclass
class Tier1Stats:
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    first_tokens: int = 0  # sequences through prefill: each counts once, at its first sampled token


class LinkLost(ConnectionError):
    """The Tier 2 node of a micro-batch went away mid-step."""


class Tier2Link:
    def __init__(self, address: str, conn: Connection, capacity_tokens: int, heartbeat_s: float = 2.0,
                 timeout_s: float = 10.0, round_trip: Histogram | None = None):
        self.address, self.conn, self.round_trip = address, conn, round_trip
        self.capacity_tokens = self.free_tokens = capacity_tokens
        self.sequences = 0  # sequences placed here (all micro-batches)
        self.alive = True
        self._waiting: dict[int, asyncio.Future] = {}
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        self._reader = loop.create_task(self._read(), name=f"tier2-link-{address}")
        self._heartbeat = loop.create_task(self._ping(heartbeat_s, timeout_s), name=f"tier2-ping-{address}")

    @property
    def used_tokens(self) -> int:
        return self.capacity_tokens - self.free_tokens

    async def _ping(self, every_s: float, timeout_s: float) -> None:
        """A node that stops answering (hung, partitioned) is lost even if its socket stays open."""
        loop = asyncio.get_running_loop()
        while self.alive:
            asleep_since = loop.time()
            await asyncio.sleep(every_s)
            # Time our own loop was held up (a long stage, a huge line to tokenize) is not the
            # node's silence: we sent no PING then, nor read what it sent (on uvloop this timer
            # even runs before the waiting frames are read).
            held_up = max(0.0, loop.time() - asleep_since - every_s)
            self._last_heard = min(loop.time(), self._last_heard + held_up)
            if loop.time() - self._last_heard > timeout_s:
                self._lost(f"no answer for {timeout_s:.0f} s")
                return
            try:
                await self.conn.send({"type": MsgType.PING})
            except (ConnectionClosed, ConnectionError):
                self._lost("connection closed")

    async def send_attention(self, mb: int, layer: int, header: dict, q, k, v) -> asyncio.Future:
        """Send micro-batch ``mb``'s q, k, v for ``layer``; returns the future of its attention
        output, which fails with LinkLost if the node is or goes away (this never raises, so
        a step's parts are all answered or failed before it is tried again)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.alive:
            future.set_exception(LinkLost(f"Tier 2 node {self.address} is gone"))
            return future
        self._waiting[mb] = future
        if self.round_trip is not None:
            sent_at = loop.time()
            future.add_done_callback(lambda f: f.cancelled() or f.exception() or self.round_trip.observe(
                loop.time() - sent_at))
        try:
            await self.conn.send({"type": MsgType.ATTN, "mb": mb, "layer": layer, **header}, {"q": q, "k": k, "v": v})
        except (ConnectionClosed, ConnectionError) as exc:
            self._lost(f"send failed: {exc}")
        return future

    async def release(self, seq_ids: list[int]) -> None:
        if self.alive and seq_ids:
            try:
                await self.conn.send({"type": MsgType.RELEASE, "seqs": seq_ids})
            except (ConnectionClosed, ConnectionError):
                self._lost("connection closed")

    async def _read(self) -> None:
        reason = "connection closed"
        try:
            async for header, tensors in self.conn:
                self._last_heard = asyncio.get_running_loop().time()
                if header["type"] == MsgType.ATTN_OUT and not isinstance(tensors.get("out"), torch.Tensor):
                    raise ProtocolError("an ATTN_OUT frame without its 'out' tensor")
                future = self._waiting.pop(header.get("mb"), None)
                if header["type"] == MsgType.ATTN_OUT and future is not None:
                    future.set_result(tensors["out"])
                elif header["type"] == MsgType.ERROR and future is not None:
                    future.set_exception(RuntimeError(f"Tier 2 {self.address}: {header.get('message')}"))
                elif header["type"] == MsgType.ERROR:
                    log.error("Tier 2 %s reports: %s", self.address, header.get("message"))
        except (ConnectionClosed, ProtocolError) as exc:
            reason = str(exc)
        except Exception as exc:  # whatever else breaks here, the steps waiting on this node must hear of it
            reason = f"unreadable frame: {exc!r}"
        self._lost(reason)

    def close(self) -> None:
        """Deliberate shutdown: not a failure, so nothing is re-placed or logged as lost."""
        self.alive = False
        self._reader.cancel()
        self._heartbeat.cancel()
        self.conn.close()

    def _lost(self, reason: str) -> None:
        if not self.alive:
            return
        self.alive = False
        log.error("lost Tier 2 node %s (%s); its sequences will be rebuilt elsewhere", self.address, reason)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LinkLost(f"Tier 2 node {self.address} lost: {reason}"))
        self._waiting.clear()
        self._heartbeat.cancel()
        self.conn.close()


@dataclass
class Batch:
    """One client's submission. It outlives the client's connection: results that finish
    while no client is attached go to a spool file, handed over when a client with the
    same batch id reconnects (``glinthawk submit --resume``)."""

    id: str
    intake: Intake
    spool_path: Path
    conn: Connection | None = None
    running: dict[str, Sequence] = field(default_factory=dict)  # custom_id -> sequence in flight
    carried_over: set[str] = field(default_factory=set)  # running when a resuming client attached
    input_done: bool = False
    done: int = 0
    failed: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def deliver(self, line: dict, failed: bool) -> None:
        sent = False
        if self.conn is not None and not self.conn.closed:
            try:
                await self.conn.send({"type": MsgType.RESULT, "line": line})
                sent = True
            except (ConnectionClosed, ConnectionError):
                pass
        if not sent:
            with open(self.spool_path, "a", encoding="utf-8") as spool:
                spool.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.done += not failed  # counted once written: a line that cannot be is not a result
        self.failed += failed

    async def hand_over_spool(self) -> None:
        """Send what finished while no client was attached, then forget it."""
        if not self.spool_path.exists():
            return
        with open(self.spool_path, encoding="utf-8") as spool:
            for text in spool:
                await self.conn.send({"type": MsgType.RESULT, "line": json.loads(text)})
        self.spool_path.unlink(missing_ok=True)  # if we die handing it over, our successor is handed it too

    def maybe_finish(self) -> None:
        if self.input_done and not self.running:
            self.finished.set()


async def _unless_closed(conn: Connection, waiting) -> None:
    """Await ``waiting``, but raise ConnectionClosed as soon as ``conn`` ends: a handler
    parked on an event must not outlive its client (a resumed client takes the batch over)."""
    task = asyncio.ensure_future(waiting)
    closed = asyncio.ensure_future(conn.wait_closed())
    try:
        await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        closed.cancel()
    if not task.done():
        raise ConnectionClosed("connection closed")


_mb_ids = itertools.count()
DRAIN_TIMEOUT_S = 60.0  # on SIGTERM, how long running requests may take to finish (cluster.py waits longer)

# An idle micro-batch that gets work waits while a burst of requests is still being placed
# (placements less than GATHER_QUIET_S apart), at most GATHER_MAX_S: a sequence that misses
# a micro-batch's first step waits out that whole step, a round trip per layer. Measured
# with 50 ms one-way delay, 16 micro-batches of 288: first steps with 64 sequences, and the
# other 224 a step (1.7 s) behind.
GATHER_QUIET_S = 0.005
GATHER_MAX_S = 0.25


class MicroBatch:
    """Sequences that go through the layers together, one step at a time.

    Its sequences may live on several Tier 2 nodes: at each layer the batch is split by
    node, the parts go out at once, and the outputs are joined back in order (so one
    micro-batch can be as large as the whole cluster's KV room allows).
    """

    def __init__(self, node: "Tier1Node"):
        self.id = next(_mb_ids)
        self.node = node
        self.seqs: list[Sequence] = []
        self.incoming: list[Sequence] = []
        self.link_of: dict[int, Tier2Link] = {}  # sequence id -> the node holding its KV
        self.on_node: set[int] = set()  # sequences whose reservation has been sent
        self._wake = asyncio.Event()

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
        while self.size < self.node.max_seqs and loop.time() < deadline:
            quiet = loop.time() - self.node.last_placed
            if quiet >= GATHER_QUIET_S:
                return
            await asyncio.sleep(GATHER_QUIET_S - quiet)

    async def _drop_given_up(self) -> None:
        """Sequences whose batch was given up (submitted again without --resume) stop here."""
        given_up = [s for s in self.seqs if s.id not in self.node.batch_of]
        if given_up:
            self.seqs = [s for s in self.seqs if s.id in self.node.batch_of]
            for link, ids in self._forget(given_up).items():
                await link.release(ids)
            self.node.place_waiting()

    def _requeue_lost(self) -> None:
        """Sequences on a lost node go back to the queue (their KV is rebuilt elsewhere); the
        others simply redo this step, which rewrites the same KV positions."""
        lost = [s for s in self.seqs + self.incoming if not self.link_of[s.id].alive]
        self.seqs = [s for s in self.seqs if s not in lost]
        self.incoming = [s for s in self.incoming if s not in lost]
        self._forget(lost)
        log.warning("micro-batch %d: %d sequences on a lost Tier 2 node go back to the queue", self.id, len(lost))
        self.node.requeue(lost)

    async def _fail_all(self, message: str) -> None:
        failed, self.seqs = self.seqs, []
        for link, ids in self._forget(failed).items():
            await link.release(ids)
        for seq in failed:
            await self.node.finish(seq, error=message)
        self.node.place_waiting()

    def _compute(self, work: StageWork):
        return self.node.merger.run(work, alone=self.node.micro_batches_in_flight == 1)

    async def _attend(self, layer: int, parts: list[tuple[Tier2Link, slice, dict]], q, k, v) -> torch.Tensor:
        """Layer ``layer``'s attention: each node's rows go out at once, the outputs come back in order.
        The sequence list goes with layer 0 only: Tier 2 plans the step from it once."""
        answers = [await link.send_attention(self.id, layer, header if layer == 0 else {}, q[rows], k[rows], v[rows])
                   for link, rows, header in parts]
        if len(answers) == 1:  # awaited directly: a gather would cost a loop pass every layer
            return await answers[0]
        outs = await asyncio.gather(*answers, return_exceptions=True)
        for result in outs:
            if isinstance(result, BaseException):
                raise result
        return torch.cat(outs)

    async def _step(self) -> None:
        node = self.node
        # Group the step's sequences by node so each node's rows are one contiguous slice.
        plan = sorted(plan_step(self.seqs, node.max_batch_tokens), key=lambda item: id(self.link_of[item[0].id]))
        batch = pack_step(plan)
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
        rot = rotary(node.model.inv_freq, batch.positions.to(node.model.device), node.model.dtype)  # for every stage
        x, q, k, v = await self._compute(StageWork(0, rot, token_ids=batch.token_ids))
        for layer in range(node.num_layers):
            out = await self._attend(layer, parts, q, k, v)
            if layer == 0:
                self.on_node.update(s.id for s in batch.seqs)
            if layer + 1 < node.num_layers:
                x, q, k, v = await self._compute(StageWork(layer + 1, rot, x=x, attn_out=out))
        next_tokens = torch.empty(0, dtype=torch.int64)
        if batch.sampled:
            seqs = batch.sampled
            next_tokens = await self._compute(StageWork(
                node.num_layers, rot, x=x, attn_out=out, sample_rows=batch.sample_rows,
                params=[s.params for s in seqs], seeds=[s.seed for s in seqs], steps=[len(s.generated) for s in seqs],
            ))
        node.generated_tokens += len(batch.sampled)
        node.stats.first_tokens += batch.first_tokens
        finished = commit_step(batch, next_tokens, node.tokenizer)
        if finished:
            for seq in finished:
                self.seqs.remove(seq)
            for link, ids in self._forget(finished).items():
                await link.release(ids)
            for seq in finished:
                try:
                    await node.finish(seq)
                except Exception:  # one result that cannot be delivered must not hold back the others
                    log.exception("line %d: its result could not be delivered and is lost; "
                                  "glinthawk submit --resume runs it again", seq.request.line)
            node.place_waiting()


class Tier1Node:
    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        tier2_addresses: list[str],
        *,
        micro_batches: int = 4,
        max_batch_tokens: int = 2048,
        max_seqs: int = 256,
        max_waiting: int = 4096,
        netem: NetEm | None = None,
        model_name: str = "glinthawk",
        reconnect_seconds: float = 1.0,
        heartbeat_s: float = 2.0,
        heartbeat_timeout_s: float = 10.0,
        secret: bytes | None = None,
        spool_dir: Path | None = None,
    ):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.num_layers = model.config.num_layers
        self.tier2_addresses = tier2_addresses
        self.micro_batches, self.max_batch_tokens, self.max_seqs = micro_batches, max_batch_tokens, max_seqs
        self.max_waiting, self.netem, self.reconnect_seconds = max_waiting, netem, reconnect_seconds
        self.last_placed = 0.0  # event-loop time of the latest placement
        self.heartbeat_s, self.heartbeat_timeout_s = heartbeat_s, heartbeat_timeout_s
        self.secret = secret
        self.links: dict[str, Tier2Link] = {}
        self.waiting: deque[Sequence] = deque()
        self._warned_too_large = False  # a waiting sequence fits no alive node (warned once until the queue empties)
        self.batches: dict[str, Batch] = {}
        self.batch_of: dict[int, Batch] = {}  # sequence id -> its batch
        self._owns_spool_dir = spool_dir is None  # a temporary one, removed on close if empty
        self.spool_dir = Path(spool_dir or tempfile.mkdtemp(prefix="glinthawk-spool-"))
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.generated_tokens = 0
        self.stats = Tier1Stats()
        self.metrics = Tier1Metrics(self)
        self._started = time.monotonic()
        self._token_samples: deque[tuple[float, int]] = deque(maxlen=11)  # (time, tokens) once a second
        self.merger: StageMerger | None = None
        self.micro_batch_list: list[MicroBatch] = []
        self._room = asyncio.Event()  # set when the waiting queue has room for more input
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._draining = False

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        self.merger = StageMerger(self.model, max_rows=self.max_batch_tokens)
        self.merger.start()
        await self.merger.call(warm_up, self.model, self.max_batch_tokens, self.max_seqs)
        self.micro_batch_list = [MicroBatch(self) for _ in range(self.micro_batches)]
        for mb in self.micro_batch_list:
            self._spawn(mb.run())
        failures = [f"{address}: {reason}" for address in self.tier2_addresses
                    if (reason := await self._connect(address)) is not None]
        if not self.links:
            raise ConnectionError(
                f"no Tier 2 node usable ({'; '.join(failures)}); start any that are not running "
                "(glinthawk-node --role tier2 --listen HOST:PORT)"
            )
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

    async def _connect(self, address: str) -> str | None:
        """Connect to a Tier 2 node and introduce ourselves; return why that failed, or None."""
        host, port = address.rsplit(":", 1)
        cfg = self.model.config
        try:
            conn = await open_connection(host, int(port), netem=self.netem)
            welcome = await client_handshake(conn, "tier1", {
                "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                "dtype": str(self.model.dtype).removeprefix("torch."),
            }, secret=self.secret)
        except (OSError, ConnectionClosed, ProtocolError) as exc:
            log.warning("cannot use Tier 2 node %s: %s", address, exc)
            return str(exc)
        link = Tier2Link(address, conn, int(welcome["capacity_tokens"]), self.heartbeat_s, self.heartbeat_timeout_s,
                         self.metrics.attention_round_trip)
        self.links[address] = link
        log.info("Tier 2 node %s: %d KV tokens", address, link.capacity_tokens)
        self.place_waiting()
        return None

    async def _reconnect_loop(self) -> None:
        """Bring lost (or never reached) Tier 2 nodes back as soon as they answer."""
        while True:
            await asyncio.sleep(self.reconnect_seconds)
            for address in self.tier2_addresses:
                link = self.links.get(address)
                if link is None or not link.alive:
                    if await self._connect(address) is None:
                        log.info("Tier 2 node %s (re)joined", address)

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

    # -- scheduling ---------------------------------------------------------------------
    def place_waiting(self) -> None:
        """Place queued sequences, in order, on the node with the most free KV room that can hold
        them, in the micro-batch with the fewest sequences.

        A sequence that waits for room holds back those behind it, so it is not starved; one
        that no alive node could hold even empty (the nodes large enough are gone) is passed
        over until one (re)joins, so it does not stall the queue.
        """
        alive = [link for link in self.links.values() if link.alive]
        largest = max((link.capacity_tokens for link in alive), default=0)
        index = 0
        while index < len(self.waiting) and alive:
            seq = self.waiting[index]
            if seq.reserve_tokens > largest:
                if not self._warned_too_large:
                    log.warning("line %d of batch %s needs %d KV tokens but the largest alive Tier 2 node holds "
                                "%d; it waits until a node large enough (re)joins, and requests behind it go first",
                                seq.request.line, self.batch_of[seq.id].id, seq.reserve_tokens, largest)
                    self._warned_too_large = True
                index += 1
                continue
            links = [link for link in alive if link.free_tokens >= seq.reserve_tokens]
            mb = min(self.micro_batch_list, key=lambda m: m.size)
            if not links or mb.size >= self.max_seqs:
                break
            link = max(links, key=lambda l: l.free_tokens)
            del self.waiting[index]
            link.free_tokens -= seq.reserve_tokens
            mb.add(seq, link)
            self.last_placed = asyncio.get_running_loop().time()
        if not self.waiting:
            self._warned_too_large = False
        if len(self.waiting) < self.max_waiting:
            self._room.set()
        if self.waiting and not alive:
            log.error("no Tier 2 node is alive; %d requests wait until one (re)joins", len(self.waiting))

    def requeue(self, seqs: list[Sequence]) -> None:
        """Sequences whose node was lost: rebuild their KV from token history on another node."""
        for seq in reversed(seqs):
            if seq.id not in self.batch_of:
                continue  # its batch was given up
            seq.num_cached = 0
            self.waiting.appendleft(seq)
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

    # -- clients ------------------------------------------------------------------------
    def _batch_for(self, hello: dict) -> Batch:
        """The batch a resuming client continues (same batch id, no client attached) or a new one.

        A client that does not resume starts its batch over: what still runs or waits for an
        earlier submission under the same id is given up, so its old prompts' results are
        never mistaken for the new ones (the client rewrites its output file anyway).
        """
        cfg = self.model.config
        batch_id = hello.get("batch_id")
        if not isinstance(batch_id, str) or not batch_id.isalnum() or len(batch_id) > 128:
            batch_id = uuid.uuid4().hex
        batch = self.batches.get(batch_id)
        if batch is not None and batch.conn is not None and not batch.conn.closed:
            raise ProtocolError(f"batch {batch_id} already has a client attached")
        if batch is not None and not hello.get("resume"):
            self._give_up(batch)
            batch = None
        # A result sent just as the old client died may never have reached its file: the
        # resumed client sends such lines again, and they run again rather than count as
        # duplicates. Lines still running are attached to, not rerun, and a second line with
        # one of their ids is a duplicate.
        intake = Intake(self.tokenizer, cfg.max_position_embeddings, cfg.vocab_size, self.capacity_per_node or None,
                        seen=batch.running if batch is not None else ())
        if batch is None:
            batch = Batch(batch_id, intake, self.spool_dir / f"{batch_id}.jsonl")
            self.batches[batch_id] = batch
        else:
            batch.intake = intake
        batch.input_done = False
        batch.finished.clear()
        batch.carried_over = set(batch.running)
        return batch

    def _give_up(self, batch: Batch) -> None:
        """Drop a batch without results: its waiting requests leave the queue, its running ones
        leave their micro-batches at the next step, and its handler (a dead client's) stops."""
        for seq in batch.running.values():
            del self.batch_of[seq.id]
        self.waiting = deque(seq for seq in self.waiting if seq.id in self.batch_of)
        batch.running.clear()
        batch.conn = None
        del self.batches[batch.id]
        self.place_waiting()

    async def _serve_client(self, conn: Connection) -> None:
        cfg = self.model.config
        hello = await server_handshake(conn, {"client", "status"}, {"model": self.model_name,
                                                          "max_context": cfg.max_position_embeddings},
                                       secret=self.secret)
        if hello["role"] == "status":
            await conn.send({"type": MsgType.STATUS, **self.status()})
            return
        try:
            batch = self._batch_for(hello)
        except ProtocolError as exc:
            await conn.send({"type": MsgType.ERROR, "message": str(exc)})
            return
        batch.conn = conn
        try:
            if hello.get("resume"):
                await batch.hand_over_spool()
            else:
                batch.spool_path.unlink(missing_ok=True)
            await conn.send({"type": MsgType.CAPACITY, "batch_id": batch.id, "running": sorted(batch.running)})
            while not batch.input_done:
                while len(self.waiting) >= self.max_waiting and not self._draining:
                    self._room.clear()
                    await _unless_closed(conn, self._room.wait())  # back-pressure: stop reading until the queue drains
                if self._draining:
                    await conn.send({"type": MsgType.DRAIN, "message": "Tier 1 is shutting down; resubmit the rest"})
                    batch.input_done = True
                    break
                header, _ = await conn.recv()
                if batch.conn is not conn:
                    return  # a frame of a dead client whose batch another client has taken over
                if header["type"] == MsgType.SUBMIT:
                    await self._accept_lines(batch, header.get("lines", []), conn)
                elif header["type"] == MsgType.DONE:
                    batch.input_done = True
                else:
                    await conn.send({"type": MsgType.ERROR, "message": f"unexpected message {header['type']!r}"})
            batch.maybe_finish()
            await _unless_closed(conn, batch.finished.wait())
            await conn.send({"type": MsgType.DONE, "done": batch.done, "failed": batch.failed})
            del self.batches[batch.id]
        except (ConnectionClosed, ProtocolError) as exc:
            log.warning("client of batch %s went away (%s); its %d running requests go on, results spooled to %s",
                        batch.id, exc, len(batch.running), batch.spool_path)
        finally:
            if batch.conn is conn:  # not a resumed client's, which may have attached meanwhile
                batch.conn = None

    async def _accept_lines(self, batch: Batch, lines: list, conn: Connection) -> None:
        if not isinstance(lines, list):
            lines = [None]
        for entry in lines:
            if batch.conn is not conn:
                break  # the client died while an error line went out, and another has taken the batch over
            try:
                if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                        and isinstance(entry[1], (bytes, type(None)))):
                    raise RequestError("malformed SUBMIT entry: expected [line number, bytes]")
                request = parse_line(entry[0], entry[1])
                if request.custom_id in batch.carried_over:
                    batch.carried_over.discard(request.custom_id)
                    continue  # still running from before the client reconnected: its result will come
                seq = batch.intake.admit(request)
            except RequestError as error:
                self.stats.failed += 1
                await batch.deliver(error_line(error), True)
                continue
            self.stats.admitted += 1
            batch.running[seq.request.custom_id] = seq
            self.batch_of[seq.id] = batch
            self.waiting.append(seq)
        self.place_waiting()
