"""Log-probabilities: of generated tokens and of prompts (scoring), against transformers' own
log_softmax, in the plain and OpenAI shapes, and the same on every path (one process, two
tiers, pipeline stages). Bad fields are their line's error."""

from __future__ import annotations

import json

import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion

from glinthawk.compute.logprobs import Sampled
from glinthawk.compute.sampling import SamplingParams
from glinthawk.compute.stages import head_and_sample
from glinthawk.requests import RequestError, parse_line
from glinthawk.results import error_line
from glinthawk.sequence import new_sequence, pack_step

from cluster_util import distributed, engine_lines, losing_a_node, read_results
from engine_util import PROMPTS
from pipeline_util import pipeline

TOL = 1e-4  # float32, against transformers
SAME = 1e-5  # between glinthawk's own paths


def run_lines(checkpoint, lines: list[dict], max_batch_tokens: int = 64) -> dict[str, dict]:
    return engine_lines(checkpoint, lines, max_batch_tokens)


@torch.inference_mode()
def reference_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the vocabulary at every position of ``ids``, float32."""
    logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def hf(hf_model):
    return hf_model("llama_gqa")


# -- generated tokens ------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.7, "top_k": 5, "seed": 3}],
                         ids=["greedy", "seeded"])
def test_generated_logprobs_match_transformers(checkpoint, hf, sampling):
    """Raw log-probs (before temperature and top-k), the token's rank, and its alternatives in order."""
    model, tokenizer = checkpoint
    lines = [{"custom_id": f"p{i}", "prompt": p, "max_tokens": 6, "ignore_eos": True, "logprobs": 4, **sampling}
             for i, p in enumerate(PROMPTS)]
    results = run_lines(checkpoint, lines)
    for i, prompt in enumerate(PROMPTS):
        line = results[f"p{i}"]
        prompt_ids = tokenizer.encode(prompt)
        ids = prompt_ids + line["token_ids"]
        want = reference_logprobs(hf, ids)
        assert len(line["logprobs"]) == len(line["token_ids"]) == 6
        for step, (token, entry) in enumerate(zip(line["token_ids"], line["logprobs"])):
            row = want[len(prompt_ids) - 1 + step]
            assert entry["token_id"] == token and entry["token"] == tokenizer.piece(token)[0]
            assert abs(entry["logprob"] - row[token].item()) < TOL
            assert entry["rank"] == int((row > row[token]).sum()) + 1
            top = torch.topk(row, 4)
            assert [t["token_id"] for t in entry["top_logprobs"]] == top.indices.tolist()
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=TOL)
            if sampling["temperature"] == 0:  # greedy takes the most likely token
                assert entry["rank"] == 1 and entry["top_logprobs"][0]["token_id"] == token


def test_requests_that_do_not_ask_get_nothing_and_cost_nothing(checkpoint):
    """No log-prob field in the line, no log-softmax in the step, no prompt row scored."""
    model, tokenizer = checkpoint
    line = run_lines(checkpoint, [{"custom_id": "a", "prompt": "The quick", "max_tokens": 3}])["a"]
    assert "logprobs" not in line and "prompt_logprobs" not in line
    openai_line = run_lines(checkpoint, [{"custom_id": "b", "url": "/v1/completions",
                                          "body": {"prompt": "The quick", "max_tokens": 3}}])["b"]
    assert openai_line["response"]["body"]["choices"][0]["logprobs"] is None
    x = torch.randn(3, model.config.hidden_size)
    out = head_and_sample(model, x, [SamplingParams(temperature=0)] * 3, [1, 2, 3], [0, 0, 0])
    assert isinstance(out, Sampled) and out.logprobs is None and out.prompt is None
    seq = new_sequence(parse_line(1, b'{"prompt": "The quick brown fox"}'), tokenizer, 256, model.config.vocab_size)
    assert pack_step([(seq, seq.pending)]).score_rows is None


def test_token_text_and_bytes(checkpoint):
    """A token's text as OpenAI shows it: its UTF-8 text, ``bytes:\\x..`` for part of a
    character, a special token's name."""
    _, tokenizer = checkpoint
    assert tokenizer.piece(0) == ("<s>", b"<s>") and tokenizer.is_special(0)
    lead = tokenizer._tok.token_to_id("\u00e2")  # byte-level BPE writes byte 0xE2 as "â"
    assert tokenizer.piece(lead) == ("bytes:\\xe2", b"\xe2") and not tokenizer.is_special(lead)
    space_the = tokenizer.encode(" the", add_special_tokens=False)
    assert "".join(tokenizer.piece(t)[0] for t in space_the) == " the"


