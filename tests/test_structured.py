"""Structured output: response_format (json_schema, json_object) in the plain and both OpenAI
forms, guided_regex / guided_choice / structured_outputs; every output parses and validates,
on every path (one process, two tiers, pipeline stages, a Tier 2 node lost mid-run). A bad
field or a grammar that does not compile is its line's error."""

from __future__ import annotations

import io
import json
import re

import jsonschema
import pytest
import torch

from glinthawk import grammar
from glinthawk.compute.sampling import SamplingParams, sample
from glinthawk.requests import parse_stream
from glinthawk.results import is_error

from cluster_util import distributed, engine_lines, losing_a_node, read_results
from pipeline_util import pipeline

# Bounded, so a random-weight model cannot run past max_tokens inside the document.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
REGEX = r"(yes|no|maybe), [0-9]{2,3} [a-z]{1,4}"
PROMPTS = ["The quick brown fox", "Offline batch inference", "1 2 3", "A"]
SAMPLINGS = [{"temperature": 0}, {"temperature": 0.9, "seed": 5}, {"temperature": 1.0, "top_k": 20, "seed": 11}]


def run_lines(checkpoint, lines: list[dict], max_batch_tokens: int = 64) -> dict[str, dict]:
    return engine_lines(checkpoint, lines, max_batch_tokens, kv_tokens=8192)


def schema_lines(count: int = 12) -> list[dict]:
    """Schema-constrained lines over the prompts and samplings, in the plain and both OpenAI forms."""
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    lines = []
    for i in range(count):
        fields = {"max_tokens": 120, **SAMPLINGS[i % len(SAMPLINGS)], "response_format": rf}
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 3 == 0:
            lines.append({"custom_id": f"s{i}", "prompt": prompt, **fields})
        elif i % 3 == 1:
            lines.append({"custom_id": f"s{i}", "url": "/v1/completions", "method": "POST",
                          "body": {"prompt": prompt, **fields}})
        else:
            lines.append({"custom_id": f"s{i}", "url": "/v1/chat/completions", "method": "POST",
                          "body": {"messages": [{"role": "user", "content": prompt}], **fields}})
    return lines


def text_of(line: dict) -> str:
    assert not is_error(line), line
    if "text" in line:
        return line["text"]
    choice = line["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def finish_of(line: dict) -> str:
    return line["finish_reason"] if "finish_reason" in line else line["response"]["body"]["choices"][0]["finish_reason"]


def tokens_of(line: dict) -> str:
    return line.get("token_ids") or text_of(line)


def assert_valid(results: dict[str, dict], lines: list[dict], schema: dict = SCHEMA) -> None:
    assert set(results) == {line["custom_id"] for line in lines}
    for key, line in results.items():
        jsonschema.validate(json.loads(text_of(line)), schema)
        assert finish_of(line) == "stop", (key, line)


# -- one process --------------------------------------------------------------------------
def test_json_schema_lines_parse_and_validate_in_every_form(checkpoint):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    lines = schema_lines()
    results = run_lines(checkpoint, lines)
    assert_valid(results, lines)
    for key, line in results.items():  # the OpenAI lines are the SDK's own response types
        if "response" in line:
            kind = ChatCompletion if line["response"]["body"]["object"] == "chat.completion" else Completion
            kind.model_validate(line["response"]["body"])


@pytest.fixture(scope="module")
def bundled():
    """The bundled model (trained, so it closes a free-form JSON object), in float32."""
    from pathlib import Path

    from glinthawk.compute.loader import load_model
    from glinthawk.tokenizer import Tokenizer

    directory = Path(__file__).resolve().parent.parent / "glinthawk" / "models" / "default"
    model = load_model(directory, dtype="float32", device="cpu")
    return model, Tokenizer(directory, extra_eos_ids=model.config.eos_token_ids)


def test_json_object_in_every_form(bundled):
    """json_object: any JSON object. A random-weight model writes a free string forever, so
    this runs the bundled model, with seeds that end their document within max_tokens."""
    sampled = {"max_tokens": 60, "temperature": 0.8}
    lines = [
        {"custom_id": "plain", "prompt": "JSON:", **sampled, "seed": 1, "response_format": {"type": "json_object"}},
        {"custom_id": "completions", "url": "/v1/completions", "body": {
            "prompt": "A", **sampled, "seed": 6, "response_format": {"type": "json_object"}}},
        {"custom_id": "chat", "url": "/v1/chat/completions", "body": {
            "messages": [{"role": "user", "content": "Give JSON"}], **sampled, "seed": 0,
            "response_format": {"type": "json_object"}}},
        {"custom_id": "structured_outputs", "url": "/v1/chat/completions", "body": {
            "messages": [{"role": "user", "content": "Give JSON"}], **sampled, "seed": 2,
            "structured_outputs": {"json_object": True}}},
        {"custom_id": "guided_json", "prompt": "A", "max_tokens": 60, "temperature": 0,
         "guided_json": json.dumps({"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"],
                                    "additionalProperties": False})},
    ]
    results = run_lines(bundled, lines)
    for key, line in results.items():
        value = json.loads(text_of(line))
        assert isinstance(value, dict) and finish_of(line) == "stop", (key, line)
    assert json.loads(text_of(results["guided_json"]))["n"] in (1, 2)


