"""Input lines: the plain JSONL form and the OpenAI Batch API form (output lines: ``results``).

Parsing is strict: an unknown field, a wrong type or an out-of-range value becomes a
``RequestError`` for that line, never a silent default, and never stops the run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from glinthawk import logprobs as lp
from glinthawk.structured import FIELDS as STRUCTURED_FIELDS
from glinthawk.structured import Constraint, from_fields
from glinthawk.compute.sampling import SamplingParams

log = logging.getLogger("glinthawk.requests")

PLAIN, OPENAI = "plain", "openai"
COMPLETIONS_URL, CHAT_URL = "/v1/completions", "/v1/chat/completions"
MAX_LINE_BYTES = 16 * 1024 * 1024
# Numbers one line may hold (a prompt of token ids is the only field with many): JSON makes each
# a Python int of some 40 bytes, so a line of nothing else would cost ~7x its size.
MAX_LINE_NUMBERS = 1 << 20
_COUNT_NUMBERS_FROM = 1 << 20  # bytes: a shorter line cannot hold MAX_LINE_NUMBERS numbers

_SAMPLING_FIELDS = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
}
_LOGPROB_FIELDS = {"logprobs", "top_logprobs", "prompt_logprobs"}
MAX_N = 128  # choices (n) one request may ask for
_TEMPLATE_RESERVED = {"messages", "bos_token", "eos_token"}  # variables the chat template gets from us
_PLAIN_FIELDS = {"custom_id", "prompt", "messages", "n", "chat_template_kwargs"} | _SAMPLING_FIELDS | _LOGPROB_FIELDS | STRUCTURED_FIELDS
_OPENAI_FIELDS = {"custom_id", "method", "url", "body"}
# Fields an OpenAI body may carry that change nothing here, with the only value we honour.
_OPENAI_NEUTRAL = {"model": None, "stream": False, "user": None}
_OPENAI_BODY_FIELDS = ({"prompt", "messages", "max_completion_tokens", "echo", "n", "chat_template_kwargs"}
                       | _SAMPLING_FIELDS
                       | _LOGPROB_FIELDS | STRUCTURED_FIELDS | set(_OPENAI_NEUTRAL))
# JSON lets "\ud800" escape half a surrogate pair: it decodes to a str that is not Unicode
# text, which the tokenizer refuses and no result line can be encoded with.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Request:
    custom_id: str
    line: int
    form: str  # PLAIN or OPENAI
    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    url: str = COMPLETIONS_URL
    model: str | None = None
    # The sampling fields the line left out (or gave as null): the checkpoint's
    # generation_config.json may set their defaults (generation_config.py). A Request made
    # in code leaves it empty, so its params are taken as they are.
    unset: frozenset[str] = frozenset()
    echo: bool = False  # completions: the prompt comes back before the completion
    show_prompt_logprobs: bool = False  # the line asked for prompt_logprobs by that name
    structured: Constraint | None = None  # what the output must match (response_format, guided_*)
    n: int = 1  # choices to generate (samples.py)
    template_kwargs: dict[str, Any] | None = None  # chat_template_kwargs: further chat template variables

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class RequestError(ValueError):
    """A request line that cannot be run; becomes an error line for its custom_id."""

    def __init__(self, message: str, line: int | None = None, custom_id: str | None = None, form: str = PLAIN):
        super().__init__(message)
        self.message, self.line, self.custom_id, self.form = message, line, custom_id, form


def internal_error(exc: Exception, number: int, custom_id: str | None = None, form: str = PLAIN) -> RequestError:
    """A bug met while taking one line in, as that line's error: it must fail alone, never the run.

    Call it inside the ``except`` block: the traceback goes to the log.
    """
    log.exception("line %d: internal error", number)
    return RequestError(f"line {number}: internal error while taking this request in ({exc!r}); "
                        "please report it with the line", number, custom_id, form)


def read_lines(stream: BinaryIO, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, raw bytes) without holding more than one bounded line in memory.

    A line over ``max_line_bytes`` is skipped to its end and yielded as ``None``.
    """
    number = 0
    while True:
        chunk = stream.readline(max_line_bytes + 1)
        if not chunk:
            return
        number += 1
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):  # discard the rest of the line
                chunk = stream.readline(1 << 20)
            yield number, None
            continue
        if chunk.strip():
            yield number, chunk


