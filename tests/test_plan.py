"""glinthawk plan: the model's arithmetic on inputs worked out by hand, and plain refusals of bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from click.testing import CliRunner

from glinthawk.cli import main
from glinthawk.compute.config import ModelConfig
from glinthawk.plan import GiB, Machine, Model, PlanError, Workload, plan

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512, "hidden_act": "silu"}

# Round figures: Tier 1 reads its 10 GB of weights in 10 ms and computes 40 tokens (2e10 FLOPs each at
# 80% of 1e14) in the same 10 ms, so B* = 40; it makes 4000 tokens/s, half of them prompt tokens.
MODEL = Model(weights=10**10, flops_per_token=2 * 10**10, kv_per_token=10**5, wire_per_token=10**4, layers=10,
              max_tokens=4096)
TIER1 = Machine(memory=12 * 10**9, price=2.0, bandwidth=1e12, flops=1e14)
TIER2 = Machine(memory=GiB + 4_180_000_000, price=0.5, bandwidth=1e10)  # 4e9 bytes of KV (x 1.045, + 1 GiB)
WORK = Workload(prompt_tokens=100, output_tokens=100, requests=10**6, latency_s=0.0, link=1e12)


def test_model_sizes_from_a_config():
    model = Model.of(ModelConfig.from_dict(TINY), itemsize=2)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k and v, o, the MLP's three
    assert model.weights == 2 * (2 * (per_layer + 2 * 64) + 64 + 2 * 100 * 64)  # + norms, embedding, head
    assert model.flops_per_token == 2 * (2 * per_layer + 100 * 64)
    assert model.kv_per_token == 2 * 2 * 2 * 16 * 2  # K and V, layers, KV heads, head_dim, bytes
    assert model.wire_per_token == 2 * (64 + 2 * 32) * 2  # q, k, v of each layer
    assert model.head_flops == 2 * 100 * 64
    tied = Model.of(ModelConfig.from_dict({**TINY, "tie_word_embeddings": True}), itemsize=2)
    assert model.weights - tied.weights == 2 * 100 * 64


def test_two_tier_plan_worked_by_hand():
    two, one = plan(MODEL, TIER1, TIER2, WORK)
    # Tier 2 must read 2000 tokens/s x 150.5 tokens of context x 1e5 B at 90% of 10 GB/s: 3.34 -> 4 nodes.
    # Their attention for a micro-batch of 40: 40 x 150.5 x 1e5 / (4 x 9e9) = 16.7 ms a step, 1.67 ms a
    # layer against Tier 1's 1 ms: 1 + 2 micro-batches; a cycle of 10 + 16.7 ms makes 2000 x 0.0267 = 54
    # sequences in flight (Little's law), 1.08 GB of KV: one node's room would do.
    assert two.tier2_nodes == 4
    assert two.micro_batches == 3
    assert two.batch == math.ceil(2000 * (0.01 + 10 * (40 * 1e4 / 1e12 + 40 * 150.5 * 1e5 / (4 * 9e9)) / 10))
    assert two.batch == 54
    assert two.kv_per_node == math.ceil(54 * 200 * 10**5 / 4)
    assert two.tokens_per_s == pytest.approx(2000)
    assert two.busy == pytest.approx(1.0) and two.bound == "Tier 1 compute"
    assert two.cost_per_hour == pytest.approx(2.0 + 4 * 0.5)
    assert two.cost_per_million == pytest.approx(4.0 / (2000 * 3600) * 1e6)
    # Single-tier: 10.8 GB usable - 10 GB of weights hold 40 sequences of 2e7 B; a step reads the
    # weights and their KV: (1e10 + 40 x 150.5 x 1e5) / 1e12 = 10.602 ms.
    assert one.batch == 40 and one.tier2_nodes == 0
    per_token = 100 * 2e10 / 8e13 + 100 * 0.010602 / 40
    assert one.tokens_per_s == pytest.approx(100 / per_token)
    assert one.cost_per_million == pytest.approx(2.0 / (100 / per_token * 3600) * 1e6)


def test_a_prompt_token_skips_the_lm_head():
    """Only a prompt's last token is sampled: with a quarter of the FLOPs in the head, 100 prompt tokens
    and 100 generated cost 100 x 1.5e10 + 100 x 2e10 FLOPs, at 8e13 FLOP/s."""
    headed = dataclasses.replace(MODEL, head_flops=5 * 10**9)
    two, one = plan(headed, TIER1, TIER2, WORK)
    assert two.tokens_per_s == pytest.approx(8e13 * 100 / (100 * 1.5e10 + 100 * 2e10))
    per_token = 100 * 1.5e10 / 8e13 + 100 * 0.010602 / 40  # single-tier: as worked by hand above, cheaper prompts
    assert one.tokens_per_s == pytest.approx(100 / per_token)


def test_a_slow_link_caps_the_throughput_and_so_the_nodes():
    link = 100 * 10**4 * 200 / 100 * 5  # bytes/s for 500 generated tokens/s (each brings a prompt token)
    two, _ = plan(MODEL, TIER1, TIER2, Workload(100, 100, 10**6, 0.0, link))
    assert two.tokens_per_s == pytest.approx(500)
    assert two.bound == "Tier 1's network link" and two.busy == pytest.approx(0.25)
    assert two.tier2_nodes == 1  # 500 x 150.5 x 1e5 / 9e9 = 0.84 of a node's reads


def test_latency_adds_micro_batches_and_sequences_but_not_throughput():
    near, _ = plan(MODEL, TIER1, TIER2, WORK)
    far, _ = plan(MODEL, TIER1, TIER2, Workload(100, 100, 10**6, latency_s=0.005, link=1e12))
    assert far.tokens_per_s == pytest.approx(near.tokens_per_s)
    assert far.micro_batches > near.micro_batches and far.batch > near.batch + 2000 * 10 * 2 * 0.005 - 1


@pytest.mark.parametrize("change, message", [
    ({"tier1": Machine(memory=10**10, price=2.0, bandwidth=1e12, flops=1e14)}, "do not fit one Tier 1"),
    ({"tier2": Machine(memory=GiB + 10**6, price=0.5, bandwidth=1e10)}, "does not fit a Tier 2 node"),
    ({"tier2": Machine(memory=GiB + 4_180_000_000, price=0.0, bandwidth=1e10)}, "prices must be above 0"),
    ({"tier1": Machine(memory=12 * 10**9, price=-1.0, bandwidth=1e12, flops=1e14)}, "prices must be above 0"),
    ({"work": Workload(3000, 2000, 10**6)}, "exceeds the model's context"),
    ({"work": Workload(100, 100, 300, latency_s=0.1, link=1e12)}, "cannot be hidden for this workload"),
    ({"work": Workload(100, 100, 10**9, latency_s=10.0, link=1e12)}, "micro-batches in flight"),
])
def test_bad_input_is_refused_plainly(change, message):
    inputs = {"tier1": TIER1, "tier2": TIER2, "work": WORK, **change}
    with pytest.raises(PlanError, match=message):
        plan(MODEL, inputs["tier1"], inputs["tier2"], inputs["work"])


# Llama 2 7B's shape (the original work's smallest model) and its T4 + CPU VM layout (docs/DEPLOYMENT.md)
LLAMA2_7B = {**TINY, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096}
PAPER = ["--dtype", "float16", "--tier1-memory", "16GiB", "--tier1-price", "0.54", "--tier2-memory", "110GiB", "--tier2-price", "0.75",
         "--prompt-tokens", "1024", "--output-tokens", "1024"]


@pytest.fixture
def llama2(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    return str(tmp_path)


def test_the_command_prints_the_table(llama2):
    result = CliRunner().invoke(main, ["plan", "--model", llama2, *PAPER])
    assert result.exit_code == 0, result.output
    for row in ("Tier 2 nodes", "KV per Tier 2 node", "sequences at once (batch)", "micro-batches in flight",
                "generated tokens/s", "cost per 1M tokens", "limited by"):
        assert row in result.output
    assert "KV 512.00 KiB per token" in result.output and "two-tier" in result.output and "single-tier" in result.output
    assert "lower cost per token" in result.output


@pytest.mark.parametrize("args, message", [
    (["--tier1-price", "0"], "0.0 is not in the range x>0"),
    (["--tier1-memory", "1MiB"], "do not fit one Tier 1"),
    (["--latency-ms", "100", "--requests", "10"], "cannot be hidden"),
])
def test_the_command_refuses_in_one_line(llama2, args, message):
    result = CliRunner().invoke(main, ["plan", "--model", llama2, *PAPER, *args])
    assert result.exit_code != 0 and message in result.output


def _limits_file(tmp_path, summary: dict, name: str = "limits.json", ram: int | None = 64 * GiB) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"suite": "limits", "summary": summary, "machine": {"ram_bytes": ram}}))
    return str(path)


BY_HAND = ["--tier1-memory", "16GiB", "--tier1-price", "0.54", "--tier2-price", "0.75", "--latency-ms", "0"]


def test_machine_figures_come_from_bench_limits_files(llama2, tmp_path):
    """The figures of `glinthawk bench limits` output give the same plan as the same figures typed in."""
    tier1 = _limits_file(tmp_path, {"read_bandwidth": 3e11, "matmul_peak_float16": 6e13}, "t1.json")
    tier2 = _limits_file(tmp_path, {"read_bandwidth": 4e10, "matmul_peak_float32": 1e12}, "t2.json", ram=110 * GiB)
    from_files = CliRunner().invoke(main, ["plan", "--model", llama2, "--dtype", "float16", *BY_HAND,
                                           "--tier1-limits", tier1, "--tier2-limits", tier2,
                                           "--prompt-tokens", "1024", "--output-tokens", "1024"])
    typed = CliRunner().invoke(main, ["plan", "--model", llama2, "--dtype", "float16", *BY_HAND,
                                      "--tier1-flops", "60T", "--tier1-bandwidth", "300GB/s",
                                      "--tier2-bandwidth", "40GB/s", "--tier2-memory", "110GiB",
                                      "--prompt-tokens", "1024", "--output-tokens", "1024"])
    assert from_files.exit_code == 0 and typed.exit_code == 0, from_files.output + typed.output
    assert from_files.output == typed.output
    defaults = CliRunner().invoke(main, ["plan", "--model", llama2, "--dtype", "float16", *BY_HAND,
                                         "--tier2-memory", "110GiB", "--prompt-tokens", "1024",
                                         "--output-tokens", "1024"])
    assert defaults.exit_code == 0 and defaults.output != typed.output  # the files did change the figures


def test_the_workload_comes_from_a_requests_file(tmp_path):
    """--input: the mean prompt (tokenized) and max_tokens, and the request count, as if typed in."""
    from glinthawk import DEFAULT_MODEL
    from glinthawk.tokenizer import Tokenizer

    prompts = ["The quick brown fox", "Tier one holds the weights; tier two holds the key value cache. " * 4]
    lines = [{"custom_id": "a", "prompt": prompts[0], "max_tokens": 20},
             {"custom_id": "b", "prompt": prompts[1], "max_tokens": 41},
             {"custom_id": "c", "prompt": list(range(5, 35)), "max_tokens": 30},
             {"custom_id": "d", "prompt": "x", "temperature": "hot"}]  # not a request: left out
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer = Tokenizer(DEFAULT_MODEL)
    counts = [len(tokenizer.encode(p)) for p in prompts] + [30]
    machines = BY_HAND + ["--dtype", "float32", "--tier2-memory", "8GiB", "--requests", "5000"]
    from_file = CliRunner().invoke(main, ["plan", *machines, "--input", str(path)])
    assert from_file.exit_code == 0, from_file.output
    assert "3 requests, 1 line(s) that are not requests left out" in from_file.output
    assert f"max {max(counts)}" in from_file.output and "the model's tokenizer" in from_file.output
    typed = CliRunner().invoke(main, ["plan", *machines, "--prompt-tokens", str(math.ceil(sum(counts) / 3)),
                                      "--output-tokens", "31"])  # (20 + 41 + 30) / 3, rounded up
    assert typed.exit_code == 0
    assert from_file.output.split("\n", 1)[1] == typed.output


def test_without_a_tokenizer_prompts_are_counted_from_their_characters(llama2, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps({"custom_id": "a", "prompt": "x" * 4000, "max_tokens": 1000}) + "\n")
    result = CliRunner().invoke(main, ["plan", "--model", llama2, *PAPER[:10], "--input", str(path),
                                       "--requests", "10000"])
    assert result.exit_code == 0, result.output
    assert "characters / 4" in result.output and "mean 1,000.0" in result.output
    assert "(2000 tokens)" in result.output  # 1000 prompt tokens + 1000 generated


@pytest.mark.parametrize("files, message", [
    ({"--tier1-limits": "{broken"}, "is not JSON"),
    ({"--tier2-limits": json.dumps({"suite": "engine", "summary": {}})}, "is not a `glinthawk bench limits` result"),
    ({"--tier1-limits": json.dumps({"suite": "limits", "summary": {"read_bandwidth": 1e11,
                                                                   "matmul_peak_float32": 1e12}})},
     "has no float16 matmul peak (it measured float32)"),
    ({"--input": "not json\n"}, "holds no request (1 line(s) that are not one)"),
    ({"--input": ""}, "holds no request"),
])
def test_bad_input_files_are_refused_in_one_line(llama2, tmp_path, files, message):
    args = []
    for option, text in files.items():
        path = tmp_path / option.strip("-")
        path.write_text(text)
        args += [option, str(path)]
    result = CliRunner().invoke(main, ["plan", "--model", llama2, *PAPER, *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "glinthawk bench limits" in result.output or "JSONL" in result.output  # what to do


@pytest.mark.parametrize("args, message", [
    (["--tier1-limits", "missing.json"], "'--tier1-limits': File 'missing.json' does not exist"),
    (["--input", "missing.jsonl"], "'--input': File 'missing.jsonl' does not exist"),
])
def test_missing_files_are_named(llama2, args, message):
    result = CliRunner().invoke(main, ["plan", "--model", llama2, *PAPER, *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_lengths_are_asked_for_when_no_file_gives_them(llama2):
    result = CliRunner().invoke(main, ["plan", "--model", llama2, *PAPER[:10]])
    assert result.exit_code == 2 and "give --prompt-tokens and --output-tokens, or --input" in result.output
    no_memory = [a for a in PAPER if a not in ("--tier2-memory", "110GiB")]
    result = CliRunner().invoke(main, ["plan", "--model", llama2, *no_memory])
    assert result.exit_code == 2 and "give --tier2-memory" in result.output


def test_the_limits_files_this_project_wrote_are_read():
    """The real output of `glinthawk bench limits` (docs/bench), CPU and GPU."""
    from pathlib import Path

    from glinthawk.plan_inputs import read_limits

    bench = Path(__file__).resolve().parent.parent / "docs" / "bench"
    for path in (bench / "limits.json", bench / "gpu-h200" / "limits.json"):
        result = json.loads(path.read_text())
        limits = read_limits(path, "bfloat16")
        assert limits.flops == result["summary"]["matmul_peak_bfloat16"] and limits.flops > 0
        assert limits.bandwidth == result["summary"]["read_bandwidth"]
        assert limits.memory == result["machine"]["ram_bytes"] and limits.measured == ["bfloat16", "float32"]
    assert read_limits(bench / "limits.json", "float16").flops is None  # not measured: the command asks for it