def test_regex_and_choice(checkpoint):
    lines = [{"custom_id": f"r{i}", "prompt": PROMPTS[i % 4], "max_tokens": 40, **SAMPLINGS[i % 3],
              "guided_regex": REGEX} for i in range(6)]
    lines += [{"custom_id": "so", "prompt": "A", "max_tokens": 40, "structured_outputs": {"regex": "[A-Z]{3}!"}},
              {"custom_id": "choice", "prompt": "A", "max_tokens": 40, "seed": 2,
               "guided_choice": ["int (x)", "str.join", "a|b"]}]
    results = run_lines(checkpoint, lines)
    for i in range(6):
        assert re.fullmatch(REGEX, text_of(results[f"r{i}"])), results[f"r{i}"]
    assert re.fullmatch("[A-Z]{3}!", text_of(results["so"]))
    assert text_of(results["choice"]) in ("int (x)", "str.join", "a|b")
    assert all(finish_of(line) == "stop" for line in results.values())


def test_unconstrained_lines_beside_constrained_ones_are_unchanged(checkpoint):
    plain = [{"custom_id": f"p{i}", "prompt": PROMPTS[i % 4], "max_tokens": 12, "ignore_eos": True,
              **SAMPLINGS[i % 3]} for i in range(6)]
    alone = run_lines(checkpoint, plain)
    mixed = run_lines(checkpoint, plain + schema_lines(6))
    assert all(mixed[k]["token_ids"] == alone[k]["token_ids"] for k in alone)


@pytest.mark.parametrize("fields, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "cannot compile the JSON schema"),
    ({"guided_json": {"properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]}}, "cannot compile"),
    ({"guided_regex": "(["}, "cannot compile the regex"),
    ({"response_format": "json"}, "'response_format' must be an object"),
    ({"response_format": ["json_object"]}, "'response_format' must be an object"),
    ({"response_format": {"type": "xml"}}, "'response_format.type' must be text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema"}}, "'response_format.json_schema' must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "must be a JSON schema object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": True}}}, "must be a JSON schema object"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "unknown field(s) schema"),
    ({"guided_regex": 5}, "'guided_regex' must be a non-empty string"),
    ({"guided_choice": []}, "'guided_choice' must be a non-empty list"),
    ({"guided_json": "{nope"}, "'guided_json' is a string but not JSON"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "exactly one of"),
    ({"structured_outputs": "a"}, "'structured_outputs' must be an object"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "give at most one of"),
])
def test_bad_structured_fields_are_the_lines_error(checkpoint, fields, message):
    lines = [{"custom_id": "bad", "prompt": "A", "max_tokens": 8, **fields},
             {"custom_id": "bad-openai", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "A"}], "max_tokens": 8, **fields}},
             {"custom_id": "good", "prompt": "A", "max_tokens": 4, "guided_regex": "[0-9]{4}"}]
    results = run_lines(checkpoint, lines)
    assert message in results["bad"]["error"]["message"] and results["bad"]["line"] == 1
    error = results["bad-openai"]["response"]
    assert error["status_code"] == 400 and message in error["body"]["error"]["message"]
    assert "\n" not in results["bad"]["error"]["message"]
    assert re.fullmatch("[0-9]{4}", text_of(results["good"]))


