"""A Tier 2 node's side of joining a running Tier 1 (``glinthawk-node --role tier2 --join``):
the first stage, or a later pipeline stage, which then tells the first that it has a new node.

The node dials Tier 1's listening port with the role "tier2-join" and the address it listens
on; Tier 1 connects back to that address as to any Tier 2 node and then answers JOINED (or an
ERROR naming why it cannot use the node). Connecting back, rather than serving attention over
the dialed connection, keeps one code path on Tier 1 for every link (handshake, KV geometry,
heartbeat, loss) and on Tier 2 for every session; the price is that Tier 1 must reach the
node, which is so wherever it could be listed with ``--tier2`` (``--advertise`` names the
address when the node's own is not the one Tier 1 reaches, e.g. behind NAT).

The node stays joined: when its session ends without LEFT (Tier 1 restarted, or it lost the
node), it dials again, with backoff while Tier 1 does not answer. A refusal that retrying
cannot cure (another shared secret, another protocol version, a KV store the model does not
fit) ends the node with that message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import ConnectionClosed, open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.messages import MsgType

if TYPE_CHECKING:
    from glinthawk.node.tier2 import Tier2Node, _Session

log = logging.getLogger("glinthawk.tier2")

JOIN_ROLE = "tier2-join"
RETRY_S = 0.5  # the first wait before dialing a Tier 1 that did not answer again; doubled up to RETRY_MAX_S
RETRY_MAX_S = 15.0
REPLY_TIMEOUT_S = 60.0  # Tier 1 connects back (up to 10 s to connect, 10 s of handshake) before it answers
WILDCARDS = {"", "0.0.0.0", "::"}


class RetryJoin(Exception):
    """This attempt failed for a reason that may pass (Tier 1 down, shutting down, busy)."""


class Joiner:
    def __init__(self, node: Tier2Node, tier1: str, advertise: str | None, *, listen: tuple[str, int]):
        self.node, self.tier1, self.advertise, self.listen = node, tier1, advertise, listen

    async def run(self) -> None:
        delay, reported = RETRY_S, False
        while not self.node.leaving:
            try:
                session = await self._join_once()
            except ProtocolError as exc:
                log.error("%s", exc)
                self.node.fail(str(exc))
                return
            except (OSError, ConnectionClosed, TimeoutError, RetryJoin) as exc:
                log.log(logging.DEBUG if reported else logging.WARNING, "cannot join Tier 1 at %s yet: %s; %s",
                        self.tier1, exc or type(exc).__name__,
                        "trying again, less often while it does not answer" if not reported else "still trying")
                reported = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            delay, reported = RETRY_S, False
            log.info("joined Tier 1 at %s: %d KV tokens", self.tier1, session.store.capacity_tokens)
            await session.ended.wait()
            if not self.node.leaving and not self.node.finished.is_set():
                log.warning("Tier 1 at %s let go of this node; joining it again once it answers", self.tier1)
            if self.node.finished.is_set():
                return

    async def _join_once(self) -> _Session:
        host, port = self.tier1.rsplit(":", 1)
        conn = await open_connection(host, int(port), netem=self.node.netem)
        try:
            try:
                await client_handshake(conn, JOIN_ROLE, {"address": self._address(conn)}, secret=self.node.secret)
            except ProtocolError as exc:
                if "try again" in str(exc):
                    raise RetryJoin(str(exc)) from None
                if "is not accepted here" in str(exc):  # a Tier 2 node, a client port of something else
                    raise ProtocolError(f"--join {self.tier1} is not a Tier 1 stage ({exc}); give --join the --listen "
                                        "address of Tier 1, or of the pipeline stage this node is for") from None
                raise ProtocolError(f"Tier 1 at {self.tier1} refuses this node: {exc}") from None
            header, _ = await asyncio.wait_for(conn.recv(), REPLY_TIMEOUT_S)
        finally:
            conn.close()
        if header["type"] == MsgType.ERROR:
            if header.get("retry"):
                raise RetryJoin(header.get("message"))
            raise ProtocolError(f"Tier 1 at {self.tier1} cannot use this node: {header.get('message')}")
        session = self.node.session
        if header["type"] != MsgType.JOINED or session is None:
            raise RetryJoin(f"unexpected answer {header['type']!r}" if session else "Tier 1 hung up again at once")
        return session

    def _address(self, conn) -> str:
        """Where Tier 1 reaches us: --advertise, else the listening host (or, listening on every
        interface, this end of our connection to Tier 1) and the bound port."""
        if self.advertise is not None:
            return self.advertise
        host, port = self.listen
        if host in WILDCARDS:
            host = conn.sockname[0]
        return f"{host}:{port}"
