"""The online endpoints, answered through the same cluster as batches.

Each request is submitted to Tier 1 as a one-line batch in the Batch API form: the same parsing,
validation and result lines as a batch line, and Tier 1 gives every batch its turn for room, so
a long batch does not starve online requests. The cost is a connection and a small file per
request (a few milliseconds), small beside generation itself. ``stream: true`` is answered as
server-sent events once the completion is whole: one chunk with the whole text, then ``[DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from glinthawk.client import SubmitError, submit
from glinthawk.requests import MAX_LINE_BYTES
from glinthawk.serve.runner import Tier1
from glinthawk.serve.store import ApiError


async def complete(tier1: Tier1, workdir: Path, url: str, request: web.Request) -> web.StreamResponse:
    """Answer one /v1/completions or /v1/chat/completions request."""
    body = await json_body(request)
    stream = body.pop("stream", False)
    body.pop("stream_options", None)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    response = await _run_one(tier1, workdir, url, body)
    status, answer = response["status_code"], response["body"]
    if status != 200 or not stream:
        return web.json_response(answer, status=status)
    return await _as_events(request, answer, url)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 400 saying what is wrong with it."""
    if request.content_length is not None and request.content_length > MAX_LINE_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_LINE_BYTES} bytes")
    data = bytearray()
    while chunk := await request.content.read(1 << 16):
        data += chunk
        if len(data) > MAX_LINE_BYTES:
            raise ApiError(413, f"request body is larger than {MAX_LINE_BYTES} bytes")
    try:
        body = json.loads(data or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON; send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def _run_one(tier1: Tier1, workdir: Path, url: str, body: dict[str, Any]) -> dict[str, Any]:
    name = uuid.uuid4().hex
    inputs, results = workdir / f"{name}.jsonl", workdir / f"{name}.out.jsonl"
    line = {"custom_id": name, "method": "POST", "url": url, "body": body}
    try:
        inputs.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
        await submit(inputs, tier1.host, tier1.port, results, progress=False, secret=tier1.secret)
        with open(results, encoding="utf-8") as f:
            first = f.readline()
        if not first:
            raise SubmitError("Tier 1 shut down before answering")
        answer = json.loads(first)
    except SubmitError as exc:
        raise ApiError(503, f"the cluster cannot take requests now ({exc}); try again shortly",
                       type="server_error") from None
    except (OSError, ValueError) as exc:
        raise ApiError(500, f"no answer from the cluster ({exc})", type="server_error") from None
    finally:
        inputs.unlink(missing_ok=True)
        results.unlink(missing_ok=True)
    return answer["response"]


async def _as_events(request: web.Request, answer: dict[str, Any], url: str) -> web.StreamResponse:
    """A finished completion as a stream: a chunk holding each choice's whole text, then [DONE]."""
    chat = url.endswith("chat/completions")
    chunks = []
    for choice in answer["choices"]:  # several with n
        if chat:
            delta = {"role": "assistant", "content": choice["message"]["content"]}
            chunk_choice = {"index": choice["index"], "delta": delta, "logprobs": choice.get("logprobs"),
                            "finish_reason": choice["finish_reason"]}
        else:
            chunk_choice = {"index": choice["index"], "text": choice["text"], "logprobs": choice.get("logprobs"),
                            "finish_reason": choice["finish_reason"]}
        chunks.append({"id": answer["id"], "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": answer.get("created", int(time.time())), "model": answer["model"],
                       "choices": [chunk_choice], "usage": answer.get("usage")})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
