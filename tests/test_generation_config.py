"""generation_config.json's sampling defaults, for the fields a request leaves out.

The rule (as vLLM's ``--generation-config auto``): temperature, top_p, top_k, min_p and
max_new_tokens (as max_tokens, capped at the context the prompt leaves) from the
checkpoint; a field the request gives, always from the request.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from cluster_util import distributed, read_results, single_process

from glinthawk.api import _sampling_fields
from glinthawk.compute.sampling import SamplingParams
from glinthawk.generation_config import GenerationConfig
from glinthawk.requests import parse_line
from glinthawk.tokenizer import Tokenizer, TokenizerError

DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "max_new_tokens": 7}
# The same sampling as request fields.
AS_FIELDS = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "max_tokens": 7}
PROMPTS = {"a": "The quick brown fox", "b": "Tier one holds the weights", "c": "1 2 3"}


@pytest.fixture
def with_defaults(tiny_checkpoint, tmp_path):
    """``with_defaults(fields) -> Path``: a copy of the Llama checkpoint whose
    generation_config.json also holds ``fields``."""
    def make(fields: dict):
        directory = tmp_path / f"model-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_checkpoint("llama_gqa"), directory)
        path = directory / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
        return directory
    return make


def write(path, lines: list[dict]):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_read_defaults_and_eos(with_defaults, tiny_checkpoint, caplog):
    directory = with_defaults({**DEFAULTS, "eos_token_id": [1, 3], "do_sample": False, "max_length": 20,
                               "repetition_penalty": 1.1})
    with caplog.at_level(logging.WARNING, logger="glinthawk.generation_config"):
        config = GenerationConfig.from_directory(directory)
    assert dict(config.sampling_defaults) == AS_FIELDS
    assert config.eos_token_ids == {1, 3} and Tokenizer(directory).eos_token_ids == {1, 3}
    assert "repetition_penalty 1.1 is not applied" in caplog.text
    # transformers' save_pretrained writes only token ids here: no defaults, as before.
    assert dict(GenerationConfig.from_directory(tiny_checkpoint("llama_gqa")).sampling_defaults) == {}
    assert dict(GenerationConfig.from_directory(with_defaults({"temperature": None})).sampling_defaults) == {}
    (directory / "generation_config.json").unlink()
    assert GenerationConfig.from_directory(directory) == GenerationConfig()


@pytest.mark.parametrize("fields,fragment", [
    ({"top_p": 0}, "'top_p' cannot be a default (top_p must be in (0, 1], got 0)"),
    ({"temperature": "hot"}, "'temperature' cannot be a default"),
    ({"max_new_tokens": 0}, "'max_new_tokens' cannot be a default"),
    ({"top_k": -5}, "'top_k' cannot be a default"),
])
def test_a_default_that_could_never_run_is_a_one_line_load_error(with_defaults, fields, fragment):
    directory = with_defaults(fields)
    with pytest.raises(TokenizerError) as caught:
        Tokenizer(directory)
    message = str(caught.value)
    assert fragment in message and "generation_config.json" in message and "\n" not in message


def test_the_fields_a_line_leaves_out():
    plain = parse_line(1, b'{"prompt": "x", "temperature": 0.5, "top_k": null, "seed": 3}')
    assert "temperature" not in plain.unset and "seed" not in plain.unset
    assert {"top_k", "top_p", "min_p", "max_tokens"} <= plain.unset
    body = {"prompt": "x", "max_completion_tokens": 5, "top_p": 0.5}
    openai = parse_line(2, json.dumps({"custom_id": "o", "url": "/v1/completions", "body": body}).encode())
    assert openai.params.max_tokens == 5 and not {"max_tokens", "top_p"} & openai.unset
    assert {"temperature", "top_k", "min_p"} <= openai.unset
    # max_completion_tokens given with a null max_tokens (as SDKs send unset fields) is given.
    body = {"prompt": "x", "max_tokens": None, "max_completion_tokens": 5}
    openai = parse_line(3, json.dumps({"custom_id": "o", "url": "/v1/completions", "body": body}).encode())
    assert openai.params.max_tokens == 5 and "max_tokens" not in openai.unset


def test_engine_takes_the_checkpoint_defaults_for_fields_left_out(with_defaults, tiny_model, tmp_path):
    model, plain_tok = tiny_model("llama_gqa")
    defaults_tok = Tokenizer(with_defaults(DEFAULTS), extra_eos_ids=model.config.eos_token_ids)
    left_out = write(tmp_path / "left_out.jsonl", [
        {"custom_id": k, "prompt": p, "seed": 11, "ignore_eos": True} for k, p in PROMPTS.items()])
    given = write(tmp_path / "given.jsonl", [
        {"custom_id": k, "prompt": p, "seed": 11, "ignore_eos": True, **AS_FIELDS} for k, p in PROMPTS.items()])
    got = single_process((model, defaults_tok), left_out)
    expected = single_process((model, plain_tok), given)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}
    assert all(line["completion_tokens"] == 7 for line in got.values())
    # The same lines on a checkpoint without defaults sample otherwise (temperature 1, 16 tokens).
    assert single_process((model, plain_tok), left_out)["a"]["completion_tokens"] == 16

    # Fields the request gives win over the checkpoint's: greedy, 4 tokens.
    greedy = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
    requests = write(tmp_path / "greedy.jsonl", [{"custom_id": k, "prompt": p, **greedy} for k, p in PROMPTS.items()])
    got, expected = single_process((model, defaults_tok), requests), single_process((model, plain_tok), requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}


def test_a_default_max_tokens_is_capped_at_the_context(with_defaults, tiny_model, tmp_path):
    model, _ = tiny_model("llama_gqa")
    tok = Tokenizer(with_defaults({"max_new_tokens": 100_000}), extra_eos_ids=model.config.eos_token_ids)
    context = model.config.max_position_embeddings
    requests = write(tmp_path / "in.jsonl", [
        {"custom_id": "default", "prompt": PROMPTS["b"], "temperature": 0, "ignore_eos": True},
        {"custom_id": "given", "prompt": PROMPTS["b"], "temperature": 0, "max_tokens": 100_000}])
    lines = single_process((model, tok), requests)
    assert lines["default"]["prompt_tokens"] + lines["default"]["completion_tokens"] == context
    assert lines["default"]["finish_reason"] == "length"
    assert "exceeds the model's context" in lines["given"]["error"]["message"]


async def test_two_tier_takes_the_checkpoint_defaults(with_defaults, tiny_model, tmp_path):
    """Tier 1 admits with its checkpoint's tokenizer: the same defaults as the single process."""
    model, plain_tok = tiny_model("llama_gqa")
    defaults_tok = Tokenizer(with_defaults(DEFAULTS), extra_eos_ids=model.config.eos_token_ids)
    left_out = write(tmp_path / "left_out.jsonl", [
        {"custom_id": k, "prompt": p, "seed": 5, "ignore_eos": True} for k, p in PROMPTS.items()])
    given = write(tmp_path / "given.jsonl", [
        {"custom_id": k, "prompt": p, "seed": 5, "ignore_eos": True, **AS_FIELDS} for k, p in PROMPTS.items()])
    _, out = await distributed((model, defaults_tok), left_out, tmp_path / "out.jsonl", nodes=2, micro_batches=2)
    got = read_results(out)
    expected = single_process((model, plain_tok), given)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}
    assert all(line["completion_tokens"] == 7 for line in got.values())


def test_api_sends_given_sampling_params_whole():
    """``LLM.generate(prompts, SamplingParams(...))`` takes the params as given, as vLLM does:
    the fields a checkpoint may default go on every line; without params, none do."""
    fields = _sampling_fields(SamplingParams())
    assert {k: fields[k] for k in AS_FIELDS} == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                                 "max_tokens": 16}
    assert "stop" not in fields and _sampling_fields(SamplingParams(stop=("x",)))["stop"] == ["x"]
