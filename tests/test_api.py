"""The vLLM-style Python API, end to end on a local two-tier cluster."""

from __future__ import annotations

import json

import pytest

from glinthawk import LLM, GenerationError, SamplingParams

from cluster_util import single_process

PROMPTS = ["The quick brown fox", "Tier one holds", "A", "Offline batch inference runs millions of prompts"]


@pytest.fixture(scope="module")
def llm(model_dir, tmp_path_factory):
    # float32, like the single-process references the outputs are compared with
    with LLM(model=model_dir, tier2_nodes=2, kv_tokens=2048, dtype="float32",
             log_dir=tmp_path_factory.mktemp("api-logs")) as llm:
        yield llm


def test_generate_returns_results_in_input_order(llm, checkpoint, tmp_path):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": str(i), "prompt": p, "temperature": 0, "max_tokens": 6,
                                            "ignore_eos": True}) + "\n" for i, p in enumerate(PROMPTS)))
    expected = single_process(checkpoint, requests)
    assert [o.prompt for o in outputs] == PROMPTS
    assert [o.outputs[0].token_ids for o in outputs] == [expected[str(i)]["token_ids"] for i in range(len(PROMPTS))]
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_chat_uses_the_chat_template(llm, checkpoint):
    _, tokenizer = checkpoint
    conversations = [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Tier two"}]]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=3))
    assert [o.prompt_token_count for o in outputs] == [len(tokenizer.encode_chat(c)) for c in conversations]
    single = llm.chat(conversations[1], SamplingParams(temperature=0, max_tokens=3))
    assert single[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_a_failed_request_raises_with_its_reason(llm):
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        llm.generate(["x"], SamplingParams(max_tokens=100_000))


def test_n_choices_come_back_as_the_outputs_of_one_prompt(llm):
    """vLLM's SamplingParams(n=...): one RequestOutput with n CompletionOutputs, choice 0 the
    request's own seed (the same as n=1 gives)."""
    params = SamplingParams(n=3, temperature=0.9, seed=4, max_tokens=5, ignore_eos=True)
    (output,) = llm.generate([PROMPTS[3]], params)
    assert [choice.index for choice in output.outputs] == [0, 1, 2]
    (alone,) = llm.generate([PROMPTS[3]], SamplingParams(temperature=0.9, seed=4, max_tokens=5, ignore_eos=True))
    assert output.outputs[0].token_ids == alone.outputs[0].token_ids
