"""A pipeline stage after the first: layers A:B of the model, with its own Tier 2 nodes.

It serves one upstream stage. Each HIDDEN frame is one micro-batch's step: the stage runs
its layers on the hidden states (attention on the node each sequence was placed on, as the
first stage decided), then hands the result on to its next stage, or, as the last stage,
samples; the tokens go back upstream. Its sequences' KV room is reserved on their first
step and given back on the first stage's RELEASE, or all at once when the upstream is gone.

Tier 2 nodes join it (``--join`` naming this stage) and are drained through it (``glinthawk
drain NODE --to THIS_STAGE``, or SIGTERM on the node) as on the first stage, through the same
pool; the change goes up the chain in a NODES frame, which is how the first stage starts, or
stops, placing on them. A leaving node's sequences are those whose room it holds here.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from glinthawk.compute.graphs import stage_graphs
from glinthawk.compute.layers import warm_up
from glinthawk.compute.loader import Model
from glinthawk.compute.logprobs import Sampled
from glinthawk.metrics import StageMetrics
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm
from glinthawk.net.server import server_handshake, start_server
from glinthawk.node.chain import (ChainEvents, Downstream, NextStage, StageLost, StepLost, fingerprint,
                                  parse_handoff, stage_name)
from glinthawk.node.fanout import Fanout, StepClock, attention_work, split_by_node
from glinthawk.node.links import LinkLost, Tier2Link
from glinthawk.node.membership import MEMBER_ROLES, serve_member
from glinthawk.node.merger import StageMerger
from glinthawk.node.pool import Tier2Pool
from glinthawk.settings import Tier1Settings
from glinthawk.step import StageWork, run_step

log = logging.getLogger("glinthawk.stage")


class StageNode:
    def __init__(self, model: Model, tier2_addresses: list[str], next_stage: str | None = None, *,
                 netem: NetEm | None = None, secret: bytes | None = None, settings: Tier1Settings | None = None):
        if model.is_first:
            raise ValueError("the first stage (layers 0:B) is a Tier1Node")
        if (next_stage is None) != model.is_last:
            raise ValueError(f"layers {model.layer_range.start}:{model.layer_range.stop} of {model.config.num_layers}: "
                             "a stage before the last needs the next one's address (--next), the last has none")
        self.model, self.settings, self.secret = model, settings or Tier1Settings(), secret
        self.name = stage_name([model.layer_range.start, model.layer_range.stop])
        self.metrics = StageMetrics(self)
        self.pool = Tier2Pool(tier2_addresses, model, self.settings, netem=netem, secret=secret,
                              round_trip=self.metrics.attention_round_trip, on_change=self._node_changed)
        self.downstream = None if next_stage is None else Downstream(
            next_stage, model, self.settings, ChainEvents(nodes=self._send_up, lost_nodes=lambda lost: None,
                                                          down=self._stage_down, up=self._chain_whole),
            netem=netem, secret=secret)
        self.upstream: Connection | None = None
        self.held: dict[int, Tier2Link] = {}  # sequence id -> the node its room was reserved on
        self.fanouts: dict[int, Fanout] = {}  # by micro-batch
        self.steps_running = 0
        self._steps: set[asyncio.Task] = set()  # the upstream's steps under way here
        self.merger: StageMerger | None = None
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None

    @property
    def links(self) -> dict[str, Tier2Link]:
        return self.pool.links

    @property
    def first_layer(self) -> int:
        return self.model.layer_range.start

    async def start(self, host: str, port: int) -> int:
        settings = self.settings
        self.merger = StageMerger(self.model, max_rows=settings.max_batch_tokens,
                                  graphs=stage_graphs(self.model, settings.cuda_graphs, settings.max_batch_tokens))
        self.merger.start()
        await self.merger.call(warm_up, self.model, self.settings.max_batch_tokens, self.settings.max_seqs)
        failures = await self.pool.connect_all()
        if self.pool.addresses and not self.pool.links:
            raise ConnectionError(f"no Tier 2 node usable for {self.name} ({'; '.join(failures)}); start any that "
                                  "are not running (glinthawk-node --role tier2 --listen HOST:PORT)")
        if not self.pool.addresses:
            log.info("%s: no Tier 2 node listed: steps wait until nodes join (glinthawk-node --role tier2 --join "
                     "THIS_HOST:PORT)", self.name)
        if self.downstream is not None:
            reason = await self.downstream.connect()
            if reason is not None:
                raise ConnectionError(f"the next stage at {self.downstream.address} cannot be used: {reason}; start "
                                      "the stages from the last one, each with --next naming the one after it")
            self._spawn(self.downstream.keep_up())
        self._spawn(self.pool.reconnect_forever())
        self._server = await start_server(self._serve_upstream, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def drain(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self.pool.close()
        if self.downstream is not None:
            self.downstream.close()
        if self.merger is not None:
            await self.merger.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the upstream stage -------------------------------------------------------------
    def _claim(self, conn: Connection, hello: dict) -> dict:
        """The handshake's welcome: one upstream at a time, and only the model's previous layers
        (a node that joins, or glinthawk drain, just hears which stage this is)."""
        if hello.get("role") in MEMBER_ROLES:
            return {"layers": [self.first_layer, self.model.layer_range.stop]}
        if self.upstream is not None and not self.upstream.closed:
            raise ProtocolError(f"{self.name} already serves another stage; give each stage one --next")
        if hello.get("layers_from") != self.first_layer:
            raise ProtocolError(f"this is {self.name}, but the stage before ends at layer {hello.get('layers_from')}; "
                                "the stages' layers must follow each other without gap or overlap")
        if hello.get("model") != fingerprint(self.model):
            raise ProtocolError(f"{self.name} runs another model or dtype than the stage before; give every stage "
                                "the same --model and --dtype")
        if self.downstream is not None and not self.downstream.alive:
            raise ProtocolError(f"{self.name} cannot reach its next stage at {self.downstream.address}")
        self.upstream = conn
        later = self.downstream.link.stages if self.downstream is not None else []
        return {"stages": [self._describe(), *later]}

    def _describe(self) -> dict:
        return {"layers": [self.first_layer, self.model.layer_range.stop], "nodes": self.pool.describe()}

    async def _serve_upstream(self, conn: Connection) -> None:
        hello = await server_handshake(conn, {"stage", *MEMBER_ROLES}, lambda hello: self._claim(conn, hello),
                                       secret=self.secret)
        if hello["role"] in MEMBER_ROLES:
            await serve_member(self.pool, conn, hello, shutting_down=self._server is None or
                               not self._server.is_serving())
            return
        if self.upstream is not conn:
            return
        try:
            async for header, tensors in conn:
                kind = header["type"]
                if kind == MsgType.HIDDEN:
                    step = self._spawn(self._step(conn, header, tensors))
                    self._steps.add(step)
                    step.add_done_callback(self._steps.discard)
                elif kind == MsgType.RELEASE:
                    await self._release(header)
                elif kind == MsgType.RESET:  # the first stage is gone; the stage before is not
                    await self._release_all()
                elif kind == MsgType.PING:
                    await conn.send({"type": MsgType.PONG})
                else:
                    await conn.send({"type": MsgType.ERROR, "message": f"unexpected message type {kind!r}"})
        except (ConnectionClosed, ProtocolError) as exc:
            log.warning("the stage before ended its connection: %s", exc)
        finally:
            if self.upstream is conn:
                self.upstream = None
                for step in list(self._steps):  # none of them may reserve room after it is all given back
                    step.cancel()
                await self._release_all()

    async def _release(self, header: dict) -> None:
        """The first stage's RELEASE: this stage's, or to pass on."""
        if header.get("stage") != self.first_layer:
            if self.downstream is not None and self.downstream.alive:
                await self.downstream.send(header)
            return
        link = self.pool.at(int(header.get("node", -1)))
        ids = [i for i in header.get("seqs", ()) if isinstance(i, int)]
        for seq_id in ids:
            self._unhold(seq_id)
        if link is not None:
            await link.release(ids)

    async def _release_all(self) -> None:
        """The upstream is gone, and with it every sequence: give their room back here and below."""
        by_link: dict[Tier2Link, list[int]] = {}
        for seq_id, link in self.held.items():
            by_link.setdefault(link, []).append(seq_id)
            link.sequences -= 1
        self.held.clear()
        self.fanouts.clear()
        for link, ids in by_link.items():
            await link.release(ids)
        if self.downstream is not None and self.downstream.alive:
            try:
                await self.downstream.send({"type": MsgType.RESET})
            except (StageLost, ConnectionClosed, ConnectionError):
                pass

    # -- a step -------------------------------------------------------------------------
    async def _step(self, conn: Connection, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        mb = header.get("mb")
        self.steps_running += 1
        try:
            sampled, timings = await self._run(mb, header, tensors.get("x"), tensors.get("masks"))
            answer = {"type": MsgType.TOKENS, "mb": mb, **sampled.wire(), "timings": timings}
        except StepLost as exc:
            answer = {"type": MsgType.STEP_FAILED, "mb": mb, "lost": exc.lost, "message": str(exc)}
        except StageLost as exc:
            answer = {"type": MsgType.STEP_FAILED, "mb": mb, "down": str(exc)}
        except Exception as exc:  # a step that cannot be computed fails its requests, not the stage
            log.exception("micro-batch %s failed in %s", mb, self.name)
            answer = {"type": MsgType.STEP_FAILED, "mb": mb, "message": f"{self.name}: {exc}"}
        finally:
            self.steps_running -= 1
        if self.upstream is conn:
            try:
                await conn.send(answer)
            except (ConnectionClosed, ConnectionError):
                pass

    async def _run(self, mb: int, header: dict, x: torch.Tensor | None,
                   masks: torch.Tensor | None = None) -> tuple[Sampled, list]:
        """The step's sampled tokens (and the log-probs asked for), and the (compute, wait) seconds
        of this stage and those after it; ``masks``: the structured-output bitmasks, sampled or passed on."""
        batch, route, reserve, onward = parse_handoff(header, masks)
        if not isinstance(x, torch.Tensor) or x.shape[0] != len(batch.positions):
            raise ProtocolError("a HIDDEN frame without hidden states for each of its rows")
        links = [self.pool.at(index) for index in route]
        if lost := sorted({index for index, link in zip(route, links) if link is None or not link.alive}):
            raise StepLost(f"{self.name}: Tier 2 node(s) {lost} lost", [[self.first_layer, i] for i in lost])
        for seq_id, link in zip(batch.ids, links):
            if seq_id in reserve and self.held.get(seq_id) is not link:
                self._unhold(seq_id)
                self.held[seq_id] = link
                link.sequences += 1  # what a drain waits for (or moves)
        parts = split_by_node(links, batch.ids, batch.starts, batch.counts, reserve)
        work = attention_work(batch.starts, batch.counts)
        fanout = self.fanouts.setdefault(mb, Fanout(mb, self.first_layer))

        clock = StepClock(self.merger.loop_seconds)

        async def attend(layer: int, q, k, v) -> torch.Tensor:
            try:
                return await clock.wait(fanout.attend(layer, parts, work, q, k, v))
            except LinkLost as exc:
                lost = sorted({i for i, link in zip(route, links) if not link.alive})
                raise StepLost(f"{self.name}: {exc}", [[self.first_layer, i] for i in lost]) from None

        out = await run_step(self.model, batch, clock.timed_compute(self._compute), attend, x=x)
        if self.downstream is not None:
            out = await clock.hand_on(self.downstream.forward(mb, onward, out, batch.masks))
        return out, clock.stages

    def _unhold(self, seq_id: int) -> None:
        if (link := self.held.pop(seq_id, None)) is not None:
            link.sequences -= 1

    def _compute(self, work: StageWork):
        return self.merger.run(work, alone=self.steps_running == 1)

    # -- what goes up the chain ---------------------------------------------------------
    def _send_up(self, header: dict) -> None:
        conn = self.upstream
        if conn is not None and not conn.closed:
            self._spawn(self._quietly(conn.send(header)))

    @staticmethod
    async def _quietly(sending) -> None:
        try:
            await sending
        except (ConnectionClosed, ConnectionError):
            pass

    def _node_changed(self, link: Tier2Link) -> None:
        if not link.alive:
            self.held = {i: held for i, held in self.held.items() if held is not link}
            link.sequences = 0
        self._send_up({"type": MsgType.NODES, "stage": self.first_layer, "nodes": self.pool.describe()})

    def _stage_down(self, message: str) -> None:
        self._send_up({"type": MsgType.STAGE_DOWN, "message": message})

    def _chain_whole(self, link: NextStage) -> None:
        """The next stage is back, with empty stores: so is this chain from here on, for the
        first stage to start again (it reconnects to a stage that hung up on it)."""
        if self.upstream is not None:
            self.upstream.close()
