"""Tier 1's side of nodes joining and leaving while it runs, on its client port.

Two roles besides clients come there: a Tier 2 node that joins ("tier2-join", see
node/joiner.py), and ``glinthawk drain`` ("drain"), which asks Tier 1 to let one of its nodes
go. Both do the work through the pool (node/pool.py) and answer once it is done, so the node
and the operator hear the outcome, or why there is none, in one line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from glinthawk.net.connection import Connection, ConnectionClosed
from glinthawk.net.messages import MsgType
from glinthawk.node.joiner import JOIN_ROLE
from glinthawk.node.pool import Tier2Pool

log = logging.getLogger("glinthawk.tier1")

DRAIN_ROLE = "drain"
MEMBER_ROLES = frozenset({JOIN_ROLE, DRAIN_ROLE})


def address_problem(address: object) -> str | None:
    """What is wrong with a HOST:PORT a peer sent, if anything (it is dialed, so it must be one)."""
    if not isinstance(address, str) or len(address) > 300:
        return "no address (HOST:PORT) given"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected HOST:PORT, got {address!r}"
    return None


async def serve_member(pool: Tier2Pool, conn: Connection, hello: dict, shutting_down: bool,
                       stage_of: Callable[[str], str | None] = lambda address: None) -> None:
    """Answer a node that joins, or a request to drain one (``stage_of``: which later pipeline
    stage a node that is not ours belongs to, for the first stage to say where to drain it)."""
    try:
        if hello["role"] == JOIN_ROLE:
            await conn.send(await _join(pool, hello, shutting_down))
        else:
            await conn.send(await _drain(pool, hello, stage_of))
    except (ConnectionClosed, ConnectionError):
        pass  # it hung up: what was asked is done all the same


async def _join(pool: Tier2Pool, hello: dict, shutting_down: bool) -> dict:
    address = hello.get("address")
    if (problem := address_problem(address)) is not None:
        return {"type": MsgType.ERROR, "message": f"cannot join: {problem}"}
    if shutting_down:
        return {"type": MsgType.ERROR, "retry": True, "message": "Tier 1 is shutting down; join again once it is back"}
    reason = await pool.join(address)
    if reason is not None:
        return {"type": MsgType.ERROR, "message": f"Tier 1 could not connect back to {address}: {reason}; if Tier 1 "
                "reaches this node at another address, give it with --advertise HOST:PORT"}
    return {"type": MsgType.JOINED, "address": address, "capacity_tokens": pool.links[address].capacity_tokens}


async def _drain(pool: Tier2Pool, hello: dict, stage_of: Callable[[str], str | None]) -> dict:
    node, timeout_s = hello.get("node"), hello.get("timeout_s")
    if (problem := address_problem(node)) is not None:
        return {"type": MsgType.ERROR, "message": f"cannot drain: {problem}"}
    try:
        task = pool.drain(node, float(timeout_s) if isinstance(timeout_s, (int, float)) else None)
    except KeyError as exc:
        if (stage := stage_of(node)) is not None:
            return {"type": MsgType.ERROR, "message": f"{node} is a Tier 2 node of {stage}: drain it through that "
                    f"stage (glinthawk drain {node} --to the address that stage listens on)"}
        return {"type": MsgType.ERROR, "message": exc.args[0]}
    log.info("asked to drain Tier 2 node %s", node)
    moved = await asyncio.shield(task)  # the asker hanging up does not stop the drain
    return {"type": MsgType.LEFT, "node": node, "moved": moved}