def test_text_response_format_is_unconstrained(checkpoint):
    line = {"prompt": "A", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    results = run_lines(checkpoint, [{"custom_id": "a", **line}, {"custom_id": "b", **line,
                                                                   "response_format": {"type": "text"}}])
    assert results["a"]["token_ids"] == results["b"]["token_ids"]


def test_without_llguidance_only_the_structured_line_fails(checkpoint, monkeypatch):
    import sys

    model, tokenizer = checkpoint
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance raises ImportError
    monkeypatch.setattr(grammar, "_compilers", type(grammar._compilers)())
    results = run_lines(checkpoint, [{"custom_id": "s", "prompt": "A", "max_tokens": 4, "guided_regex": "a+"},
                                     {"custom_id": "p", "prompt": "A", "max_tokens": 4}])
    assert "pip install 'glinthawk[structured]'" in results["s"]["error"]["message"]
    assert not is_error(results["p"])


def test_python_api_sampling_params_send_structured_outputs():
    """LLM.generate sends SamplingParams(structured_outputs=...) as the line's field, as vLLM takes it."""
    from glinthawk.api import _sampling_fields
    from glinthawk.requests import parse_line
    from glinthawk.structured import Constraint

    params = SamplingParams(structured_outputs={"json": SCHEMA})
    request = parse_line(1, json.dumps({"custom_id": "0", "prompt": "x", **_sampling_fields(params)}).encode())
    assert request.structured == Constraint("json", json.dumps(SCHEMA))
    assert "structured_outputs" not in _sampling_fields(SamplingParams())
    with pytest.raises(ValueError, match="structured_outputs must be a dict"):
        SamplingParams(structured_outputs="[0-9]+")


def test_the_service_takes_response_format_from_the_openai_sdk(tmp_path):
    """glinthawk serve passes response_format through: the SDK's own request and response types."""
    from serve_util import ServeProcess

    service = ServeProcess(tmp_path / "data")
    try:
        client = service.client()
        rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Who?"}],
                                              max_tokens=120, temperature=0, response_format=rf)
        jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
        assert chat.choices[0].finish_reason == "stop"
        done = client.completions.create(model="default", prompt="Answer:", max_tokens=20, temperature=0,
                                         extra_body={"guided_regex": REGEX})
        assert re.fullmatch(REGEX, done.choices[0].text)
    finally:
        service.stop()


