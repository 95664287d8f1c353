"""The Files endpoints' store: each file's bytes in ``<id>.data``, its record in ``<id>.json``.

Uploads are streamed to disk in chunks and counted against the size limit as they arrive, so a
multi-GB (or hostile) upload never sits in memory; the record is written last, so a file exists
only once its bytes are whole.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from glinthawk.requests import MAX_LINE_BYTES, read_lines
from glinthawk.serve.store import ApiError, new_id, not_found, read_json, write_json

CHUNK_BYTES = 1 << 20
PURPOSES = ("batch",)  # what may be uploaded; the service itself makes "batch_output" files


class FileStore:
    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        for meta in self.root.glob("file-*.json"):
            record = read_json(meta)
            if record is not None and self.data_path(record["id"]).is_file():
                self.records[record["id"]] = record
        for stray in self.root.glob(".*.tmp"):  # an upload or a record cut short by a crash
            stray.unlink(missing_ok=True)

    def data_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.data"

    def get(self, file_id: str, owner: str) -> dict[str, Any]:
        record = self.records.get(file_id)
        if record is None or record["_owner"] != owner:
            raise not_found("file", file_id)
        return record

    def owned(self, owner: str, purpose: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r["_owner"] == owner and purpose in (None, r["purpose"])]

    def temp_path(self) -> Path:
        return self.root / f".{new_id('upload-')}.tmp"

    async def receive(self, part: Any, tmp: Path) -> int:
        """Stream a multipart part to ``tmp``; refuse it (413) once it passes the size limit."""
        size = 0
        with open(tmp, "wb") as f:
            while chunk := await part.read_chunk(CHUNK_BYTES):
                size += len(chunk)
                if size > self.max_bytes:
                    raise ApiError(413, f"file is larger than this service's limit of {self.max_bytes} bytes; "
                                   "split it into several batches", param="file", code="file_too_large")
                f.write(chunk)
        return size

    def add(self, tmp: Path, size: int, filename: str, purpose: str, owner: str,
            file_id: str | None = None) -> dict[str, Any]:
        """Make ``tmp``'s bytes a file: moved into place first, the record written last."""
        file_id = file_id or new_id("file-")
        record = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
                  "status_details": None, "_owner": owner}
        os.replace(tmp, self.data_path(file_id))
        write_json(self.root / f"{file_id}.json", record)
        self.records[file_id] = record
        return record

    def delete(self, file_id: str, owner: str) -> None:
        self.get(file_id, owner)
        (self.root / f"{file_id}.json").unlink(missing_ok=True)  # record first: no record, no file
        self.data_path(file_id).unlink(missing_ok=True)
        del self.records[file_id]


def check_batch_jsonl(path: Path) -> str | None:
    """Why ``path`` is not a Batch API input file (every line a JSON object), or None.

    Run in a worker thread: it reads the whole file, one bounded line at a time.
    """
    lines = 0
    with open(path, "rb") as f:
        for number, raw in read_lines(f, MAX_LINE_BYTES):
            if raw is None:
                return f"line {number} is longer than the {MAX_LINE_BYTES}-byte limit"
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                return f"line {number} is not valid JSON"
            if not isinstance(obj, dict):
                return f"line {number} is not a JSON object"
            lines += 1
    return None if lines else "the file has no requests"
