"""--kv-dtype int8 without Tier 2 nodes: ``glinthawk generate`` and ``LLM(kv_dtype=...)`` keep K/V
as a Tier 2 node with --kv-dtype int8 does (the same store and attention), and answer as it does."""

from __future__ import annotations

import asyncio

import pytest
import torch
from click.testing import CliRunner

from cluster_util import PROMPTS, distributed, read_results, write_requests
from glinthawk import LLM, SamplingParams
from glinthawk.cli import main
from glinthawk.client import fetch_status
from glinthawk.compute.kvcache import bytes_per_token
from glinthawk.engine import Engine
from glinthawk.net.netem import parse_size
from glinthawk.requests import PLAIN, Request

GREEDY = {"temperature": 0, "logprobs": 2}  # each step's top two: how near a tie it was
# A top-two log-prob margin under which two runs may pick apart: int8 rounding turns the last-bit
# differences of two batchings (about 1e-6) into up to about 0.01 of log-prob (measured 0.009).
NEAR_TIE = 0.03


def generate(model_dir, requests, out, *options: str):
    """``glinthawk generate`` as the tests of the two-tier run call it: float32, 64-token steps."""
    return CliRunner().invoke(main, ["generate", str(requests), "-o", str(out), "--model", str(model_dir), "--dtype",
                                     "float32", "--max-batch-tokens", "64", "--no-progress", *options])


def logprobs(line: dict) -> list[float]:
    return [entry["logprob"] for entry in line["logprobs"]]


def before_a_near_tie(line: dict) -> int:
    """How many of ``line``'s tokens came before its first step whose top two were nearly tied."""
    margins = [entry["top_logprobs"][0]["logprob"] - entry["top_logprobs"][1]["logprob"] for entry in line["logprobs"]]
    return next((step for step, margin in enumerate(margins) if margin < NEAR_TIE), len(margins))


def int8_bytes_per_token(model) -> int:
    """K and V as int8 rows plus a bf16 scale per token and KV head, across all layers."""
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 2)


async def test_generate_over_int8_answers_as_two_tiers_over_int8_tier2_nodes(checkpoint, model_dir, tmp_path):
    """The greedy tokens of two Tier 2 nodes with --kv-dtype int8, up to a near tie (most of them
    here); and log-probs that int8 rounding moved from generate's unquantized run (so the option
    is not ignored)."""
    requests = write_requests(tmp_path / "in.jsonl", GREEDY)
    runs = {}
    for kv_dtype in ("auto", "int8"):
        result = generate(model_dir, requests, tmp_path / f"{kv_dtype}.jsonl", "--kv-tokens", "4096",
                          "--kv-dtype", kv_dtype)
        assert result.exit_code == 0, result.output
        runs[kv_dtype] = read_results(tmp_path / f"{kv_dtype}.jsonl")
    summary, out = await distributed(checkpoint, requests, tmp_path / "two-tier.jsonl", nodes=2, micro_batches=2,
                                     kv_dtype="int8")
    assert summary.failed == 0
    two_tier, compared = read_results(out), 0
    for custom_id, _, max_tokens in PROMPTS:
        single, nodes = runs["int8"][custom_id], two_tier[custom_id]
        assert len(single["token_ids"]) == len(nodes["token_ids"]) == max_tokens
        sure = before_a_near_tie(single)
        assert single["token_ids"][:sure] == nodes["token_ids"][:sure], custom_id
        compared += sure
    assert compared >= sum(max_tokens for _, _, max_tokens in PROMPTS) // 2
    moved = max(abs(a - b) for custom_id, _, _ in PROMPTS
                for a, b in zip(logprobs(runs["int8"][custom_id]), logprobs(runs["auto"][custom_id])))
    assert moved > 1e-3  # the same engine and batching give the same bits to 1e-6 but for the store


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_generates_kv_store_keeps_the_kv_dtype_and_sizes_kv_memory_by_its_bytes(checkpoint, model_dir, tmp_path,
                                                                               monkeypatch, kv_dtype):
    """The engine that ``generate`` builds (caught as it runs): its store's K/V dtype, bytes per token
    (an int8 store's scales included, as a Tier 2 node counts them) and the tokens --kv-memory buys."""
    model, _ = checkpoint
    engines: list[Engine] = []
    run = Engine.run

    def spy(engine, items, emit):
        engines.append(engine)
        return run(engine, items, emit)

    monkeypatch.setattr(Engine, "run", spy)
    requests = write_requests(tmp_path / "in.jsonl", GREEDY)
    result = generate(model_dir, requests, tmp_path / "out.jsonl", "--kv-memory", "1MiB", "--kv-dtype", kv_dtype)
    assert result.exit_code == 0, result.output
    (store,) = [engine.store for engine in engines]
    per_token = int8_bytes_per_token(model) if kv_dtype == "int8" else bytes_per_token(
        model.config.num_layers, model.config.num_kv_heads, model.config.head_dim, torch.float32)
    assert store.keys.dtype == store.values.dtype == (torch.int8 if kv_dtype == "int8" else torch.float32)
    assert store.quantized == (kv_dtype == "int8") and store.dtype == torch.float32
    assert store.bytes_per_token == per_token
    assert store.capacity_tokens == parse_size("1MiB") // per_token
    stored = sum(t.numel() * t.element_size() for t in (store.keys, store.values, store.key_scales,
                                                          store.value_scales) if t is not None)
    assert stored == store.capacity_tokens * per_token  # what it really holds, not just what it counts


def test_a_bad_kv_dtype_is_one_line(checkpoint, model_dir, tmp_path):
    requests = write_requests(tmp_path / "in.jsonl", GREEDY)
    result = generate(model_dir, requests, tmp_path / "out.jsonl", "--kv-dtype", "int4")
    assert result.exit_code == 2 and not (tmp_path / "out.jsonl").exists()
    assert result.output.strip().splitlines()[-1] == (
        "Error: Invalid value for '--kv-dtype': 'int4' is not one of 'auto', 'int8'.")
    model, tokenizer = checkpoint
    with pytest.raises(ValueError, match=r"^--kv-dtype must be one of auto, int8, got 'fp8'$"):
        Engine(model, tokenizer, kv_tokens=64, kv_dtype="fp8")


def test_the_python_api_takes_kv_dtype_for_its_tier2_nodes(checkpoint, model_dir, tmp_path):
    """LLM(kv_dtype="int8"): its Tier 2 nodes hold int8 (the tokens --kv-memory buys say so) and it
    answers as the engine over an int8 store does."""
    model, tokenizer = checkpoint
    prompts = ["The quick brown fox", "Tier two holds the key value cache"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(model_dir, tier2_nodes=1, dtype="float32", kv_memory="1MiB", kv_dtype="int8",
             log_dir=tmp_path / "logs") as llm:
        outputs = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
        status = asyncio.run(fetch_status(*llm._cluster.tier1_address))
    assert [node["kv_tokens"] for node in status["tier2"]] == [parse_size("1MiB") // int8_bytes_per_token(model)]
    lines: list[dict] = []
    engine = Engine(model, tokenizer, kv_tokens=4096, kv_dtype="int8")
    engine.run([Request(str(i), i, PLAIN, params, prompt=p) for i, p in enumerate(prompts)], lines.append)
    assert outputs == [line["token_ids"] for line in sorted(lines, key=lambda line: int(line["custom_id"]))]