# -- prompts -------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_tokens", [64, 7], ids=["whole", "chunked"])
def test_prompt_scoring_equals_transformers_log_likelihood(checkpoint, hf, max_batch_tokens):
    """max_tokens 0 with prompt_logprobs: nothing generated, each prompt token's log-likelihood
    (the first: None, as vLLM), also when the prefill is cut into chunks."""
    model, tokenizer = checkpoint
    lines = [{"custom_id": f"p{i}", "prompt": p, "max_tokens": 0, "prompt_logprobs": 2} for i, p in enumerate(PROMPTS)]
    results = run_lines(checkpoint, lines, max_batch_tokens=max_batch_tokens)
    for i, prompt in enumerate(PROMPTS):
        line = results[f"p{i}"]
        ids = tokenizer.encode(prompt)
        want = reference_logprobs(hf, ids)
        assert line["token_ids"] == [] and line["completion_tokens"] == 0 and line["text"] == ""
        assert line["finish_reason"] == "length"
        scores = line["prompt_logprobs"]
        assert len(scores) == len(ids) and scores[0] is None
        expected = [want[p - 1, ids[p]].item() for p in range(1, len(ids))]
        assert [s["logprob"] for s in scores[1:]] == pytest.approx(expected, abs=TOL)
        assert [s["token_id"] for s in scores[1:]] == ids[1:]
        assert sum(s["logprob"] for s in scores[1:]) == pytest.approx(sum(expected), abs=TOL * len(ids))
        for p, entry in enumerate(scores[1:], start=1):
            assert [t["token_id"] for t in entry["top_logprobs"]] == torch.topk(want[p - 1], 2).indices.tolist()


def test_prompt_logprobs_with_generation(checkpoint, hf):
    model, tokenizer = checkpoint
    line = run_lines(checkpoint, [{"custom_id": "g", "prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0,
                                   "ignore_eos": True, "prompt_logprobs": 0, "logprobs": True}])["g"]
    ids = tokenizer.encode(PROMPTS[2])
    want = reference_logprobs(hf, ids + line["token_ids"])
    got = [None] + [s["logprob"] for s in line["prompt_logprobs"][1:]]
    assert got[1:] == pytest.approx([want[p - 1, ids[p]].item() for p in range(1, len(ids))], abs=TOL)
    assert all(s["top_logprobs"] == [] for s in line["prompt_logprobs"][1:])
    assert [e["logprob"] for e in line["logprobs"]] == pytest.approx(
        [want[len(ids) - 1 + i, t].item() for i, t in enumerate(line["token_ids"])], abs=TOL)


# -- the OpenAI shapes ------------------------------------------------------------------------
def test_completions_logprobs_validate_with_the_openai_types(checkpoint, hf):
    model, tokenizer = checkpoint
    body = {"prompt": "The quick brown", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    line = run_lines(checkpoint, [{"custom_id": "c", "url": "/v1/completions", "body": body}])["c"]
    completion = Completion.model_validate(line["response"]["body"])
    choice = completion.choices[0]
    n = completion.usage.completion_tokens
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-6)  # greedy: its token is the best
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert "".join(logprobs.tokens) == choice.text  # a byte-level tokenizer, plain ASCII here


def test_echo_with_max_tokens_0_scores_the_prompt(checkpoint, hf):
    """What evaluation harnesses send for log-likelihood: the prompt comes back with each
    token's log-prob, the first None; text offsets index the returned text."""
    model, tokenizer = checkpoint
    prompt = "The quick brown fox jumps"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    line = run_lines(checkpoint, [{"custom_id": "e", "url": "/v1/completions", "body": body}])["e"]
    completion = Completion.model_validate(without_first_null(line["response"]["body"]))
    raw = line["response"]["body"]["choices"][0]["logprobs"]
    assert raw["token_logprobs"][0] is None and raw["top_logprobs"][0] is None
    choice, ids = completion.choices[0], tokenizer.encode(prompt)
    want = reference_logprobs(hf, ids)
    assert choice.text == prompt and completion.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.piece(t)[0] for t in ids[1:]]
    assert lp.token_logprobs == pytest.approx([want[p - 1, ids[p]].item() for p in range(1, len(ids))], abs=TOL)
    for token, offset in zip(lp.tokens, lp.text_offset):  # after BOS, each token's text starts at its offset
        assert prompt[offset:].startswith(token)
    echo_only = run_lines(checkpoint, [{"custom_id": "t", "url": "/v1/completions",
                                        "body": {"prompt": prompt, "max_tokens": 0, "echo": True}}])["t"]
    assert echo_only["response"]["body"]["choices"][0] == {"index": 0, "text": prompt, "logprobs": None,
                                                           "finish_reason": "length"}


def without_first_null(body: dict) -> dict:
    """The body without each choice's first echoed token: OpenAI's and vLLM's servers give it a
    null log-prob (nothing predicts it), which the SDK's types, declaring floats, refuse."""
    body = json.loads(json.dumps(body))
    for choice in body["choices"]:
        if choice["logprobs"] is not None:
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                del choice["logprobs"][key][0]
    return body


