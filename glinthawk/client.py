"""``glinthawk submit``: stream a JSONL file to Tier 1 and write results as they arrive.

The file is read line by line (bounded), sent in small SUBMIT frames, and TCP flow
control does the rest: when Tier 1 has enough queued it stops reading, and our sends
wait. Each result line is written and flushed on arrival, so an interrupted run leaves a
valid, partial output file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import Connection, ConnectionClosed, open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.messages import MsgType
from glinthawk.outputs import Output, OutputError, ResultWriter, count_lines
from glinthawk.requests import MAX_LINE_BYTES, read_lines
from glinthawk.results import is_error

log = logging.getLogger("glinthawk.client")
LINES_PER_FRAME = 64
# A SUBMIT frame also ends once its lines reach this many bytes: 64 lines of up to
# MAX_LINE_BYTES each would pass the 1 GiB frame limit, and Tier 1 would refuse the frame.
BYTES_PER_FRAME = 32 << 20


class SubmitError(RuntimeError):
    """The run could not be completed (Tier 1 unreachable, refused us, or went away)."""


@dataclass
class SubmitSummary:
    done: int
    failed: int
    generated_tokens: int
    unsent: bool = False  # Tier 1 drained before the whole file was sent


@dataclass
class Answered:
    """What an output file answers: the custom_ids of results, and the input line numbers of
    error lines and of lines without a custom_id. An error line answers its own line only: a
    duplicate custom_id's error does not answer the first line with that id."""

    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)

    def add(self, record: dict) -> bool:
        """Count an output line in; False if what it answers was answered already."""
        custom_id, line = record.get("custom_id"), record.get("line")
        if isinstance(line, int) and (is_error(record) or not isinstance(custom_id, str)):
            seen, key = self.lines, line
        elif isinstance(custom_id, str):
            seen, key = self.ids, custom_id
        else:
            return True
        if key in seen:
            return False
        seen.add(key)
        return True

    def covers(self, number: int, custom_id: str | None) -> bool:
        """Whether input line ``number``, answered under ``custom_id``, is answered."""
        return number in self.lines or custom_id in self.ids


