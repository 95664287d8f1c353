"""Tier 1's side of its clients: a submission becomes a batch, its lines come in as far as
there is room, its results go back (``batches.Batch``), and ``glinthawk status`` is answered.

``ClientService`` is a part of ``Tier1Node`` kept in a file of its own; the attributes it
uses are the node's, declared below.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from glinthawk import samples
from glinthawk.compute.loader import Model
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed
from glinthawk.net.server import server_handshake
from glinthawk.net.messages import MsgType
from glinthawk.node.batches import Batch, unless_closed
from glinthawk.node.membership import MEMBER_ROLES, serve_member
from glinthawk.node.pipeline import LaterStages
from glinthawk.node.pool import Tier2Pool
from glinthawk.requests import RequestError, parse_line
from glinthawk.results import error_line
from glinthawk.scheduling import FairQueue, Intake, RunStats
from glinthawk.settings import Tier1Settings
from glinthawk.tokenizer import Tokenizer

log = logging.getLogger("glinthawk.tier1")


class ClientService:
    settings: Tier1Settings
    model: Model
    model_name: str
    tokenizer: Tokenizer
    secret: bytes | None
    waiting: FairQueue
    batches: dict[str, Batch]
    batch_of: dict[int, Batch]
    spool_dir: Path
    stats: RunStats
    capacity_per_node: int
    pool: Tier2Pool
    later: LaterStages
    _room: asyncio.Event
    _draining: bool
    chain_down: str | None  # why the run stopped (a pipeline stage is unreachable)

    def place_waiting(self) -> None: ...

    def status(self) -> dict: ...

    def _batch_for(self, hello: dict) -> Batch:
        """The batch a resuming client continues (same batch id, no client attached) or a new one.

        A client that does not resume starts its batch over: what still runs or waits for an
        earlier submission under the same id is given up, so its old prompts' results are
        never mistaken for the new ones (the client rewrites its output file anyway).
        """
        if self.chain_down is not None:
            raise ProtocolError(self.chain_down)
        cfg = self.model.config
        batch_id = hello.get("batch_id")
        if not _is_key(batch_id):
            batch_id = uuid.uuid4().hex
        batch = self.batches.get(batch_id)
        if batch is None and hello.get("resume"):
            batch = self._adopt(hello.get("input_key"), batch_id)
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
            input_key = hello.get("input_key")
            batch = Batch(batch_id, intake, self.spool_dir / f"{batch_id}.jsonl",
                          input_key=input_key if _is_key(input_key) else None)
            self.batches[batch_id] = batch
        else:
            batch.intake = intake
        batch.input_done = False
        batch.finished.clear()
        batch.carried_over = set(batch.running)
        return batch

    def _adopt(self, input_key: object, batch_id: str) -> Batch | None:
        """A batch of the same input file whose client is gone, for a client that resumes it
        under another output path: what it kept and what still runs go to that client rather
        than staying on Tier 1 for nobody."""
        if not _is_key(input_key):
            return None
        old = next((b for b in self.batches.values()
                    if b.input_key == input_key and (b.conn is None or b.conn.closed)), None)
        if old is None:
            return None
        del self.batches[old.id]
        self.waiting.rekey(old.id, batch_id)
        spool = self.spool_dir / f"{batch_id}.jsonl"
        if old.spool_path.exists():
            old.spool_path.replace(spool)
        log.info("batch %s (the same input, another output file) is resumed as batch %s", old.id, batch_id)
        old.id, old.spool_path = batch_id, spool
        self.batches[batch_id] = old
        return old

    def _give_up(self, batch: Batch) -> None:
        """Drop a batch without results: its waiting requests leave the queue, its running ones
        leave their micro-batches at the next step, and its handler (a dead client's) stops."""
        for seq in batch.running.values():
            for member in samples.of(seq):
                self.batch_of.pop(member.id, None)
        self.waiting.remove_if(lambda seq: seq.id not in self.batch_of)
        batch.running.clear()
        batch.conn = None
        del self.batches[batch.id]
        self.place_waiting()

    def _has_room(self, batch: Batch) -> bool:
        """Whether ``batch``'s client may be read further: while the queue has room, or while the
        batch waits with fewer than its share of it (``max_waiting`` split among the batches
        being read), so a small batch behind a large one still gets its lines in."""
        if len(self.waiting) < self.settings.max_waiting:
            return True
        readers = sum(1 for b in self.batches.values() if b.conn is not None and not b.input_done)
        return self.waiting.count(batch.id) < self.settings.max_waiting // max(1, readers)

    async def _serve_client(self, conn: Connection) -> None:
        cfg = self.model.config
        hello = await server_handshake(conn, {"client", "status", *MEMBER_ROLES},
                                       {"model": self.model_name, "max_context": cfg.max_position_embeddings},
                                       secret=self.secret)
        if hello["role"] in MEMBER_ROLES:  # a Tier 2 node that joins, or glinthawk drain
            await serve_member(self.pool, conn, hello, shutting_down=self._draining, stage_of=self.later.stage_of)
            return
        if hello["role"] == "status":
            await conn.send({"type": MsgType.STATUS, **self.status()})
            return
        try:
            batch = self._batch_for(hello)
        except ProtocolError as exc:
            await conn.send({"type": MsgType.ERROR, "message": str(exc)})
            return
        batch.conn = conn
        attached = time.monotonic()
        log.info("client attached: batch %s%s", batch.id, ", resuming" if hello.get("resume") else "")
        try:
            if hello.get("resume"):
                await batch.hand_over_spool()
            else:
                batch.spool_path.unlink(missing_ok=True)
            await conn.send({"type": MsgType.CAPACITY, "batch_id": batch.id, "running": sorted(batch.running)})
            while not batch.input_done:
                while not self._has_room(batch) and not self._draining:
                    self._room.clear()
                    await unless_closed(conn, self._room.wait())  # back-pressure: stop reading until there is room
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
            await unless_closed(conn, batch.finished.wait())
            await conn.send({"type": MsgType.DONE, "done": batch.done, "failed": batch.failed})
            elapsed = time.monotonic() - attached
            log.info("batch %s finished: %d results, %d failed, %d tokens generated at %.1f tok/s since its client "
                     "attached", batch.id, batch.done, batch.failed, batch.generated_tokens,
                     batch.generated_tokens / max(elapsed, 1e-9))
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
            for member in batch.intake.members(seq):  # n choices: n sequences
                self.batch_of[member.id] = batch
                self.waiting.append(batch.id, member)
        self.place_waiting()


def _is_key(value: object) -> bool:
    """A batch id or input key as clients make them (hex digests), not anything a peer may send."""
    return isinstance(value, str) and value.isalnum() and len(value) <= 128