def parse_line(number: int, raw: bytes | None, max_line_bytes: int = MAX_LINE_BYTES) -> Request:
    """Parse one JSONL line into a Request, or raise RequestError naming the problem."""
    if raw is None:
        raise RequestError(f"line {number}: longer than the {max_line_bytes}-byte limit", number)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})", number) from None
    try:
        obj = json.loads(text) if len(raw) < _COUNT_NUMBERS_FROM else _loads_counting(text, number)
    except json.JSONDecodeError as exc:
        raise RequestError(f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})", number) from None
    except RecursionError:
        raise RequestError(f"line {number}: JSON nested too deeply", number) from None
    if not isinstance(obj, dict):
        raise RequestError(f"line {number}: expected a JSON object, got {type(obj).__name__}", number)
    form = OPENAI if ("body" in obj or "url" in obj) else PLAIN
    custom_id = obj.get("custom_id")
    if custom_id is None and form == PLAIN:
        custom_id = f"line-{number}"
    if not isinstance(custom_id, str) or not custom_id:
        raise RequestError(f"line {number}: 'custom_id' must be a non-empty string", number, None, form)
    where = _lone_surrogate(obj)
    if where is not None:  # a bad custom_id stays out of the error line: it could not be written either
        raise RequestError(
            f"line {number}: {where} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not "
            "Unicode text; remove it or give the complete surrogate pair",
            number, None if where == "'custom_id'" else custom_id, form,
        )
    try:
        return _parse_openai(obj, number, custom_id) if form == OPENAI else _parse_plain(obj, number, custom_id)
    except RequestError:
        raise
    except (ValueError, TypeError) as exc:
        raise RequestError(f"line {number}: {exc}", number, custom_id, form) from None
    except Exception as exc:
        raise internal_error(exc, number, custom_id, form) from None


class _TooManyNumbers(Exception):
    pass


def _loads_counting(text: str, number: int) -> Any:
    """``json.loads``, stopped (RequestError) at the first number past MAX_LINE_NUMBERS."""
    count = 0

    def counted(kind: type) -> Callable[[str], Any]:
        def parse(digits: str) -> Any:
            nonlocal count
            count += 1
            if count > MAX_LINE_NUMBERS:
                raise _TooManyNumbers
            return kind(digits)
        return parse

    try:
        return json.loads(text, parse_int=counted(int), parse_float=counted(float))
    except _TooManyNumbers:
        raise RequestError(f"line {number}: holds more than {MAX_LINE_NUMBERS} numbers; a prompt of token ids "
                           f"may hold at most {MAX_LINE_NUMBERS} (send longer prompts as text)", number) from None


