"""n choices per request: parsed and checked, generated as n seeded sequences that share the
prompt's KV, answered as one line (plain: a list of choices; OpenAI: n choices, validated by
the openai SDK's own types)."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from engine_util import ok, request, run_engine
from glinthawk.requests import MAX_N, OPENAI, RequestError, parse_line
from glinthawk.samples import choice_seed
from test_prefix import assert_same, two_tier

PROMPT = list(range(5, 45))  # 40 tokens: the choices share the first 39


def parse(obj: dict):
    return parse_line(1, json.dumps(obj).encode())


@pytest.mark.parametrize("n", [0, MAX_N + 1, "2", True, 1.5])
def test_a_bad_n_is_the_lines_error(n):
    for line in ({"custom_id": "a", "prompt": "x", "n": n},
                 {"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "n": n}}):
        with pytest.raises(RequestError, match=f"'n' must be an integer from 1 to {MAX_N}"):
            parse(line)


def test_n_is_read_in_both_forms():
    assert parse({"custom_id": "a", "prompt": "x", "n": 3}).n == 3
    assert parse({"custom_id": "a", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": "hi"}], "n": 2}}).n == 2
    assert parse({"custom_id": "a", "prompt": "x"}).n == 1


def test_engine_choices_are_seeded_apart_and_the_prompt_is_prefilled_once(checkpoint):
    model, tokenizer = checkpoint
    params = {"max_tokens": 6, "temperature": 0.9, "seed": 11, "ignore_eos": True}
    together, engine = run_engine(model, tokenizer, [request("many", PROMPT, n=4, **params)])
    line = ok(together["many"])
    assert [choice["index"] for choice in line["choices"]] == [0, 1, 2, 3]
    assert line["completion_tokens"] == 24 and line["prompt_tokens"] == len(PROMPT)
    # Each choice is what a lone request seeded as that choice gives: batching changes nothing.
    alone, _ = run_engine(model, tokenizer, [request(f"c{i}", PROMPT, **{**params, "seed": choice_seed(11, i)})
                                             for i in range(4)])
    assert [choice["token_ids"] for choice in line["choices"]] == [alone[f"c{i}"]["token_ids"] for i in range(4)]
    assert len({tuple(choice["token_ids"]) for choice in line["choices"]}) > 1  # seeded apart
    assert engine.stats.prompt_tokens == len(PROMPT) - 1 + 4  # the shared 39 once, each choice its last token


def openai_line(n: int, chat: bool) -> dict:
    body = {"max_tokens": 5, "temperature": 0.8, "seed": 2, "n": n, "logprobs": 2 if chat else 2}
    if chat:
        body.update(messages=[{"role": "user", "content": "The quick brown fox " * 6}], logprobs=True, top_logprobs=2)
        return {"custom_id": "chat", "url": "/v1/chat/completions", "body": body}
    return {"custom_id": "text", "url": "/v1/completions", "body": {**body, "prompt": "The quick brown fox " * 6}}


@pytest.mark.parametrize("chat", [False, True])
def test_openai_lines_carry_n_choices_the_sdk_accepts(checkpoint, chat):
    model, tokenizer = checkpoint
    line = openai_line(3, chat)
    out, _ = run_engine(model, tokenizer, [parse(line)])
    body = out[line["custom_id"]]["response"]["body"]
    parsed = (ChatCompletion if chat else Completion).model_validate(body)
    assert [choice.index for choice in parsed.choices] == [0, 1, 2]
    assert all(choice.logprobs is not None for choice in parsed.choices)
    assert parsed.usage.completion_tokens == sum(
        len(choice.logprobs.content if chat else choice.logprobs.tokens) for choice in parsed.choices)
    assert parse(line).form == OPENAI


async def test_two_tiers_answer_n_as_the_engine_does(checkpoint, tmp_path):
    model, tokenizer = checkpoint
    lines = [{"custom_id": f"r{i}", "prompt": PROMPT + [50 + i], "n": 3, "max_tokens": 5, "temperature": 0.7,
              "seed": i, "ignore_eos": True} for i in range(4)]
    engine, _ = run_engine(model, tokenizer, [parse(line) for line in lines])
    two, tier1, _ = await two_tier(checkpoint, tmp_path, lines)
    assert_same(two, engine)
    assert tier1.stats.finished == 4
