"""One stage's Tier 2 nodes: connecting to them, and bringing back the ones that are lost.

Tier 1 (and each later pipeline stage) holds one pool. A node that keeps failing is tried
half as often after each failure (up to every RECONNECT_MAX_S) and reported once, not at
every attempt; a node that (re)joins starts from an empty KV store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import Histogram

from glinthawk.compute.loader import Model
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import ConnectionClosed, client_handshake, open_connection
from glinthawk.net.netem import NetEm
from glinthawk.node.links import Tier2Link
from glinthawk.settings import Tier1Settings

log = logging.getLogger("glinthawk.tier1")

RECONNECT_MAX_S = 30.0  # the longest wait between attempts to reach a Tier 2 node that keeps failing


def kv_geometry(model: Model) -> dict:
    """What a Tier 2 node sizes its store from: the KV of this stage's layers only."""
    cfg = model.config
    return {"num_layers": len(model.layer_range), "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "dtype": str(model.dtype).removeprefix("torch.")}


class Tier2Pool:
    """``addresses``' links, by address (a lost link stays until its node rejoins). ``on_change``
    hears of every link that joins or is lost."""

    def __init__(self, addresses: list[str], model: Model, settings: Tier1Settings, *, netem: NetEm | None = None,
                 secret: bytes | None = None, round_trip: Histogram | None = None,
                 on_change: Callable[[Tier2Link], None] = lambda link: None):
        self.addresses, self.settings, self.netem, self.secret = addresses, settings, netem, secret
        self.hello, self.round_trip, self.on_change = kv_geometry(model), round_trip, on_change
        self.links: dict[str, Tier2Link] = {}

    @property
    def alive(self) -> list[Tier2Link]:
        return [link for link in self.links.values() if link.alive]

    def at(self, index: int) -> Tier2Link | None:
        """The link of the ``index``-th configured node (how later stages are told where a sequence lives)."""
        return self.links.get(self.addresses[index]) if 0 <= index < len(self.addresses) else None

    def describe(self) -> list[list]:
        """[address, KV tokens, alive] of every configured node, in their configured order."""
        return [[address, link.capacity_tokens if link else 0, bool(link and link.alive)]
                for address in self.addresses for link in [self.links.get(address)]]

    async def connect_all(self) -> list[str]:
        """Connect to every node; returns "address: reason" for each that failed."""
        return [f"{address}: {reason}" for address in self.addresses
                if (reason := await self.connect(address)) is not None]

    async def connect(self, address: str, quiet: bool = False) -> str | None:
        """Connect to a Tier 2 node and introduce ourselves; return why that failed, or None
        (``quiet``: a node already reported down fails at debug level)."""
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
                         settings.heartbeat_timeout_s, self.round_trip, on_lost=self.on_change)
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
            for address in self.addresses:
                link = self.links.get(address)
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

    def close(self) -> None:
        for link in self.links.values():
            link.close()
