"""Drives each batch through its life cycle: validating → in_progress → finalizing → completed, or
failed, cancelling → cancelled, expired.

A batch runs as ``glinthawk submit --resume`` does, into its own ``results.jsonl``: always resuming,
so a batch started again after a restart (or after Tier 1 went away) sends only the lines its
results file does not answer yet, and collects what Tier 1 spooled meanwhile. Only the finalizing
step reads the results whole, splitting them into the output and error files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glinthawk.client import SubmitError, batch_id, submit
from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import ConnectionClosed, open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.messages import MsgType
from glinthawk.results import is_error
from glinthawk.serve.batches import ACTIVE, BatchStore, split_results, usage_object, validate_input
from glinthawk.serve.files import FileStore
from glinthawk.serve.store import ApiError, new_id

log = logging.getLogger("glinthawk.serve")
COUNT_INTERVAL_S = 0.5
RETRY_MAX_S = 30.0


@dataclass
class Tier1:
    """Where requests go: a running Tier 1 (``--to``) or the local cluster's."""

    host: str
    port: int
    secret: bytes | None = None


class Runner:
    def __init__(self, batches: BatchStore, files: FileStore, tier1: Tier1, max_running: int):
        self.batches, self.files, self.tier1 = batches, files, tier1
        self.slots = asyncio.Semaphore(max_running)
        self.tasks: dict[str, asyncio.Task] = {}

    def start(self, record: dict[str, Any]) -> None:
        self.tasks[record["id"]] = asyncio.get_running_loop().create_task(self._drive(record))

    def resume_all(self) -> None:
        """Take up every batch a previous life of the service left unfinished."""
        for record in sorted(self.batches.records.values(), key=lambda r: r["id"]):
            if record["status"] in ACTIVE:
                log.info("batch %s: resuming (%s)", record["id"], record["status"])
                self.start(record)

    def cancel(self, record: dict[str, Any]) -> None:
        if record["status"] not in ("validating", "in_progress"):
            raise ApiError(400, f"cannot cancel a batch whose status is {record['status']!r}", param="batch_id")
        self._set(record, "cancelling")
        old = self.tasks.pop(record["id"], None)
        if old is not None:
            old.cancel()
        self.tasks[record["id"]] = asyncio.get_running_loop().create_task(self._after(old, record))

    async def _after(self, old: asyncio.Task | None, record: dict[str, Any]) -> None:
        if old is not None:
            await asyncio.wait({old})  # its client has closed its connection and output file
        await self._drive(record)

    async def close(self) -> None:
        """Stop every batch where it is; its record says where, and the next start goes on from there."""
        for task in self.tasks.values():
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks.values()))

    def _set(self, record: dict[str, Any], status: str, **fields: Any) -> None:
        record.update(status=status, **{f"{status}_at": int(time.time())}, **fields)
        self.batches.save(record)

    async def _drive(self, record: dict[str, Any]) -> None:
        try:
            if record["status"] == "validating":
                await self._validate(record)
            if record["status"] == "in_progress":
                async with self.slots:
                    await self._run(record)
            if record["status"] in ("finalizing", "cancelling"):
                await self._finalize(record)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not end the service; the batch stays where it was for a restart
            log.exception("batch %s: stopped at %s by an internal error", record["id"], record["status"])
        finally:
            if self.tasks.get(record["id"]) is asyncio.current_task():
                del self.tasks[record["id"]]

    async def _validate(self, record: dict[str, Any]) -> None:
        path = self.batches.dir(record["id"]) / "input.jsonl"
        total, errors = await asyncio.to_thread(validate_input, path, record["endpoint"])
        record["request_counts"]["total"] = total
        if errors:
            log.info("batch %s: failed validation (%s)", record["id"], errors[0]["message"])
            self._set(record, "failed", errors={"object": "list", "data": errors})
        else:
            self._set(record, "in_progress")

    async def _run(self, record: dict[str, Any]) -> None:
        """Submit (resuming) until Tier 1 has answered every line, or the completion window ends."""
        directory = self.batches.dir(record["id"])
        inputs, results = directory / "input.jsonl", directory / "results.jsonl"
        counter = asyncio.get_running_loop().create_task(self._count(record, results))
        delay = 1.0
        try:
            while True:
                left = record["expires_at"] - time.time()
                try:
                    if left <= 0:
                        raise TimeoutError
                    summary = await asyncio.wait_for(
                        submit(inputs, self.tier1.host, self.tier1.port, results, progress=False, resume=True,
                               secret=self.tier1.secret), left)
                except TimeoutError:
                    record["_finish_as"] = "expired"
                    break
                except SubmitError as exc:
                    log.warning("batch %s: %s; trying again in %.0f s", record["id"], exc, delay)
                else:
                    if not summary.unsent:
                        break
                    log.warning("batch %s: Tier 1 shut down before taking every line; trying again in %.0f s",
                                record["id"], delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
        finally:
            counter.cancel()
        self._set(record, "finalizing")

    async def _count(self, record: dict[str, Any], results: Path) -> None:
        """Keep request_counts up with the results file as lines land in it."""
        offset, completed, failed = 0, 0, 0
        while True:
            offset, done, bad = await asyncio.to_thread(_tally, results, offset)
            if done or bad:
                completed, failed = completed + done, failed + bad
                record["request_counts"].update(completed=completed, failed=failed)
                self.batches.save(record)
            await asyncio.sleep(COUNT_INTERVAL_S)

    async def _finalize(self, record: dict[str, Any]) -> None:
        """Split the results into the output and error files, then the final status; safe to redo."""
        final = "cancelled" if record["status"] == "cancelling" else record.get("_finish_as", "completed")
        directory = self.batches.dir(record["id"])
        if final != "completed":
            await abandon(self.tier1, directory / "input.jsonl", directory / "results.jsonl")
        if "_file_ids" not in record:  # fixed before any file is written: a redone finalize reuses them
            record["_file_ids"] = [new_id("file-"), new_id("file-")]
            self.batches.save(record)
        tmp = [self.files.root / f".{file_id}.tmp" for file_id in record["_file_ids"]]
        done, failed, usage = await asyncio.to_thread(split_results, directory / "results.jsonl", *tmp)
        ids: list[str | None] = []
        for path, count, file_id, kind in zip(tmp, (done, failed), record["_file_ids"], ("output", "error")):
            if count:
                self.files.add(path, path.stat().st_size, f"{record['id']}_{kind}.jsonl", "batch_output",
                               record["_owner"], file_id)
            else:
                path.unlink(missing_ok=True)
            ids.append(file_id if count else None)
        record["request_counts"].update(completed=done, failed=failed)
        self._set(record, final, output_file_id=ids[0], error_file_id=ids[1], usage=usage_object(usage))
        for name in ("results.jsonl", "input.jsonl"):  # their lines live on in the output and error files
            (directory / name).unlink(missing_ok=True)
        log.info("batch %s: %s, %d done, %d failed", record["id"], final, done, failed)


def _tally(path: Path, offset: int) -> tuple[int, int, int]:
    """(new offset, successes, failures) of the whole lines past ``offset``; a line still being written waits."""
    done = failed = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                offset += len(raw)
                try:
                    bad = is_error(json.loads(raw))
                except (ValueError, AttributeError):
                    continue
                failed += bad
                done += not bad
    except FileNotFoundError:
        pass
    return offset, done, failed


async def abandon(tier1: Tier1, inputs: Path, results: Path, attempts: int = 20) -> None:
    """Make Tier 1 drop what it still runs or keeps for a batch: a client of the same batch that does
    not resume and sends nothing starts it over, empty. Tier 1 may not yet have seen the batch's own
    client go (it refuses a second one meanwhile), hence the attempts."""
    info = {"batch_id": batch_id(inputs, results), "resume": False}
    for _ in range(attempts):
        conn = None
        try:
            conn = await open_connection(tier1.host, tier1.port)
            await client_handshake(conn, "client", info, secret=tier1.secret)
            while True:
                header, _ = await conn.recv()
                if header["type"] == MsgType.CAPACITY:
                    await conn.send({"type": MsgType.DONE})
                elif header["type"] == MsgType.DONE:
                    return
                elif header["type"] == MsgType.ERROR:
                    break
        except (OSError, ConnectionClosed, ProtocolError):
            pass
        finally:
            if conn is not None:
                conn.close()
        await asyncio.sleep(0.25)
    log.warning("could not tell Tier 1 at %s:%d to stop batch %s; what it still runs finishes into its spool",
                tier1.host, tier1.port, info["batch_id"])