def test_echo_with_generation_puts_the_prompt_first(checkpoint):
    body = {"prompt": "The quick", "max_tokens": 3, "echo": True, "logprobs": 0, "temperature": 0,
            "ignore_eos": True}
    line = run_lines(checkpoint, [{"custom_id": "e", "url": "/v1/completions", "body": body}])["e"]
    choice = Completion.model_validate(without_first_null(line["response"]["body"])).choices[0]
    prompt_tokens = line["response"]["body"]["usage"]["prompt_tokens"]
    assert choice.text.startswith("The quick") and len(choice.logprobs.tokens) == prompt_tokens - 1 + 3
    assert choice.logprobs.text_offset[prompt_tokens - 1] == len("The quick")


def test_chat_logprobs_validate_with_the_openai_types(checkpoint, hf):
    model, tokenizer = checkpoint
    messages = [{"role": "user", "content": "Tier one holds"}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "ignore_eos": True}
    line = run_lines(checkpoint, [{"custom_id": "c", "url": "/v1/chat/completions", "body": body}])["c"]
    chat = ChatCompletion.model_validate(line["response"]["body"])
    content = chat.choices[0].logprobs.content
    ids = tokenizer.encode_chat(messages)
    plain = run_lines(checkpoint, [{"custom_id": "p", "messages": messages, "max_tokens": 4, "temperature": 0,
                                    "ignore_eos": True}])["p"]  # the same greedy tokens, with their ids
    assert len(content) == chat.usage.completion_tokens == 4
    assert [e.token for e in content] == [tokenizer.piece(t)[0] for t in plain["token_ids"]]
    want = reference_logprobs(hf, ids + plain["token_ids"])
    for i, entry in enumerate(content):
        assert bytes(entry.bytes).decode() == entry.token and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(want[len(ids) - 1 + i].max().item(), abs=TOL)
    vllm = run_lines(checkpoint, [{"custom_id": "v", "url": "/v1/chat/completions",
                                   "body": {"messages": messages, "max_tokens": 1, "prompt_logprobs": 1}}])["v"]
    scored = vllm["response"]["body"]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    assert scored[1][str(ids[1])]["logprob"] == pytest.approx(want[0, ids[1]].item(), abs=TOL)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("line,message", [
    ({"prompt": "x", "logprobs": 21}, "'logprobs' must be an integer in [0, 20]"),
    ({"prompt": "x", "logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be an integer in [0, 20]"),
    ({"prompt": "x", "logprobs": True, "top_logprobs": -1}, "'top_logprobs' must be an integer in [0, 20]"),
    ({"prompt": "x", "top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
    ({"prompt": "x", "logprobs": 2, "top_logprobs": 2}, "give the number of alternatives once"),
    ({"prompt": "x", "prompt_logprobs": "all"}, "'prompt_logprobs' must be an integer in [0, 20]"),
    ({"prompt": "x", "max_tokens": 0}, "0 only scores a prompt"),
    ({"url": "/v1/completions", "body": {"prompt": "x", "logprobs": 30}}, "'logprobs' must be an integer in [0, 20]"),
    ({"url": "/v1/completions", "body": {"prompt": "x", "top_logprobs": 2}}, "not 'top_logprobs'"),
    ({"url": "/v1/completions", "body": {"prompt": "x", "echo": "yes"}}, "'echo' must be true or false"),
    ({"url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 0}}, "0 only scores a prompt"),
    ({"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}},
     "'logprobs' must be true or false in chat requests"),
    ({"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                              "top_logprobs": 25}}, "'top_logprobs' must be an integer in [0, 20]"),
    ({"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}},
     "'top_logprobs' needs 'logprobs': true"),
    ({"url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "echo": True}},
     "'echo' is a /v1/completions field"),
])
def test_bad_logprob_fields_are_the_lines_error(checkpoint, line, message):
    raw = json.dumps({"custom_id": "bad", **line}).encode()
    with pytest.raises(RequestError) as caught:
        parse_line(4, raw)
    assert message in caught.value.message and caught.value.message.startswith("line 4: ")
    assert "\n" not in caught.value.message and caught.value.custom_id == "bad"
    out = error_line(caught.value)
    assert out["custom_id"] == "bad" and out["line"] == 4
    results = run_lines(checkpoint, [{"custom_id": "bad", **line}, {"custom_id": "ok", "prompt": "x", "max_tokens": 1}])
    assert results["ok"]["completion_tokens"] == 1
    assert message in json.dumps(results["bad"])


# -- the same on every path ----------------------------------------------------------------------
MIXED = [
    {"custom_id": "greedy", "prompt": PROMPTS[3], "max_tokens": 5, "temperature": 0, "logprobs": 3,
     "ignore_eos": True},
    {"custom_id": "seeded", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0.8, "seed": 5, "logprobs": 0,
     "ignore_eos": True},
    {"custom_id": "score", "prompt": PROMPTS[2], "max_tokens": 0, "prompt_logprobs": 2},
    {"custom_id": "both", "prompt": PROMPTS[3], "max_tokens": 3, "temperature": 0, "prompt_logprobs": 1,
     "logprobs": 1, "ignore_eos": True},
    {"custom_id": "plain", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
]


def write_mixed(path):
    path.write_text("".join(json.dumps(line) + "\n" for line in MIXED))
    return path


def assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert set(got) == set(want)
    for key, line in want.items():
        other = got[key]
        assert other["token_ids"] == line["token_ids"], key
        for field in ("logprobs", "prompt_logprobs"):
            assert (field in other) == (field in line), (key, field)
            for a, b in zip(other.get(field) or [], line.get(field) or []):
                if b is None:
                    assert a is None
                    continue
                assert a["token_id"] == b["token_id"] and abs(a["logprob"] - b["logprob"]) < SAME, (key, field)
                assert [t["token_id"] for t in a["top_logprobs"]] == [t["token_id"] for t in b["top_logprobs"]]


async def test_two_tiers_give_the_single_process_logprobs(checkpoint, tmp_path):
    requests = write_mixed(tmp_path / "in.jsonl")
    want = run_lines(checkpoint, MIXED, max_batch_tokens=16)
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=2, micro_batches=3,
                                     max_batch_tokens=16)
    assert summary.failed == 0
    assert_same(read_results(out), want)


async def test_pipeline_stages_give_the_single_process_logprobs(model_dir, checkpoint, tmp_path):
    requests = write_mixed(tmp_path / "in.jsonl")
    want = run_lines(checkpoint, MIXED, max_batch_tokens=16)
    from glinthawk.client import submit

    async with pipeline(model_dir, [1], micro_batches=3, max_batch_tokens=16) as p:
        summary = await submit(requests, "127.0.0.1", p.port, tmp_path / "out.jsonl", progress=False)
    assert summary.failed == 0
    assert_same(read_results(tmp_path / "out.jsonl"), want)


# -- the Python API and the OpenAI service ---------------------------------------------------------
def test_python_api_sampling_params_ask_through_the_plain_line():
    """LLM.generate sends SamplingParams as a plain line: log-prob fields included."""
    from glinthawk.api import _sampling_fields

    params = SamplingParams(max_tokens=0, prompt_logprobs=2, logprobs=3)
    line = json.dumps({"custom_id": "0", "prompt": "x", **_sampling_fields(params)}).encode()
    parsed = parse_line(1, line).params
    assert (parsed.max_tokens, parsed.logprobs, parsed.prompt_logprobs) == (0, 3, 2)


def test_the_service_scores_a_prompt_on_v1_completions(tmp_path):
    """glinthawk serve passes logprobs and echo through: an evaluation harness's request."""
    from serve_util import ServeProcess

    service = ServeProcess(tmp_path / "data")
    try:
        client = service.client()
        prompt = "The built-in function"
        scored = client.completions.create(model="default", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        choice = scored.choices[0]
        assert choice.text == prompt and scored.usage.completion_tokens == 0
        assert len(choice.logprobs.tokens) == scored.usage.prompt_tokens
        assert choice.logprobs.token_logprobs[0] is None
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
        chunks = list(client.completions.create(model="default", prompt=prompt, max_tokens=2, temperature=0,
                                                logprobs=2, stream=True))
        assert len(chunks[0].choices[0].logprobs.tokens) == 2
        chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2, logprobs=True, top_logprobs=3)
        assert [len(e.top_logprobs) for e in chat.choices[0].logprobs.content] == [3, 3]
    finally:
        service.stop()


async def test_a_tier2_node_lost_mid_run_changes_no_logprob(checkpoint, tmp_path, caplog):
    """Sequences rebuilt on another node after theirs is lost rewrite the same prompt log-probs
    and add none twice: the lines equal one process's."""
    lines = [{**line, "max_tokens": 20} if line["max_tokens"] else line for line in MIXED] + [
        {"custom_id": f"late{i}", "prompt": PROMPTS[i % 4], "max_tokens": 0, "prompt_logprobs": 1} for i in range(4)]
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = await losing_a_node(checkpoint, requests, tmp_path / "out.jsonl", after_steps=6)
    assert summary.failed == 0
    assert "go back to the queue" in caplog.text  # sequences were rebuilt
    assert_same(read_results(tmp_path / "out.jsonl"), run_lines(checkpoint, lines, max_batch_tokens=8))
