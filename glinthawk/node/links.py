"""Tier 1's connection to one Tier 2 node: attention requests out, their answers back, and
the verdict on a node that stops answering.

Tier 1 keeps its own account of the node's free KV tokens (placement never over-commits)
and the futures of the micro-batches whose attention is out there. A node is lost when
its connection ends, when it is silent past the heartbeat timeout, or when one answer is
overdue: each layer's attention is expected within a multiple of what the same
micro-batch's previous layer took, so a hung node is found within about a second rather
than a whole timeout.

A node may also leave on purpose (``pool.Tier2Pool.drain``): its link is then *draining*
(placement passes it over) until its sequences are done, or until they are moved the way a
lost node's are (``retire``); Tier 1 then tells it LEFT and hangs up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch
from prometheus_client import Histogram

from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed
from glinthawk.net.messages import MsgType

log = logging.getLogger("glinthawk.tier1")

# An answer is overdue after DEADLINE_FACTOR times what the previous layer's took, but never
# sooner than DEADLINE_FLOOR_S (a scheduling hiccup on either side is not a failure) nor later
# than the heartbeat timeout.
DEADLINE_FACTOR = 10.0
DEADLINE_FLOOR_S = 1.0


class LinkLost(ConnectionError):
    """The Tier 2 node of a micro-batch went away mid-step."""


class Tier2Link:
    def __init__(self, address: str, conn: Connection, capacity_tokens: int, heartbeat_s: float = 2.0,
                 timeout_s: float = 10.0, round_trip: Histogram | None = None,
                 on_lost: Callable[["Tier2Link"], None] | None = None,
                 on_leave: Callable[["Tier2Link", float | None], None] | None = None):
        self.address, self.conn, self.round_trip, self.on_lost = address, conn, round_trip, on_lost
        self.on_leave = on_leave  # the node asked to leave (LEAVE), with the seconds its sequences may take
        self.capacity_tokens = self.free_tokens = capacity_tokens
        self.sequences = 0  # sequences placed here (all micro-batches)
        self.alive = True
        self.draining = False  # leaving: placement passes it over (see pool.Tier2Pool.drain)
        self.timeout_s = timeout_s
        self._waiting: dict[int, tuple[asyncio.Future, float, float]] = {}  # mb -> (answer, deadline, allowed s)
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        self._reader = loop.create_task(self._read(), name=f"tier2-link-{address}")
        self._heartbeat = loop.create_task(self._watch(heartbeat_s), name=f"tier2-ping-{address}")

    @property
    def used_tokens(self) -> int:
        return self.capacity_tokens - self.free_tokens

    def deadline_for(self, expected_s: float | None) -> float:
        """Seconds an answer may take: ``expected_s`` (the last comparable round trip) scaled, or the timeout."""
        if expected_s is None:
            return self.timeout_s
        return min(self.timeout_s, max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * expected_s))

    async def _watch(self, ping_every_s: float) -> None:
        """PING now and then; declare the node lost when it is silent too long or an answer is overdue."""
        loop = asyncio.get_running_loop()
        tick_s = min(ping_every_s, DEADLINE_FLOOR_S / 4)
        next_ping = loop.time()
        while self.alive:
            asleep_since = loop.time()
            await asyncio.sleep(tick_s)
            # Time our own loop was held up (a long stage, a huge line to tokenize) is not the
            # node's silence: we sent no PING then, nor read what it sent (on uvloop this timer
            # even runs before the waiting frames are read).
            held_up = max(0.0, loop.time() - asleep_since - tick_s)
            now = loop.time()
            self._last_heard = min(now, self._last_heard + held_up)
            for mb, (future, deadline, allowed_s) in list(self._waiting.items()):
                self._waiting[mb] = (future, deadline + held_up, allowed_s)
            if now - self._last_heard > self.timeout_s:
                self._lost(f"no answer for {self.timeout_s:.0f} s")
                return
            overdue = [(mb, allowed_s) for mb, (_, deadline, allowed_s) in self._waiting.items() if deadline < now]
            if overdue:
                mb, allowed_s = overdue[0]
                self._lost(f"no answer to micro-batch {mb}'s attention within {allowed_s:.1f} s")
                return
            if now >= next_ping:
                next_ping = now + ping_every_s
                try:
                    await self.conn.send({"type": MsgType.PING})
                except (ConnectionClosed, ConnectionError):
                    self._lost("connection closed")

    async def send_attention(self, mb: int, layer: int, header: dict, q, k, v,
                             expected_s: float | None = None) -> asyncio.Future:
        """Send micro-batch ``mb``'s q, k, v for ``layer``; returns the future of its attention
        output, which fails with LinkLost if the node is or goes away, or does not answer
        within ``deadline_for(expected_s)`` (this never raises, so a step's parts are all
        answered or failed before it is tried again)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.alive:
            future.set_exception(LinkLost(f"Tier 2 node {self.address} is gone"))
            return future
        sent_at = loop.time()
        allowed_s = self.deadline_for(expected_s)
        # The node answers in order: a frame is not due before those sent ahead of it.
        deadline = max([sent_at + allowed_s, *(due for _, due, _ in self._waiting.values())])
        self._waiting[mb] = (future, deadline, deadline - sent_at)
        if self.round_trip is not None:
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
                future = self._waiting.pop(header.get("mb"), (None,))[0]
                if header["type"] == MsgType.ATTN_OUT and future is not None:
                    future.set_result(tensors["out"])
                elif header["type"] == MsgType.LEAVE and self.on_leave is not None:
                    timeout_s = header.get("timeout_s")
                    self.on_leave(self, float(timeout_s) if isinstance(timeout_s, (int, float)) else None)
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

    @property
    def placeable(self) -> bool:
        """Whether new sequences may go here."""
        return self.alive and not self.draining

    def retire(self, reason: str) -> None:
        """A draining node's time is up: its sequences are moved the way a lost node's are (rebuilt
        elsewhere), but the connection stays open for LEFT (``leave``)."""
        self._lost(reason, moved=True)

    async def leave(self) -> None:
        """Tell the node it is done with (LEFT: it exits) and hang up, without any verdict of loss."""
        self.alive = False
        try:
            await self.conn.send({"type": MsgType.LEFT, "address": self.address})
        except (ConnectionClosed, ConnectionError):
            pass
        self.close()

    def _lost(self, reason: str, moved: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if moved:
            log.warning("Tier 2 node %s leaves (%s); the sequences still running there are rebuilt elsewhere",
                        self.address, reason)
        else:
            log.error("lost Tier 2 node %s (%s); its sequences will be rebuilt elsewhere", self.address, reason)
        for future, _, _ in self._waiting.values():
            if not future.done():
                future.set_exception(LinkLost(f"Tier 2 node {self.address} {'left' if moved else 'lost'}: {reason}"))
        self._waiting.clear()
        self._heartbeat.cancel()
        if not moved:
            self.conn.close()
        if self.on_lost is not None:
            self.on_lost(self)
