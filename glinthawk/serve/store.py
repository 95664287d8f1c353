"""What the service keeps under --data-dir: JSON records written atomically, and the errors it answers with.

Every record is one small JSON file replaced in one rename, so a service killed at any moment
finds each record either as it was or as it became, never half written.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any


class ApiError(Exception):
    """A request the service refuses: answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(kind: str, object_id: str) -> ApiError:
    """Unknown ids and other keys' objects look the same, so an id tells a caller nothing it may not see."""
    return ApiError(404, f"No {kind} found with id '{object_id}'.", param="id", code="not_found")


def new_id(prefix: str) -> str:
    """An id that sorts by creation time (newest last), so listing pages by id needs no index."""
    return f"{prefix}{time.time_ns():016x}{secrets.token_hex(4)}"


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` with ``record`` in one rename, after the bytes are on disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A record, or None for one that cannot be read (a stray file): the service starts anyway."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the API shows it: fields starting with '_' (owner, bookkeeping) stay inside."""
    return {key: value for key, value in record.items() if not key.startswith("_")}


def page(records: list[dict[str, Any]], after: str | None, limit: str | None,
         order: str = "desc") -> dict[str, Any]:
    """One page of a list as OpenAI pages it: ``limit`` (1-100, default 20) records after the id ``after``."""
    try:
        count = 20 if limit is None else int(limit)
    except ValueError:
        raise ApiError(400, f"'limit' must be an integer from 1 to 100, got {limit!r}", param="limit") from None
    if not 1 <= count <= 100:
        raise ApiError(400, f"'limit' must be from 1 to 100, got {count}", param="limit")
    if order not in ("asc", "desc"):
        raise ApiError(400, f"'order' must be 'asc' or 'desc', got {order!r}", param="order")
    ordered = sorted(records, key=lambda r: r["id"], reverse=order == "desc")
    if after is not None:
        ordered = [r for r in ordered if (r["id"] < after if order == "desc" else r["id"] > after)]
    data = [public(r) for r in ordered[:count]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > count}