# -- the sampler --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_rows_draw_only_allowed_tokens_on_every_sampler_path(dtype):
    """Greedy (argmax), the C sampler and the torch one all keep to the mask."""
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(6, vocab).to(dtype)
    allowed = torch.zeros(6, vocab, dtype=torch.bool)
    for row in range(6):
        allowed[row, torch.randperm(vocab)[:3 + row]] = True
    bits = torch.nn.functional.pad(allowed, (0, grammar.words(vocab) * 32 - vocab)).view(6, -1, 32).int()
    masks = (bits << torch.arange(32, dtype=torch.int32)).sum(-1, dtype=torch.int64).to(torch.int64)
    masks = torch.where(masks >= 2**31, masks - 2**32, masks).to(torch.int32)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in
              [(0, 0, 1), (1, 0, 1), (0.7, 50, 1), (1.3, 0, 0.9), (1, 2, 1), (0, 0, 1)]]
    for step in range(20):
        masked = logits.clone()
        grammar.apply_masks(masked, torch.arange(6), masks)
        tokens = sample(masked, params, seeds=list(range(6)), steps=[step] * 6)
        assert all(allowed[row, token] for row, token in enumerate(tokens.tolist())), step
        if dtype == torch.float32:  # the torch path (no C sampler) agrees
            import glinthawk.compute.sampling as sampling
            saved, sampling._sampling = sampling._sampling, None
            try:
                again = sample(masked, params, seeds=list(range(6)), steps=[step] * 6)
            finally:
                sampling._sampling = saved
            assert all(allowed[row, token] for row, token in enumerate(again.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_mask_loop_equals_torchs(dtype, monkeypatch):
    """Whole words of 0 or 1, mixed words, a vocabulary past the mask's last word, a subset of rows."""
    from glinthawk.compute import elementwise

    torch.manual_seed(1)
    vocab, rows = 1000, 5
    masks = torch.randint(-2**31, 2**31 - 1, (3, grammar.words(vocab) - 1), dtype=torch.int32)
    masks[0, :4], masks[1, 2:9] = 0, -1
    logits = torch.randn(rows, vocab).to(dtype)
    chosen = torch.tensor([0, 2, 4])
    in_c = logits.clone()
    grammar.apply_masks(in_c, chosen, masks)
    monkeypatch.setattr(elementwise, "mask_logits", lambda *args: False)
    in_torch = logits.clone()
    grammar.apply_masks(in_torch, chosen, masks)
    assert torch.equal(in_c, in_torch)
    assert torch.equal(in_c[1], logits[1]) and bool(torch.isinf(in_c[chosen, 31 * 32:]).all())


def test_the_hidden_frame_carries_the_masks_and_refuses_malformed_ones(checkpoint):
    """handoff_header names the masked rows; parse_handoff takes them back with the frame's
    tensor, and a frame whose masks do not fit its rows is a protocol error, not a crash."""
    from glinthawk.net.codec import ProtocolError
    from glinthawk.node.chain import handoff_header, parse_handoff
    from glinthawk.sequence import new_sequence, pack_step

    model, tokenizer = checkpoint
    lines = [parse_stream(io.BytesIO(json.dumps({"prompt": "A", "max_tokens": 4, **extra}).encode()))
             for extra in ({}, {"guided_regex": "[0-9]+"})]
    seqs = [new_sequence(next(line), tokenizer, 512, model.config.vocab_size) for line in lines]
    batch = pack_step([(seq, len(seq.prompt_ids)) for seq in seqs])
    header = handoff_header(0, batch, [()] * 2, {})
    header["route"] = [[0, 0]]
    parsed, *_ = parse_handoff(header, batch.masks)
    assert parsed.mask_rows.tolist() == [1] and torch.equal(parsed.masks, batch.masks)
    for masks in (None, batch.masks.long(), torch.cat([batch.masks, batch.masks]), batch.masks[0]):
        with pytest.raises(ProtocolError, match="masks"):
            parse_handoff(header, masks)
    header["sample"]["masked"] = [2]
    with pytest.raises(ProtocolError, match="not a sampled row"):
        parse_handoff(header, batch.masks)


# -- two tiers, pipeline stages, a lost node ---------------------------------------------
def write(path, lines: list[dict]):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


async def test_two_tiers_and_pipeline_stages_give_the_single_process_tokens(checkpoint, model_dir, tmp_path):
    from glinthawk.client import submit

    lines = schema_lines(9) + [{"custom_id": f"r{i}", "prompt": PROMPTS[i], "max_tokens": 30, "temperature": 0,
                                "guided_regex": REGEX} for i in range(3)]
    requests = write(tmp_path / "in.jsonl", lines)
    want = run_lines(checkpoint, lines, max_batch_tokens=16)
    assert_valid({k: v for k, v in want.items() if k.startswith("s")}, lines[:9])
    summary, out = await distributed(checkpoint, requests, tmp_path / "two.jsonl", nodes=2, micro_batches=3,
                                     max_batch_tokens=16)
    assert summary.failed == 0
    two = read_results(out)
    async with pipeline(model_dir, [1], micro_batches=3, max_batch_tokens=16) as p:
        summary = await submit(requests, "127.0.0.1", p.port, tmp_path / "pipe.jsonl", progress=False)
    assert summary.failed == 0
    piped = read_results(tmp_path / "pipe.jsonl")
    for results in (two, piped):
        assert_valid({k: v for k, v in results.items() if k.startswith("s")}, lines[:9])
        assert {k: tokens_of(v) for k, v in results.items()} == {k: tokens_of(v) for k, v in want.items()}


async def test_a_tier2_node_lost_mid_run_still_gives_valid_outputs(checkpoint, tmp_path, caplog):
    """Rebuilt sequences keep their matcher (advanced only on committed tokens): the outputs
    still validate, and equal one process's."""
    lines = schema_lines(12)
    requests = write(tmp_path / "in.jsonl", lines)
    summary = await losing_a_node(checkpoint, requests, tmp_path / "out.jsonl", after_steps=12, kv_tokens=8192)
    assert summary.failed == 0
    assert "go back to the queue" in caplog.text  # sequences were rebuilt
    results = read_results(tmp_path / "out.jsonl")
    assert_valid(results, lines)
    want = run_lines(checkpoint, lines, max_batch_tokens=8)
    assert {k: tokens_of(v) for k, v in results.items()} == {k: tokens_of(v) for k, v in want.items()}