def answered(output_path: Path) -> Answered:
    """What an output file already answers.

    A last line cut off mid-write (no newline, or not JSON) is removed so appending
    continues from a clean line boundary; that request simply runs again. An unreadable
    line with others after it was not cut off: it is kept, with a warning.
    """
    done = Answered()
    if not output_path.exists():
        return done
    offset = 0
    cut: int | None = None  # where the latest line starts, while it is unreadable
    with open(output_path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if cut is not None:
                log.warning("%s: line %d is not a result line; it is kept, and a request it may have "
                            "answered runs again", output_path, number - 1)
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                record = None
            if isinstance(record, dict):
                done.add(record)
                cut = None
            else:
                cut = offset
            offset += len(raw)
    if cut is not None:
        log.warning("%s: dropping a half-written last line before resuming", output_path)
        os.truncate(output_path, cut)
    return done


async def ask_tier1(host: str, port: int, role: str, info: dict, *, secret: bytes | None = None) -> dict:
    """One question to Tier 1 (a handshake as ``role``, then its one answer frame); OSError,
    ConnectionClosed or ProtocolError if it cannot be asked."""
    conn = None
    try:
        conn = await open_connection(host, port)
        await client_handshake(conn, role, info, secret=secret)
        header, _ = await conn.recv()
        return header
    finally:
        if conn is not None:
            conn.close()


async def fetch_status(host: str, port: int, *, secret: bytes | None = None) -> dict:
    """Ask Tier 1 for its live status."""
    try:
        header = await ask_tier1(host, port, "status", {}, secret=secret)
    except (OSError, ConnectionClosed, ProtocolError) as exc:
        raise SubmitError(f"cannot get status from Tier 1 at {host}:{port}: {exc}") from None
    header.pop("type", None)
    return header


def batch_id(input_path: Path, output_path: Path) -> str:
    """Names a submission so a resumed client finds the results Tier 1 kept for it."""
    key = f"{input_path.resolve()}\0{output_path.resolve()}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


def input_key(input_path: Path) -> str:
    """Names a submission's input alone: resumed under another output path, it still finds its results."""
    return hashlib.sha256(str(input_path.resolve()).encode()).hexdigest()[:32]


def _line_custom_id(number: int, raw: bytes | None) -> str | None:
    """The custom_id a line will be answered under, without judging the rest of it."""
    try:
        obj = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    custom_id = obj.get("custom_id")
    if custom_id is None and "body" not in obj and "url" not in obj:
        return f"line-{number}"
    return custom_id if isinstance(custom_id, str) else None


async def submit(
    input_path: str | Path,
    host: str,
    port: int,
    output_path: str | Path,
    *,
    progress: bool | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    resume: bool = False,
    secret: bytes | None = None,
) -> SubmitSummary:
    """Run every line of ``input_path`` through Tier 1; with ``resume``, only those not yet in the output.

    The output file is held (locked) for the whole run but read or changed only once Tier 1 has
    accepted the batch: a refused client leaves it exactly as it was.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    try:
        output = Output(output_path)
    except OutputError as exc:
        raise SubmitError(str(exc)) from None
    with output:
        try:
            source = open(input_path, "rb")
        except OSError as exc:
            raise SubmitError(f"cannot read input file {input_path}: {exc.strerror}") from None
        with source:
            try:
                conn = await open_connection(host, port)
                await client_handshake(conn, "client", {"batch_id": batch_id(input_path, output_path),
                                                        "input_key": input_key(input_path), "resume": resume},
                                       secret=secret)
            except (OSError, ConnectionClosed, ProtocolError) as exc:
                raise SubmitError(f"cannot reach Tier 1 at {host}:{port}: {exc}") from None
            run = _Run(conn, source, output, input_path, resume, progress, max_line_bytes)
            try:
                return await run.receive()
            finally:
                run.close()


@dataclass
class _Run:
    """One attached submission: sends the input once Tier 1 asks for it, writes results as they come."""

    conn: Connection
    source: BinaryIO
    output: Output
    input_path: Path
    resume: bool
    progress: bool | None
    max_line_bytes: int
    done: Answered = field(default_factory=Answered)
    writer: ResultWriter | None = None  # set once Tier 1 accepts the batch
    sender: asyncio.Task | None = None
    unsent: bool = False  # Tier 1 drained before the whole file was sent

    def accept(self) -> ResultWriter:
        """Tier 1 took the batch (its first RESULT or CAPACITY): only now is the output read or emptied."""
        if self.resume:
            self.done = answered(self.output.path)
        total = count_lines(self.input_path)
        if total is not None and self.resume:
            total = max(0, total - len(self.done.ids) - len(self.done.lines))
        self.writer = ResultWriter(self.output, total=total, progress=self.progress, append=self.resume)
        return self.writer

    async def receive(self) -> SubmitSummary:
        try:
            while True:
                if self.sender is not None and self.sender.done() and self.sender.exception() is not None:
                    raise SubmitError(f"sending to Tier 1 failed: {self.sender.exception()}")
                header, _ = await self.conn.recv()
                kind = header["type"]
                if kind == MsgType.ERROR:  # as the first frame, a refusal: the output was neither read nor written
                    raise SubmitError(f"Tier 1 error: {header.get('message')}")
                writer = self.writer or self.accept()
                if kind == MsgType.RESULT:
                    # Before CAPACITY come the results Tier 1 kept while we were away: not to be sent
                    # again, nor written twice (a client that died during the hand-over wrote some).
                    if self.sender is not None or self.done.add(header["line"]):
                        writer.write(header["line"])
                elif kind == MsgType.CAPACITY and self.sender is None:
                    self.sender = asyncio.get_running_loop().create_task(self.send_all())
                elif kind == MsgType.DRAIN:
                    self.unsent = True
                    log.warning("%s", header.get("message"))
                elif kind == MsgType.DONE:
                    break
        except (ConnectionClosed, ProtocolError) as exc:
            if self.unsent:  # Tier 1 announced its shutdown: what we have is whole, the rest is resumable
                return self.summary()
            raise SubmitError(f"lost the connection to Tier 1 ({exc}); {self.written()} results were written") from None
        except OutputError as exc:
            # The connection closes: Tier 1 spools what finishes from now on, for a --resume to collect.
            raise SubmitError(f"{exc}. Once it can be written again (a full disk: once there is room), rerun with "
                              "--resume (same input and -o): it collects the results Tier 1 kept meanwhile and runs "
                              "the rest") from None
        return self.summary()

    async def send_all(self) -> None:
        chunk: list[list] = []
        chunk_bytes = 0
        for number, raw in read_lines(self.source, self.max_line_bytes):
            if self.resume and self.done.covers(number, _line_custom_id(number, raw)):
                continue
            chunk.append([number, raw])
            chunk_bytes += len(raw or b"")
            if len(chunk) >= LINES_PER_FRAME or chunk_bytes >= BYTES_PER_FRAME:
                await self.conn.send({"type": MsgType.SUBMIT, "lines": chunk})
                chunk, chunk_bytes = [], 0
        if chunk:
            await self.conn.send({"type": MsgType.SUBMIT, "lines": chunk})
        await self.conn.send({"type": MsgType.DONE})

    def written(self) -> int:
        return self.writer.done + self.writer.failed if self.writer is not None else 0

    def summary(self) -> SubmitSummary:
        writer = self.writer
        unsent = self.unsent or self.sender is None or not self.sender.done()
        if writer is None:
            return SubmitSummary(0, 0, 0, unsent)
        return SubmitSummary(writer.done, writer.failed, writer.generated_tokens, unsent)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.cancel()
        self.conn.close()
        if self.writer is not None:
            self.writer.close()
