"""Output lines: a request's result or its error, in the form the request came in (plain
JSONL, or the OpenAI Batch API's)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from glinthawk import logprobs as lp
from glinthawk.requests import OPENAI, PLAIN, Request, RequestError


@dataclass
class Completion:
    """What the engine produced for one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[lp.TokenLogprob] | None = field(default=None, repr=False)
    prompt_logprobs: list[lp.TokenLogprob] | None = field(default=None, repr=False)
    prompt_text: str | None = None  # echo: the prompt, returned before the text


def _plain_line(request: Request, choices: list[Completion]) -> dict[str, Any]:
    """The plain form: one choice's fields at the top level; with n > 1, a list of choices
    (text, token_ids, finish_reason, completion_tokens, logprobs) and the total."""
    first = choices[0]
    line: dict[str, Any] = {"custom_id": request.custom_id}
    if len(choices) > 1:
        line["choices"] = [{"index": i, **_plain_choice(done)} for i, done in enumerate(choices)]
    else:
        line.update(text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason)
    line["prompt_tokens"] = first.prompt_tokens
    line["completion_tokens"] = sum(len(done.token_ids) for done in choices)
    if len(choices) == 1 and first.logprobs is not None:
        line["logprobs"] = lp.plain_list(first.logprobs)
    if first.prompt_logprobs is not None:
        line["prompt_logprobs"] = lp.plain_list(first.prompt_logprobs)
    return line


def _plain_choice(done: Completion) -> dict[str, Any]:
    choice = {"text": done.text, "token_ids": done.token_ids, "finish_reason": done.finish_reason}
    if done.logprobs is not None:
        choice["logprobs"] = lp.plain_list(done.logprobs)
    return choice


def result_line(request: Request, done: Completion | list[Completion], model_name: str) -> dict[str, Any]:
    """The line answering ``request``: ``done``, or its n choices in order."""
    choices = done if isinstance(done, list) else [done]
    if request.form == PLAIN:
        return _plain_line(request, choices)
    first = choices[0]
    completion_tokens = sum(len(choice.token_ids) for choice in choices)
    body = {
        "id": ("chatcmpl-" if request.is_chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if request.is_chat else "text_completion",
        "created": int(time.time()),
        "model": request.model or model_name,
        "choices": [_openai_choice(request, index, choice) for index, choice in enumerate(choices)],
        "usage": {
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": first.prompt_tokens + completion_tokens,
        },
    }
    if request.show_prompt_logprobs and first.prompt_logprobs is not None:
        body["prompt_logprobs"] = lp.vllm_prompt_logprobs(first.prompt_logprobs)
    return _openai_line(request.custom_id, 200, body)


def _openai_choice(request: Request, index: int, done: Completion) -> dict[str, Any]:
    if request.is_chat:
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": done.text}}
    else:
        choice = {"text": done.text if done.prompt_text is None else done.prompt_text + done.text}
    logprobs = lp.choice_logprobs(request.is_chat, done.logprobs, done.prompt_logprobs if request.echo else None,
                                  done.prompt_text)
    return {"index": index, **choice, "logprobs": logprobs, "finish_reason": done.finish_reason}


def error_line(error: RequestError) -> dict[str, Any]:
    """The output line of a request that failed; ``line`` (its input line number) lets a
    resumed run tell which line it answers, even one without a usable custom_id."""
    if error.form == OPENAI:
        body = {"error": {"message": error.message, "type": "invalid_request_error", "param": None, "code": None}}
        line = _openai_line(error.custom_id, 400, body)
    else:
        line = {"custom_id": error.custom_id, "error": {"message": error.message}}
    if error.line is not None:
        line["line"] = error.line
    return line


def _openai_line(custom_id: str | None, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": "req_" + uuid.uuid4().hex, "body": body},
        "error": None,
    }


def completion_tokens(line: dict[str, Any]) -> int:
    """Tokens a result line generated, in either form (0 for an error line)."""
    if "completion_tokens" in line:
        return int(line["completion_tokens"])
    return int(((line.get("response") or {}).get("body") or {}).get("usage", {}).get("completion_tokens", 0))


def is_error(line: dict[str, Any]) -> bool:
    return "error" in line and (line["error"] is not None or line.get("response", {}).get("status_code") != 200)
