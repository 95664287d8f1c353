"""The HTTP routes (aiohttp): Files, Batches, the online completions and models, bearer-key auth.

Every refusal is OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``) with
a 4xx status and a one-line message saying what to do; nothing a client sends produces a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from glinthawk.requests import CHAT_URL, COMPLETIONS_URL
from glinthawk.serve import online
from glinthawk.serve.batches import BatchStore, check_create
from glinthawk.serve.files import PURPOSES, FileStore, check_batch_jsonl
from glinthawk.serve.runner import Runner, Tier1
from glinthawk.serve.store import ApiError, page, public

log = logging.getLogger("glinthawk.serve")
FORM_SLACK = 64 << 10  # multipart headers and the purpose field, beyond the file itself
MAX_FIELD_BYTES = 1024


@dataclass
class Service:
    files: FileStore
    batches: BatchStore
    runner: Runner
    tier1: Tier1
    model: str
    online_dir: Path
    keys: dict[str, str] = field(default_factory=dict)  # API key -> owner (a digest of the key)
    started: int = field(default_factory=lambda: int(time.time()))


SERVICE = web.AppKey("service", Service)


def owner_of(key: str) -> str:
    """What files and batches record as their owner: a digest, so no key is ever written to disk."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}",
                         code="unknown_url" if exc.status == 404 else None)
        return web.json_response(error.body(), status=exc.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("%s %s: internal error", request.method, request.path)
        error = ApiError(500, f"internal error ({exc!r}); the service log has the details", type="server_error")
        return web.json_response(error.body(), status=500)


@web.middleware
async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """With API keys: every request carries one of them (Bearer); it names the owner of what it makes."""
    keys = request.app[SERVICE].keys
    if not keys:
        request["owner"] = ""
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "no API key given; send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
    owner = next((o for key, o in keys.items() if hmac.compare_digest(key.encode(), token.strip().encode())), None)
    if owner is None:
        raise ApiError(401, "incorrect API key; use one listed in the service's --api-key-file",
                       code="invalid_api_key")
    request["owner"] = owner
    return await handler(request)


async def upload_file(request: web.Request) -> web.Response:
    svc, owner = request.app[SERVICE], request["owner"]
    if request.content_length is not None and request.content_length > svc.files.max_bytes + FORM_SLACK:
        raise ApiError(413, f"file is larger than this service's limit of {svc.files.max_bytes} bytes; "
                       "split it into several batches", param="file", code="file_too_large")
    tmp = svc.files.temp_path()
    try:
        size, filename, purpose = await _read_form(request, svc.files, tmp)
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose {purpose!r} is not supported here; upload with purpose 'batch'",
                           param="purpose")
        problem = await asyncio.to_thread(check_batch_jsonl, tmp)
        if problem is not None:
            raise ApiError(400, f"not a Batch API input file (JSONL, one request object a line): {problem}",
                           param="file", code="invalid_file_format")
        record = svc.files.add(tmp, size, filename, purpose, owner)
    finally:
        tmp.unlink(missing_ok=True)
    return web.json_response(public(record))


async def _read_form(request: web.Request, files: FileStore, tmp: Path) -> tuple[int, str, str]:
    """(size, filename, purpose) of a multipart upload, its file streamed to ``tmp``."""
    malformed = ApiError(400, "expected a multipart/form-data body with a 'file' part and a 'purpose' field")
    size, filename, purpose = None, "file.jsonl", None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise malformed
            if part.name == "file":
                if size is not None:
                    raise ApiError(400, "give one 'file' part per upload", param="file")
                filename = part.filename or filename
                size = await files.receive(part, tmp)
            elif part.name == "purpose":
                purpose = await _small_field(part)
            else:
                await part.release()  # fields we do not use (expires_after): ignored, as OpenAI's optional ones
    except (ValueError, AssertionError, KeyError, UnicodeDecodeError):
        raise malformed from None
    if size is None:
        raise ApiError(400, "the upload has no 'file' part; send the JSONL file as 'file'", param="file")
    if purpose is None:
        raise ApiError(400, "the upload has no 'purpose' field; send purpose=batch", param="purpose")
    return size, filename, purpose


