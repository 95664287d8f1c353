"""One stage's Tier 2 nodes: connecting to them, bringing back the ones that are lost, and
the nodes that join and leave while it runs.

Tier 1 (and each later pipeline stage) holds one pool. A node that keeps failing is tried
half as often after each failure (up to every RECONNECT_MAX_S) and reported once, not at
every attempt; a node that (re)joins starts from an empty KV store.

Joining: a Tier 2 node started with ``--join`` dials Tier 1 and names the address it listens
on; the pool then connects to it exactly as to a configured node (one code path for the
handshake, the geometry, the heartbeat and the verdict of loss). A joined node that is lost
is not called back: it joins again by itself (node/joiner.py), so a node that is gone for
good (a deleted pod) leaves no address behind that is tried forever.

Leaving (``drain``): the node is *draining* (placement passes it over) until its sequences
have finished, or, after the timeout, they are moved (released and rebuilt elsewhere, as a
lost node's); then it is told LEFT and forgotten, and a configured one is not called back.
A later pipeline stage's pool does the same: ``on_change`` hears that the node is draining, and
the stage tells the first stage (its NODES frame), which places there no more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import Histogram

from glinthawk.compute.loader import Model
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import ConnectionClosed, open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.netem import NetEm
from glinthawk.node.links import Tier2Link
from glinthawk.settings import DRAIN_TIMEOUT_S, Tier1Settings

log = logging.getLogger("glinthawk.tier1")

RECONNECT_MAX_S = 30.0  # the longest wait between attempts to reach a Tier 2 node that keeps failing
MOVE_TIMEOUT_S = 30.0  # after the move, how long the micro-batches may take to let go of them
POLL_S = 0.05


def kv_geometry(model: Model) -> dict:
    """What a Tier 2 node sizes its store from: the KV of this stage's layers only."""
    cfg = model.config
    return {"num_layers": len(model.layer_range), "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "dtype": str(model.dtype).removeprefix("torch.")}


class Tier2Pool:
    """``addresses``' links, by address (a lost link stays until its node rejoins). ``on_change``
    hears of every link that joins, starts leaving, is lost or leaves."""

    def __init__(self, addresses: list[str], model: Model, settings: Tier1Settings, *, netem: NetEm | None = None,
                 secret: bytes | None = None, round_trip: Histogram | None = None,
                 on_change: Callable[[Tier2Link], None] = lambda link: None):
        # Append-only, so that an index names one node for good (later stages are told their
        # nodes by index); ``gone`` are those that left, or joined and were lost.
        self.addresses = list(addresses)
        self.settings, self.netem, self.secret = settings, netem, secret
        self.hello, self.round_trip, self.on_change = kv_geometry(model), round_trip, on_change
        self.links: dict[str, Tier2Link] = {}
        self.joined: set[str] = set()
        self.gone: set[str] = set()
        self._connecting: dict[str, asyncio.Lock] = {}
        self._drains: dict[str, asyncio.Task] = {}

    @property
    def alive(self) -> list[Tier2Link]:
        return [link for link in self.links.values() if link.alive]

    @property
    def placeable(self) -> list[Tier2Link]:
        """The nodes new sequences may go to: alive and not leaving."""
        return [link for link in self.links.values() if link.placeable]

    @property
    def members(self) -> list[str]:
        """The addresses of the nodes that belong to the pool now (reached or not), in the order they came."""
        return [address for address in self.addresses if address not in self.gone]

    def at(self, index: int) -> Tier2Link | None:
        """The link of the ``index``-th configured node (how later stages are told where a sequence lives)."""
        return self.links.get(self.addresses[index]) if 0 <= index < len(self.addresses) else None

    def describe(self) -> list[list]:
        """[address, KV tokens, alive, leaving] of every configured node, in their configured order."""
        return [[address, link.capacity_tokens if link else 0, bool(link and link.alive),
                 bool(link and link.alive and link.draining)]
                for address in self.addresses for link in [self.links.get(address)]]

    async def connect_all(self) -> list[str]:
        """Connect to every node; returns "address: reason" for each that failed."""
        return [f"{address}: {reason}" for address in self.addresses
                if (reason := await self.connect(address)) is not None]

    async def connect(self, address: str, quiet: bool = False) -> str | None:
        """Connect to a Tier 2 node and introduce ourselves; return why that failed, or None
        (``quiet``: a node already reported down fails at debug level). One attempt per node at a
        time: a node that rejoins while Tier 1 calls it back must not be claimed twice."""
        async with self._connecting.setdefault(address, asyncio.Lock()):
            if (link := self.links.get(address)) is not None and link.alive:
                return None
            return await self._connect(address, quiet)

    async def _connect(self, address: str, quiet: bool) -> str | None:
        host, port = address.rsplit(":", 1)
        try:
            conn = await open_connection(host, int(port), netem=self.netem)
            welcome = await client_handshake(conn, "tier1", self.hello, secret=self.secret)
        except (OSError, ConnectionClosed, ProtocolError) as exc:
            log.log(logging.DEBUG if quiet else logging.WARNING, "cannot use Tier 2 node %s: %s%s", address, exc,
                    "" if quiet else "; trying again, less often while it keeps failing")
            return str(exc)
        settings = self.settings
        link = Tier2Link(address, conn, int(welcome["capacity_tokens"]), settings.heartbeat_s,
                         settings.heartbeat_timeout_s, self.round_trip, on_lost=self._lost,
                         on_leave=self._asked_to_leave)
        self.links[address] = link
        log.info("Tier 2 node %s: %d KV tokens", address, link.capacity_tokens)
        self.on_change(link)
        return None

    async def reconnect_forever(self) -> None:
        """Bring lost (or never reached) nodes back as soon as they answer."""
        loop = asyncio.get_running_loop()
        every_s = self.settings.reconnect_seconds
        backoff = {address: every_s for address in self.addresses}
        due: dict[str, float] = {}  # when a node that is down is tried next
        while True:
            await asyncio.sleep(every_s)
            for address in [a for a in self.addresses if a not in self.joined and a not in self.gone]:
                link = self.links.get(address)
                backoff.setdefault(address, every_s)
                if link is not None and link.alive:
                    backoff[address] = every_s
                    due.pop(address, None)
                    continue
                if loop.time() < due.setdefault(address, loop.time()):
                    continue
                reported = backoff[address] > every_s or address not in self.links  # down since start: reported
                if await self.connect(address, quiet=reported) is None:
                    log.info("Tier 2 node %s (re)joined", address)
                    continue
                backoff[address] = min(2 * backoff[address], max(every_s, RECONNECT_MAX_S))
                due[address] = loop.time() + backoff[address]

    def _lost(self, link: Tier2Link) -> None:
        if link.address in self.joined and self.links.get(link.address) is link:
            self.gone.add(link.address)  # it joins again by itself, if it can
        self.on_change(link)

    # -- joining and leaving ------------------------------------------------------------
    async def join(self, address: str) -> str | None:
        """A node that dialed us listens at ``address``: connect to it; why that failed, or None."""
        if address not in self.addresses:
            self.addresses.append(address)
        self.joined.add(address)
        self.gone.discard(address)
        if (reason := await self.connect(address, quiet=True)) is not None:
            self.gone.add(address)
            log.warning("Tier 2 node %s asked to join but cannot be used: %s", address, reason)
            return reason
        log.info("Tier 2 node %s joined", address)
        return None

    def _asked_to_leave(self, link: Tier2Link, timeout_s: float | None) -> None:
        """The node itself sent LEAVE (it was told to stop)."""
        if link.alive and self.links.get(link.address) is link:
            self.drain(link.address, timeout_s)

    def drain(self, address: str, timeout_s: float | None = None) -> asyncio.Task:
        """Make the node at ``address`` leave (see the module's docstring); the task's result is how
        many of its sequences were moved rather than finished. A second request joins the first."""
        link = self.links.get(address)
        if address in self.gone or link is None or not link.alive:
            raise KeyError(f"{address} is not a Tier 2 node in use here (nodes: {', '.join(self.members) or 'none'})")
        if (task := self._drains.get(address)) is None or task.done():
            task = self._drains[address] = asyncio.get_running_loop().create_task(
                self._drain(link, DRAIN_TIMEOUT_S if timeout_s is None else timeout_s), name=f"drain-{address}")
        return task

    async def _drain(self, link: Tier2Link, timeout_s: float) -> int:
        loop = asyncio.get_running_loop()
        link.draining = True
        self.on_change(link)
        log.info("Tier 2 node %s is leaving: no new sequences; its %d running ones have %.0f s to finish",
                 link.address, link.sequences, timeout_s)
        deadline = loop.time() + timeout_s
        while link.alive and link.sequences and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        moved = link.sequences if link.alive else 0
        if link.alive and moved:
            link.retire(f"it did not finish within {timeout_s:g} s")
            deadline = loop.time() + MOVE_TIMEOUT_S
            while link.sequences and loop.time() < deadline:
                await asyncio.sleep(POLL_S)
        self.gone.add(link.address)
        if self.links.get(link.address) is link:
            await link.leave()
        log.info("Tier 2 node %s left (%d sequences moved)", link.address, moved)
        self.on_change(link)
        return moved

    def close(self) -> None:
        for task in self._drains.values():
            task.cancel()
        for link in self.links.values():
            link.close()
