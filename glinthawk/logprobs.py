"""Log-probabilities in requests and result lines: the fields that ask for them, and the
shapes they come back in (plain lists; OpenAI's completions and chat shapes; vLLM's
``prompt_logprobs``).

What they are: log-probs of the model's raw distribution, before temperature, top-k, top-p
and min-p (as vLLM's default), computed in float32 (``compute/logprobs.py``).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glinthawk.compute.logprobs import MAX_LOGPROBS

if TYPE_CHECKING:
    from glinthawk.tokenizer import Tokenizer


@dataclass
class Scored:
    """One token's log-prob as the step gave it: no text yet."""

    logprob: float
    rank: int
    top: list[tuple[int, float]]  # the most likely tokens, most likely first


@dataclass
class TokenLogprob:
    """One token's log-prob with its text, as the result line shows it."""

    token_id: int
    token: str
    bytes: bytes
    special: bool
    logprob: float | None  # None: a prompt's first token (nothing before it to predict it)
    rank: int | None
    top: list[tuple[int, str, bytes, float]]


def render(tokenizer: Tokenizer, ids: list[int], scored: list[Scored | None]) -> list[TokenLogprob]:
    """Each of ``ids`` with its log-prob (``scored`` may be shorter: a prompt scored in part)."""
    out = []
    for index, token_id in enumerate(ids):
        entry = scored[index] if index < len(scored) else None
        token, data = tokenizer.piece(token_id)
        top = [(i, *tokenizer.piece(i), lp) for i, lp in entry.top] if entry is not None else []
        out.append(TokenLogprob(token_id, token, data, tokenizer.is_special(token_id),
                                entry.logprob if entry else None, entry.rank if entry else None, top))
    return out


# -- request fields ----------------------------------------------------------------------
def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"'{name}' must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
    return value


def plain_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The plain form's ``logprobs`` (true, or how many alternatives), ``top_logprobs`` (how
    many, with ``logprobs: true``) and ``prompt_logprobs`` as SamplingParams fields."""
    logprobs, top = obj.get("logprobs"), obj.get("top_logprobs")
    fields: dict[str, Any] = {}
    if isinstance(logprobs, bool) and top is None:
        top = 0 if logprobs else None
    elif logprobs is not None and not isinstance(logprobs, bool):
        if top is not None:
            raise ValueError("give the number of alternatives once: 'logprobs': true with 'top_logprobs': N, "
                             "or 'logprobs': N")
        top = _count(logprobs, "logprobs")
    elif top is not None and logprobs is not True:
        raise ValueError("'top_logprobs' needs 'logprobs': true")
    if top is not None:
        fields["logprobs"] = _count(top, "top_logprobs")
    if obj.get("prompt_logprobs") is not None:
        fields["prompt_logprobs"] = _count(obj["prompt_logprobs"], "prompt_logprobs")
    return fields


def openai_fields(body: dict[str, Any], chat: bool) -> tuple[dict[str, Any], bool]:
    """(SamplingParams fields, echo) of an OpenAI body: completions' ``logprobs: N`` and
    ``echo``; chat's ``logprobs: true`` with ``top_logprobs: N``; vLLM's ``prompt_logprobs``."""
    logprobs, top, echo = body.get("logprobs"), body.get("top_logprobs"), body.get("echo")
    fields: dict[str, Any] = {}
    if echo is not None and not isinstance(echo, bool):
        raise ValueError(f"'echo' must be true or false, got {echo!r}")
    if chat:
        if echo:
            raise ValueError("'echo' is a /v1/completions field; chat requests cannot take it")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ValueError(f"'logprobs' must be true or false in chat requests (the count goes in "
                             f"'top_logprobs'), got {logprobs!r}")
        if top is not None and not logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if logprobs:
            fields["logprobs"] = 0 if top is None else _count(top, "top_logprobs")
    else:
        if top is not None:
            raise ValueError("/v1/completions takes 'logprobs': N (alternatives per token), not 'top_logprobs'")
        if logprobs is not None:
            fields["logprobs"] = _count(logprobs, "logprobs")
            if echo:  # the prompt's tokens come back with theirs
                fields["prompt_logprobs"] = fields["logprobs"]
    if body.get("prompt_logprobs") is not None:
        fields["prompt_logprobs"] = _count(body["prompt_logprobs"], "prompt_logprobs")
    return fields, bool(echo)


# -- result lines ------------------------------------------------------------------------
def plain_list(entries: list[TokenLogprob]) -> list[dict[str, Any] | None]:
    """The plain form: per token its id, text, log-prob and alternatives (a prompt's first: null)."""
    return [None if e.logprob is None else {
        "token_id": e.token_id, "token": e.token, "logprob": e.logprob, "rank": e.rank,
        "top_logprobs": [{"token_id": i, "token": t, "logprob": lp} for i, t, _, lp in e.top]} for e in entries]


def vllm_prompt_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (the first: null), token id -> its log-prob,
    rank and text, for the token itself and its alternatives."""
    out: list[dict[str, Any] | None] = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        ranked = {str(i): {"logprob": lp, "rank": r + 1, "decoded_token": t} for r, (i, t, _, lp) in enumerate(e.top)}
        ranked.setdefault(str(e.token_id), {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.token})
        out.append(ranked)
    return out


def choice_logprobs(chat: bool, generated: list[TokenLogprob] | None, echoed: list[TokenLogprob] | None,
                    prompt_text: str | None) -> dict[str, Any] | None:
    """An OpenAI choice's ``logprobs`` (None unless asked for): chat's shape, or completions'
    with the ``echoed`` prompt's tokens first, as its text comes first."""
    if generated is None:
        return None
    if chat:
        return chat_logprobs(generated)
    shown = completion_logprobs((echoed or []) + generated, 0)
    if echoed is not None:  # the completion's offsets count from the end of the prompt's text
        shown["text_offset"][len(echoed):] = text_offsets(generated, len(prompt_text or ""))
    return shown


def completion_logprobs(entries: list[TokenLogprob], first_offset: int) -> dict[str, Any]:
    """OpenAI's completions shape: parallel lists of tokens, their log-probs, alternatives (text ->
    log-prob) and the character offset of each token in the returned text."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {t: lp for _, t, _, lp in e.top} for e in entries],
        "text_offset": text_offsets(entries, first_offset),
    }


def text_offsets(entries: list[TokenLogprob], first: int = 0) -> list[int]:
    """Where each token starts in the decoded text: its bytes decoded in turn (special tokens,
    which decoding skips, add nothing; a token inside a character starts where it does)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offsets, at = [], first
    for e in entries:
        offsets.append(at)
        if not e.special:
            at += len(decoder.decode(e.bytes))
    return offsets


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, log-prob, UTF-8 bytes and alternatives."""
    return {"content": [{
        "token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for _, t, b, lp in e.top],
    } for e in entries], "refusal": None}
