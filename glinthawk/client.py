"""``glinthawk submit``: stream a JSONL file to Tier 1 and write results as they arrive.

The file is read line by line (bounded), sent in small SUBMIT frames, and TCP flow
control does the rest: when Tier 1 has enough queued it stops reading, and our sends
wait. Each result line is written and flushed on arrival, so an interrupted run leaves a
valid, partial output file.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from glinthawk.net.codec import ProtocolError
from glinthawk.net.connection import ConnectionClosed, client_handshake, open_connection
from glinthawk.net.messages import MsgType
from glinthawk.outputs import ResultWriter, count_lines
from glinthawk.requests import MAX_LINE_BYTES, read_lines

log = logging.getLogger("glinthawk.client")
LINES_PER_FRAME = 64


class SubmitError(RuntimeError):
    """The run could not be completed (Tier 1 unreachable, refused us, or went away)."""


@dataclass
class SubmitSummary:
    done: int
    failed: int
    generated_tokens: int
    unsent: bool = False  # Tier 1 drained before the whole file was sent


async def submit(
    input_path: str | Path,
    host: str,
    port: int,
    output_path: str | Path,
    *,
    progress: bool | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> SubmitSummary:
    input_path = Path(input_path)
    try:
        source = open(input_path, "rb")
    except OSError as exc:
        raise SubmitError(f"cannot read input file {input_path}: {exc.strerror}") from None
    try:
        conn = await open_connection(host, port)
        await client_handshake(conn, "client", {})
    except (OSError, ConnectionClosed, ProtocolError) as exc:
        source.close()
        raise SubmitError(f"cannot reach Tier 1 at {host}:{port}: {exc}") from None

    async def send_all() -> None:
        chunk: list[list] = []
        for number, raw in read_lines(source, max_line_bytes):
            chunk.append([number, raw])
            if len(chunk) >= LINES_PER_FRAME:
                await conn.send({"type": MsgType.SUBMIT, "lines": chunk})
                chunk = []
        if chunk:
            await conn.send({"type": MsgType.SUBMIT, "lines": chunk})
        await conn.send({"type": MsgType.DONE})

    unsent = False
    sender = asyncio.get_running_loop().create_task(send_all())
    with source, ResultWriter(output_path, total=count_lines(input_path), progress=progress) as writer:
        try:
            while True:
                if sender.done() and sender.exception() is not None:
                    raise SubmitError(f"sending to Tier 1 failed: {sender.exception()}")
                header, _ = await conn.recv()
                kind = header["type"]
                if kind == MsgType.RESULT:
                    writer.write(header["line"])
                elif kind == MsgType.DRAIN:
                    unsent = True
                    log.warning("%s", header.get("message"))
                elif kind == MsgType.DONE:
                    break
                elif kind == MsgType.ERROR:
                    raise SubmitError(f"Tier 1 error: {header.get('message')}")
        except (ConnectionClosed, ProtocolError) as exc:
            raise SubmitError(
                f"lost the connection to Tier 1 ({exc}); {writer.done + writer.failed} results were written"
            ) from None
        finally:
            sender.cancel()
            conn.close()
        return SubmitSummary(writer.done, writer.failed, writer.generated_tokens, unsent or not sender.done())
