"""Batch records and the work on their files: validating an input file, splitting results into
the output and error files as OpenAI does.

A batch lives in ``batches/<id>/``: ``batch.json`` (the Batch object, rewritten atomically at
each change), ``input.jsonl`` (a hard link to the uploaded file, so deleting that file does not
take a running batch's input away) and ``results.jsonl``, which the submit client appends to and
resumes from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from glinthawk.requests import CHAT_URL, COMPLETIONS_URL, MAX_LINE_BYTES, read_lines
from glinthawk.results import is_error
from glinthawk.serve.store import ApiError, new_id, not_found, read_json, write_json

ENDPOINTS = (COMPLETIONS_URL, CHAT_URL)
WINDOWS = {"24h": 24 * 3600}
MAX_ERRORS = 100  # validation stops reporting (and reading) after this many bad lines
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_METADATA = 16


class BatchStore:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        for meta in self.root.glob("batch_*/batch.json"):
            record = read_json(meta)
            if record is not None:
                self.records[record["id"]] = record

    def dir(self, batch_id: str) -> Path:
        return self.root / batch_id

    def get(self, batch_id: str, owner: str) -> dict[str, Any]:
        record = self.records.get(batch_id)
        if record is None or record["_owner"] != owner:
            raise not_found("batch", batch_id)
        return record

    def owned(self, owner: str) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r["_owner"] == owner]

    def save(self, record: dict[str, Any]) -> None:
        write_json(self.dir(record["id"]) / "batch.json", record)

    def create(self, body: dict[str, Any], input_path: Path, owner: str, model: str) -> dict[str, Any]:
        """A new batch in ``validating``, its input linked into its directory (``body`` passed check_create)."""
        endpoint, window, metadata = check_create(body)
        batch_id = new_id("batch_")
        now = int(time.time())
        record = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + WINDOWS[window], "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata, "model": model,
            "usage": None, "_owner": owner,
        }
        directory = self.dir(batch_id)
        directory.mkdir()
        try:
            os.link(input_path, directory / "input.jsonl")
        except OSError:  # a file system without hard links: a copy, streamed
            shutil.copyfile(input_path, directory / "input.jsonl")
        self.save(record)
        self.records[batch_id] = record
        return record


def check_create(body: dict[str, Any]) -> tuple[str, str, dict[str, str] | None]:
    """The endpoint, window and metadata of a create request, or the 400 saying which field is wrong."""
    if not isinstance(body.get("input_file_id"), str):
        raise ApiError(400, "'input_file_id' is required: the id of a file uploaded with purpose 'batch'",
                       param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise ApiError(400, f"'endpoint' must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    window = body.get("completion_window")
    if window not in WINDOWS:
        raise ApiError(400, f"'completion_window' must be one of {', '.join(WINDOWS)}, got {window!r}",
                       param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= MAX_METADATA
                                     and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                                             and len(v) <= 512 for k, v in metadata.items())):
        raise ApiError(400, f"'metadata' must map at most {MAX_METADATA} keys (64 characters at most) to strings "
                       "(512 characters at most)", param="metadata")
    unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata",
                                  "output_expires_after"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}", param=unknown[0])
    return endpoint, window, metadata


def _line_problem(raw: bytes | None, endpoint: str, seen: set[str]) -> tuple[str, str, str | None] | None:
    """(code, message, param) for a line OpenAI would refuse the whole batch for, or None.

    Only the envelope is judged here; a bad body (an unknown sampling field, a prompt over the
    context) is that request's own error line, as with OpenAI.
    """
    if raw is None:
        return "line_too_long", f"longer than the {MAX_LINE_BYTES}-byte line limit", None
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "invalid_json_line", "not valid JSON", None
    if not isinstance(obj, dict):
        return "invalid_json_line", "not a JSON object", None
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id", "'custom_id' must be a non-empty string", "custom_id"
    if custom_id in seen:
        return "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line; each must be unique", \
            "custom_id"
    seen.add(custom_id)
    if obj.get("method") != "POST":
        return "invalid_method", f"'method' must be \"POST\", got {obj.get('method')!r}", "method"
    if obj.get("url") != endpoint:
        return "mismatched_endpoint", f"'url' is {obj.get('url')!r} but the batch's endpoint is {endpoint!r}", "url"
    if not isinstance(obj.get("body"), dict):
        return "invalid_body", "'body' must be a JSON object", "body"
    return None


def validate_input(path: Path, endpoint: str) -> tuple[int, list[dict[str, Any]]]:
    """(requests, errors) of an input file, each error as OpenAI's BatchError; run in a worker thread."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = 0
    with open(path, "rb") as f:
        for number, raw in read_lines(f, MAX_LINE_BYTES):
            total += 1
            problem = _line_problem(raw, endpoint, seen)
            if problem is not None:
                code, message, param = problem
                errors.append({"code": code, "message": f"line {number}: {message}", "param": param, "line": number})
                if len(errors) >= MAX_ERRORS:
                    break
    if total == 0:
        errors.append({"code": "empty_file", "message": "the input file has no requests", "param": None,
                       "line": None})
    return total, errors


def split_results(results: Path, output: Path, errors: Path) -> tuple[int, int, dict[str, int]]:
    """Write each result line to ``output`` or (a failed request) ``errors``; run in a worker thread.

    Each custom_id is kept once (the first line), whatever a resumed run appended. Returns the
    two counts and the token usage of the successful requests.
    """
    seen: set[str] = set()
    counts = [0, 0]
    usage = {"input_tokens": 0, "output_tokens": 0}
    with open(output, "wb") as out, open(errors, "wb") as err:
        if results.exists():
            with open(results, "rb") as f:
                for number, raw in read_lines(f, MAX_LINE_BYTES):
                    line = _result(raw)
                    if line is None or line.get("custom_id") in seen:
                        continue
                    seen.add(line.get("custom_id"))
                    failed = is_error(line)
                    line.pop("line", None)
                    (err if failed else out).write((json.dumps(line, ensure_ascii=False) + "\n").encode())
                    counts[failed] += 1
                    if not failed:
                        tokens = line.get("response", {}).get("body", {}).get("usage", {})
                        usage["input_tokens"] += int(tokens.get("prompt_tokens", 0))
                        usage["output_tokens"] += int(tokens.get("completion_tokens", 0))
        for f in (out, err):
            f.flush()
            os.fsync(f.fileno())
    return counts[0], counts[1], usage


def _result(raw: bytes | None) -> dict[str, Any] | None:
    """A whole result line, or None (a line cut off by a crash, which the resumed run answered again)."""
    if raw is None or not raw.endswith(b"\n"):
        return None
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None


def usage_object(usage: dict[str, int]) -> dict[str, Any]:
    """Token usage as the Batch object reports it."""
    return {"input_tokens": usage["input_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["output_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["input_tokens"] + usage["output_tokens"]}
