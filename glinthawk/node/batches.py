"""A client's submission on Tier 1, which outlives the client's connection.

Results go to the client as RESULT frames as each request finishes; while no client is
attached they go to a spool file, handed over when a client with the same batch id comes
back (``glinthawk submit --resume``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from glinthawk.net.connection import Connection, ConnectionClosed
from glinthawk.net.messages import MsgType
from glinthawk.results import completion_tokens
from glinthawk.scheduling import Intake
from glinthawk.sequence import Sequence

log = logging.getLogger("glinthawk.tier1")


@dataclass
class Batch:
    id: str
    intake: Intake
    spool_path: Path
    conn: Connection | None = None
    input_key: str | None = None  # names the input file alone: a client may resume it under another output
    running: dict[str, Sequence] = field(default_factory=dict)  # custom_id -> sequence in flight
    carried_over: set[str] = field(default_factory=set)  # running when a resuming client attached
    input_done: bool = False
    done: int = 0
    failed: int = 0
    generated_tokens: int = 0  # of the results delivered (for the log line at the batch's end)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def deliver(self, line: dict, failed: bool) -> None:
        sent = False
        if self.conn is not None and not self.conn.closed:
            try:
                await self.conn.send({"type": MsgType.RESULT, "line": line})
                sent = True
            except (ConnectionClosed, ConnectionError):
                pass
        if not sent and not self._spool(line):
            return  # not a result: --resume runs the line again
        self.done += not failed  # counted once written: a line that cannot be is not a result
        self.failed += failed
        self.generated_tokens += completion_tokens(line)

    def _spool(self, line: dict) -> bool:
        """Keep a result for the client's return; the directory is made on the first one."""
        try:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool_path, "a", encoding="utf-8") as spool:
                spool.write(json.dumps(line, ensure_ascii=False) + "\n")
        except OSError as exc:
            log.error("cannot keep the result of %s (batch %s) in %s: %s; glinthawk submit --resume runs it again",
                      line.get("custom_id"), self.id, self.spool_path, exc.strerror or exc)
            return False
        return True

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


async def unless_closed(conn: Connection, waiting) -> None:
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
