"""Tier 1 in pipeline stages: what a stage sends the next, and the link that carries it.

The first stage (layers 0:B) owns the scheduler, the clients and the placement of each
sequence on one Tier 2 node of every stage. Each step's plan and hidden states go down
the chain (HIDDEN); the last stage samples, and the tokens come back up the same
connections (TOKENS, a few bytes a sequence, relayed by each stage), so a stage needs to
reach only its next one. What fails downstream comes back up the same way: a step that
lost a Tier 2 node (STEP_FAILED), a stage's nodes that changed (NODES), a stage that
cannot be reached (STAGE_DOWN). A stage is named by its layers ("stage 4:8").
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from glinthawk.compute.loader import Model
from glinthawk.compute.logprobs import Sampled
from glinthawk.compute.sampling import SamplingParams
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed, open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.messages import MsgType
from glinthawk.net.netem import NetEm
from glinthawk.node.links import LinkLost
from glinthawk.sequence import StepBatch
from glinthawk.settings import Tier1Settings

log = logging.getLogger("glinthawk.tier1")


def fingerprint(model: Model) -> str:
    """What two stages must agree on to be one model: its configuration and dtype (not the
    weights, which would cost reading them all)."""
    text = json.dumps([dataclasses.asdict(model.config), str(model.dtype)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_name(layers: Seq[int]) -> str:
    return f"stage {layers[0]}:{layers[1]}"


class StageLost(ConnectionError):
    """A stage of the chain cannot be reached: the run cannot go on until it is back."""


class StepLost(LinkLost):
    """A step failed downstream because Tier 2 nodes were lost: ``lost`` holds (stage's
    first layer, node index) of each."""

    def __init__(self, message: str, lost: list[list[int]]):
        super().__init__(message)
        self.lost = lost


# -- the step, as it travels ------------------------------------------------------------
@dataclass(eq=False)
class RemoteNode:
    """The first stage's account of a later stage's Tier 2 node (as ``Tier2Link`` is of its own)."""

    stage: int  # the stage's first layer
    index: int  # among the stage's configured nodes
    address: str
    capacity_tokens: int
    alive: bool
    send: Callable  # into the chain, for releases
    draining: bool = False  # leaving: placement passes it over (its stage drains it)
    free_tokens: int = field(init=False)
    sequences: int = 0

    @property
    def placeable(self) -> bool:
        return self.alive and not self.draining

    def __post_init__(self) -> None:
        self.free_tokens = self.capacity_tokens

    @property
    def used_tokens(self) -> int:
        return self.capacity_tokens - self.free_tokens

    async def release(self, seq_ids: list[int]) -> None:
        if self.alive and seq_ids:
            try:
                await self.send({"type": MsgType.RELEASE, "stage": self.stage, "node": self.index, "seqs": seq_ids})
            except (StageLost, ConnectionClosed, ConnectionError):
                pass  # the stage is gone, and its nodes' KV with it


def handoff_header(mb: int, batch: StepBatch, routes: Seq[Seq[RemoteNode]], reserve: dict[int, list[int]]) -> dict:
    """A HIDDEN frame's header: the step's sequences, each one's node at every later stage
    (``routes``, one tuple a sequence), the room to reserve for new ones ([tokens] or [tokens,
    the holder of the prefix they read], ``Sequence.room``), and what the last
    stage samples with (each row's log-prob alternatives, -1 for none) and, only where asked,
    the prompt rows it scores."""
    params, seeds, steps = batch.sampling()
    header = {
        "type": MsgType.HIDDEN, "mb": mb,
        "seqs": [[s.id, start, count] for s, start, count in zip(batch.seqs, batch.starts, batch.counts)],
        "route": [[route[stage].index for route in routes] for stage in range(len(routes[0]) if routes else 0)],
        "reserve": [[seq_id, *room] for seq_id, room in reserve.items()],
        "sample": {"rows": batch.sample_rows.tolist(), "seeds": list(seeds), "steps": list(steps),
                   "params": [[p.temperature, p.top_p, p.top_k, p.min_p, _or_none(p.logprobs)] for p in params]},
    }
    if batch.score_rows is not None:
        header["score"] = {"rows": batch.score_rows.tolist(), "tokens": batch.score_tokens.tolist(),
                           "top": list(batch.score_top)}
    if batch.mask_rows is not None:  # structured output: the bitmasks go as the frame's "masks" tensor
        header["sample"]["masked"] = batch.mask_rows.tolist()
    return header


def _or_none(count: int | None) -> int:
    return -1 if count is None else count


@dataclass
class StageBatch:
    """A later stage's view of a step, from its HIDDEN header: what ``step.run_step`` needs."""

    ids: list[int]
    starts: list[int]
    counts: list[int]
    positions: torch.Tensor
    sample_rows: torch.Tensor
    params: list[SamplingParams]
    seeds: list[int]
    steps: list[int]
    score_rows: torch.Tensor | None = None
    score_tokens: torch.Tensor | None = None
    score_top: list[int] = field(default_factory=list)
    mask_rows: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    token_ids: None = None

    def sampling(self) -> tuple[list[SamplingParams], list[int], list[int]]:
        return self.params, self.seeds, self.steps


def parse_handoff(header: dict, masks: torch.Tensor | None = None
                  ) -> tuple[StageBatch, list[int], dict[int, list[int]], dict]:
    """A HIDDEN header (and its frame's ``masks`` tensor) as (the step, this stage's node index
    per sequence, room to reserve, the header for the next stage); ProtocolError if it is malformed."""
    try:
        ids, starts, counts = ([int(s[i]) for s in header["seqs"]] for i in range(3))
        route = [int(i) for i in header["route"][0]]
        reserve = {int(entry[0]): [int(x) for x in entry[1:3]] for entry in header["reserve"]}
        if any(not room for room in reserve.values()):
            raise ValueError("a reservation without its tokens")
        sample = header["sample"]
        params = [SamplingParams(max_tokens=1, temperature=t, top_p=p, top_k=k, min_p=m,
                                 logprobs=None if lp < 0 else int(lp)) for t, p, k, m, lp in sample["params"]]
        seeds, steps = [int(s) for s in sample["seeds"]], [int(s) for s in sample["steps"]]
        rows = torch.tensor([int(r) for r in sample["rows"]], dtype=torch.int64)
        score = header.get("score")
        scoring = () if score is None else (torch.tensor(score["rows"], dtype=torch.int64),
                                            torch.tensor(score["tokens"], dtype=torch.int64),
                                            [int(k) for k in score["top"]])
        masked = [int(r) for r in sample.get("masked", ())]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed HIDDEN frame: {exc!r}") from None
    if len(route) != len(ids) or not len(params) == len(seeds) == len(steps) == len(rows):
        raise ProtocolError("malformed HIDDEN frame: its lists differ in length")
    if scoring and not len(scoring[0]) == len(scoring[1]) == len(scoring[2]):
        raise ProtocolError("malformed HIDDEN frame: its scored rows' lists differ in length")
    positions = torch.cat([torch.arange(start, start + count) for start, count in zip(starts, counts)]) \
        if ids else torch.empty(0, dtype=torch.int64)
    batch = StageBatch(ids, starts, counts, positions, rows, params, seeds, steps, *scoring)
    if masked:
        _check_masks(masked, masks, len(params))
        batch.mask_rows, batch.masks = torch.tensor(masked, dtype=torch.int64), masks
    return batch, route, reserve, {**header, "route": header["route"][1:]}


def _check_masks(masked: list[int], masks: torch.Tensor | None, sampled: int) -> None:
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.int32 or masks.dim() != 2 \
            or masks.shape[0] != len(masked):
        raise ProtocolError("malformed HIDDEN frame: its masked rows need an int32 'masks' tensor, one row each")
    if any(not 0 <= r < sampled for r in masked):
        raise ProtocolError("malformed HIDDEN frame: a masked row is not a sampled row")


# -- the link to the next stage ---------------------------------------------------------
@dataclass
class ChainEvents:
    """What a stage does with what comes up the chain."""

    nodes: Callable[[dict], None]  # a NODES frame
    lost_nodes: Callable[[list[list[int]]], None]  # the nodes a failed step names
    down: Callable[[str], None]  # a stage is unreachable (the message names it)
    up: Callable[["NextStage"], None]  # the chain is whole again


class NextStage:
    """The connection to the next stage: HIDDEN frames out, the answers of each micro-batch's
    step back. ``stages``: every stage from the next to the last, as its WELCOME listed them."""

    def __init__(self, address: str, conn: Connection, stages: list[dict], settings: Tier1Settings,
                 events: ChainEvents):
        self.address, self.conn, self.stages, self.events = address, conn, stages, events
        self.alive = True
        self._answers: dict[int, asyncio.Future] = {}  # micro-batch -> its step's tokens
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        self._reader = loop.create_task(self._read())
        self._watcher = loop.create_task(self._watch(settings.heartbeat_s, settings.heartbeat_timeout_s))

    @property
    def name(self) -> str:
        return f"{stage_name(self.stages[0]['layers'])} at {self.address}"

    async def forward(self, mb: int, header: dict, x: torch.Tensor,
                      masks: torch.Tensor | None = None) -> tuple[Sampled, list]:
        """Send micro-batch ``mb``'s step on (with its structured-output bitmasks, if any); its sampled
        tokens (and log-probs) once the last stage has them, and each later stage's (compute, wait) seconds."""
        if not self.alive:
            raise StageLost(f"{self.name} is unreachable")
        future = self._answers[mb] = asyncio.get_running_loop().create_future()
        try:
            tensors = {"x": x.cpu()} if masks is None else {"x": x.cpu(), "masks": masks}
            await self.conn.send({**header, "mb": mb}, tensors)
        except (ConnectionClosed, ConnectionError) as exc:
            self._lost(f"send failed: {exc}")
        return await future

    async def send(self, header: dict) -> None:
        if not self.alive:
            raise StageLost(f"{self.name} is unreachable")
        await self.conn.send(header)

    async def _read(self) -> None:
        reason = "connection closed"
        try:
            async for header, _ in self.conn:
                self._last_heard = asyncio.get_running_loop().time()
                self._on_frame(header)
        except (ConnectionClosed, ProtocolError) as exc:
            reason = str(exc)
        except Exception as exc:  # whatever breaks here, the steps waiting downstream must hear of it
            reason = f"unreadable frame: {exc!r}"
        self._lost(reason)

    def _on_frame(self, header: dict) -> None:
        kind = header["type"]
        if kind == MsgType.NODES:
            self.events.nodes(header)
        elif kind == MsgType.STAGE_DOWN:
            self.events.down(str(header.get("message")))
        elif kind in (MsgType.TOKENS, MsgType.STEP_FAILED):
            future = self._answers.pop(header.get("mb"), None)
            if future is None or future.done():
                return
            if kind == MsgType.TOKENS:
                try:
                    future.set_result((Sampled.from_wire(header), _timings(header)))
                except (KeyError, TypeError, ValueError) as exc:
                    future.set_exception(RuntimeError(f"{self.name}: malformed TOKENS frame: {exc!r}"))
            elif header.get("lost"):
                self.events.lost_nodes(header["lost"])
                future.set_exception(StepLost(str(header.get("message")), header["lost"]))
            elif header.get("down"):
                future.set_exception(StageLost(str(header["down"])))
            else:
                future.set_exception(RuntimeError(str(header.get("message"))))
        elif kind == MsgType.ERROR:
            log.error("%s reports: %s", self.name, header.get("message"))

    async def _watch(self, ping_every_s: float, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        while self.alive:
            asleep_since = loop.time()
            await asyncio.sleep(ping_every_s)
            held_up = max(0.0, loop.time() - asleep_since - ping_every_s)  # our own loop's delay is not its silence
            self._last_heard = min(loop.time(), self._last_heard + held_up)
            if loop.time() - self._last_heard > timeout_s:
                self._lost(f"no answer for {timeout_s:.0f} s")
                return
            try:
                await self.conn.send({"type": MsgType.PING})
            except (ConnectionClosed, ConnectionError):
                self._lost("connection closed")

    def close(self) -> None:
        """Deliberate shutdown: not a failure."""
        self.alive = False
        self._reader.cancel()
        self._watcher.cancel()
        self.conn.close()

    def _lost(self, reason: str) -> None:
        if not self.alive:
            return
        self.alive = False
        message = f"{self.name} is unreachable ({reason})"
        for future in self._answers.values():
            if not future.done():
                future.set_exception(StageLost(message))
        self._answers.clear()
        self._watcher.cancel()
        self.conn.close()
        self.events.down(message)


def _timings(header: dict) -> list:
    """A TOKENS frame's (compute, wait, elapsed) seconds per stage; none if malformed (they only pace)."""
    timings = header.get("timings")
    try:
        return [[float(c), float(w), float(e)] for c, w, e in timings]
    except (TypeError, ValueError):
        return []


class Downstream:
    """The way to the next stage, kept open: connected at start-up (a next stage that does
    not answer, or is not the model's next layers, refuses the start), reconnected after a loss."""

    def __init__(self, address: str, model: Model, settings: Tier1Settings, events: ChainEvents, *,
                 netem: NetEm | None = None, secret: bytes | None = None):
        self.address, self.model, self.settings, self.events = address, model, settings, events
        self.netem, self.secret = netem, secret
        self.link: NextStage | None = None

    @property
    def alive(self) -> bool:
        return self.link is not None and self.link.alive

    async def connect(self) -> str | None:
        """Connect and check the next stage; returns why that failed, or None."""
        host, port = self.address.rsplit(":", 1)
        hello = {"layers_from": self.model.layer_range.stop, "model": fingerprint(self.model)}
        try:
            conn = await open_connection(host, int(port), netem=self.netem)
            welcome = await client_handshake(conn, "stage", hello, secret=self.secret)
            stages = welcome["stages"]
            if not stages or stages[-1]["layers"][1] != self.model.config.num_layers:
                raise ProtocolError("the stages after it do not reach the model's last layer")
        except (OSError, ConnectionClosed, ProtocolError, KeyError, IndexError, TypeError) as exc:
            return str(exc)
        self.link = NextStage(self.address, conn, stages, self.settings, self.events)
        log.info("next stage: %s (%s)", self.link.name, ", ".join(stage_name(s["layers"]) for s in stages))
        return None

    async def keep_up(self) -> None:
        """Reconnect to the next stage whenever it is lost."""
        while True:
            await asyncio.sleep(self.settings.reconnect_seconds)
            if self.alive:
                continue
            reason = await self.connect()
            if reason is None:
                log.info("%s is back", self.link.name)
                self.events.up(self.link)
            else:
                log.debug("next stage %s: %s", self.address, reason)

    async def forward(self, mb: int, header: dict, x: torch.Tensor,
                      masks: torch.Tensor | None = None) -> tuple[Sampled, list]:
        if self.link is None:
            raise StageLost(f"the next stage at {self.address} is unreachable")
        return await self.link.forward(mb, header, x, masks)

    async def send(self, header: dict) -> None:
        if self.link is None:
            raise StageLost(f"the next stage at {self.address} is unreachable")
        await self.link.send(header)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