async def _small_field(part: BodyPartReader) -> str:
    """A text field of the form, read with a bound (a huge 'purpose' is refused, not buffered)."""
    value = bytearray()
    while chunk := await part.read_chunk(256):
        value += chunk
        if len(value) > MAX_FIELD_BYTES:
            raise ApiError(400, f"'{part.name}' is longer than {MAX_FIELD_BYTES} bytes", param=part.name)
    return value.decode("utf-8", "replace").strip()


async def list_files(request: web.Request) -> web.Response:
    svc, query = request.app[SERVICE], request.query
    records = svc.files.owned(request["owner"], query.get("purpose"))
    return web.json_response(page(records, query.get("after"), query.get("limit"), query.get("order", "desc")))


async def get_file(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response(public(svc.files.get(request.match_info["id"], request["owner"])))


async def file_content(request: web.Request) -> web.FileResponse:
    svc = request.app[SERVICE]
    record = svc.files.get(request.match_info["id"], request["owner"])
    return web.FileResponse(svc.files.data_path(record["id"]), headers={"Content-Type": "application/jsonl"})


async def delete_file(request: web.Request) -> web.Response:
    svc, file_id = request.app[SERVICE], request.match_info["id"]
    svc.files.delete(file_id, request["owner"])
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.Response:
    svc, owner = request.app[SERVICE], request["owner"]
    body = await online.json_body(request)
    check_create(body)
    source = svc.files.get(body["input_file_id"], owner)
    if source["purpose"] != "batch":
        raise ApiError(400, f"file {source['id']} has purpose {source['purpose']!r}; a batch's input must be "
                       "uploaded with purpose 'batch'", param="input_file_id")
    record = svc.batches.create(body, svc.files.data_path(source["id"]), owner, svc.model)
    svc.runner.start(record)
    return web.json_response(public(record))


async def list_batches(request: web.Request) -> web.Response:
    svc, query = request.app[SERVICE], request.query
    return web.json_response(page(svc.batches.owned(request["owner"]), query.get("after"), query.get("limit")))


async def get_batch(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    return web.json_response(public(svc.batches.get(request.match_info["id"], request["owner"])))


async def cancel_batch(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    record = svc.batches.get(request.match_info["id"], request["owner"])
    svc.runner.cancel(record)
    return web.json_response(public(record))


def _model(svc: Service) -> dict[str, Any]:
    return {"id": svc.model, "object": "model", "created": svc.started, "owned_by": "glinthawk"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(request.app[SERVICE])]})


async def get_model(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if request.match_info["id"] != svc.model:
        raise ApiError(404, f"no model {request.match_info['id']!r}; this service serves {svc.model!r}",
                       param="model", code="model_not_found")
    return web.json_response(_model(svc))


def _online(url: str) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        svc = request.app[SERVICE]
        return await online.complete(svc.tier1, svc.online_dir, url, request)
    return handle


def make_app(service: Service) -> web.Application:
    """The aiohttp application; the multipart upload streams, so no request body limit applies to it."""
    app = web.Application(middlewares=[errors, auth])
    app[SERVICE] = service
    app.add_routes([
        web.post("/v1/files", upload_file), web.get("/v1/files", list_files),
        web.get("/v1/files/{id}", get_file), web.get("/v1/files/{id}/content", file_content),
        web.delete("/v1/files/{id}", delete_file),
        web.post("/v1/batches", create_batch), web.get("/v1/batches", list_batches),
        web.get("/v1/batches/{id}", get_batch), web.post("/v1/batches/{id}/cancel", cancel_batch),
        web.post(COMPLETIONS_URL, _online(COMPLETIONS_URL)), web.post(CHAT_URL, _online(CHAT_URL)),
        web.get("/v1/models", list_models), web.get("/v1/models/{id}", get_model),
    ])
    return app