def _lone_surrogate(obj: dict[str, Any]) -> str | None:
    """Where in a parsed line a string or field name holds a lone surrogate (such as 'body.stop[0]'), or None."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:  # iterative: the JSON may nest as deep as the parser allows
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return f"'{path}'"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return f"a field name in '{path}'" if path else "a field name"
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value) if isinstance(item, (str, dict, list)))
    return None


def parse_stream(stream: BinaryIO, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Request | RequestError]:
    """Every line of a JSONL stream as a Request, or the RequestError that explains it."""
    for number, raw in read_lines(stream, max_line_bytes):
        try:
            yield parse_line(number, raw, max_line_bytes)
        except RequestError as error:
            yield error


def _check_fields(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in {where}; supported: {', '.join(sorted(allowed))}")


def _unset(fields: dict[str, Any]) -> frozenset[str]:
    """The sampling fields a line leaves to the defaults: absent or null (as OpenAI clients send them)."""
    return frozenset(name for name in _SAMPLING_FIELDS if fields.get(name) is None)


def _sampling(fields: dict[str, Any], logprobs: dict[str, Any]) -> SamplingParams:
    kwargs = {k: v for k, v in fields.items() if k in _SAMPLING_FIELDS and v is not None} | logprobs
    stop = kwargs.get("stop", ())
    kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(_list_of(stop, str, "stop"))
    kwargs["stop_token_ids"] = tuple(_list_of(kwargs.get("stop_token_ids", ()), int, "stop_token_ids"))
    if not isinstance(kwargs.get("ignore_eos", False), bool):
        raise ValueError("'ignore_eos' must be true or false")
    return SamplingParams(**kwargs)


def _choices(fields: dict[str, Any]) -> int:
    n = fields.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise ValueError(f"'n' must be an integer from 1 to {MAX_N} (choices to generate), got {json.dumps(n)}")
    return n


def _list_of(value: Any, kind: type, name: str) -> list:
    if not isinstance(value, (list, tuple)) or any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
        raise ValueError(f"'{name}' must be a list of {kind.__name__}")
    return list(value)


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ValueError("'prompt' is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise ValueError("'prompt' must be a non-empty string or a non-empty list of token ids")


def _template_kwargs(fields: dict[str, Any]) -> dict[str, Any] | None:
    value = fields.get("chat_template_kwargs")
    if value is None:
        return None
    if "messages" not in fields:
        raise ValueError("'chat_template_kwargs' goes with 'messages' (a chat request)")
    if not isinstance(value, dict):
        raise ValueError("'chat_template_kwargs' must be an object of template variables, "
                         "such as {\"enable_thinking\": false}")
    if taken := sorted(_TEMPLATE_RESERVED & set(value)):
        raise ValueError(f"'chat_template_kwargs' cannot set {', '.join(taken)}: the request gives those")
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError("each message must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise ValueError("each message needs a string 'content'")
    return value


def _parse_plain(obj: dict, number: int, custom_id: str) -> Request:
    _check_fields(obj, _PLAIN_FIELDS, "the request")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError("give exactly one of 'prompt' or 'messages'")
    request = Request(custom_id, number, PLAIN, _sampling(obj, lp.plain_fields(obj)), unset=_unset(obj),
                      show_prompt_logprobs=obj.get("prompt_logprobs") is not None,
                      structured=from_fields(obj), n=_choices(obj), template_kwargs=_template_kwargs(obj))
    if "prompt" in obj:
        request.prompt = _prompt(obj["prompt"])
    else:
        request.messages, request.url = _messages(obj["messages"]), CHAT_URL
    return request


def _parse_openai(obj: dict, number: int, custom_id: str) -> Request:
    _check_fields(obj, _OPENAI_FIELDS, "the batch line")
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"'method' must be POST, got {obj.get('method')!r}")
    url, body = obj.get("url"), obj.get("body")
    if url not in (COMPLETIONS_URL, CHAT_URL):
        raise ValueError(f"unsupported url {url!r}; use {COMPLETIONS_URL} or {CHAT_URL}")
    if not isinstance(body, dict):
        raise ValueError("'body' must be a JSON object")
    _check_fields(body, _OPENAI_BODY_FIELDS, "'body'")
    for name, honoured in _OPENAI_NEUTRAL.items():
        if name in body and honoured is not None and body[name] != honoured:
            raise ValueError(f"'{name}' must be {json.dumps(honoured)} (got {json.dumps(body[name])})")
    fields = dict(body)
    completion_tokens = fields.pop("max_completion_tokens", None)
    if fields.get("max_tokens") is None:  # absent or null: max_completion_tokens (its newer name) counts
        fields["max_tokens"] = completion_tokens
    model = body.get("model")
    logprobs, echo = lp.openai_fields(body, url == CHAT_URL)
    if echo and fields.get("max_tokens") == 0:
        logprobs.setdefault("prompt_logprobs", 0)  # max_tokens 0 with echo: the prompt alone comes back
    request = Request(custom_id, number, OPENAI, _sampling(fields, logprobs), url=url,
                      model=model if isinstance(model, str) else None, unset=_unset(fields), echo=echo,
                      show_prompt_logprobs=body.get("prompt_logprobs") is not None,
                      structured=from_fields(body), n=_choices(body), template_kwargs=_template_kwargs(body))
    if url == CHAT_URL:
        if "prompt" in body:
            raise ValueError(f"{CHAT_URL} takes 'messages', not 'prompt'")
        request.messages = _messages(body.get("messages"))
    else:
        if "messages" in body:
            raise ValueError(f"{COMPLETIONS_URL} takes 'prompt', not 'messages'")
        request.prompt = _prompt(body.get("prompt"))
    return request
