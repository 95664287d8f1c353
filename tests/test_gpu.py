"""CUDA checks: the compute core, the engine and the two tiers with Tier 1 on the GPU.

Every test here needs a CUDA device and is skipped where torch sees none (CI and the
CPU-only machines). On a GPU machine: ``pytest -m gpu tests/test_gpu.py -rs``.

What runs on CUDA is checked against what is already trusted: transformers on the same
device (float32 tokens and logits; bfloat16/float16 logits within the CPU bf16 test's
tolerances) and glinthawk's own float32 CPU runs (single-process engine and two-tier).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import VARIANTS, load_reference
from cluster_util import distributed, read_results, single_process, write_requests
from engine_util import PROMPTS, request, run_engine
from test_graphs import check_every_stage
from test_model_vs_transformers import check_float32_logits, check_reduced_precision_logits, hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

VARIANT_NAMES = list(VARIANTS)
ROOT = Path(__file__).resolve().parent.parent
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def cuda_model(tiny_checkpoint):
    """``cuda_model(variant, dtype) -> (Model, Tokenizer)`` loaded by glinthawk onto CUDA."""
    from glinthawk.compute.loader import load_model
    from glinthawk.tokenizer import Tokenizer

    loaded: dict[tuple[str, str], tuple] = {}

    def get(variant: str = "llama_gqa", dtype: str = "float32"):
        if (variant, dtype) not in loaded:
            directory = tiny_checkpoint(variant)
            model = load_model(directory, dtype=dtype, device="cuda")
            assert model.device.type == "cuda" and model.dtype == TORCH_DTYPES[dtype]
            loaded[(variant, dtype)] = (model, Tokenizer(directory, extra_eos_ids=model.config.eos_token_ids))
        return loaded[(variant, dtype)]

    return get


@pytest.fixture(scope="module")
def cuda_reference(tiny_checkpoint):
    """``cuda_reference(variant, torch_dtype)``: transformers' model on CUDA (its own copy, not hf_model's)."""
    loaded: dict = {}

    def get(variant: str, dtype: torch.dtype = torch.float32):
        if (variant, dtype) not in loaded:
            loaded[(variant, dtype)] = load_reference(tiny_checkpoint(variant), dtype).to("cuda")
        return loaded[(variant, dtype)]

    return get


# -- 1. the compute core against transformers, both on CUDA ------------------------------
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_prompt_logits_float32_cuda(variant, cuda_model, cuda_reference):
    model, tok = cuda_model(variant)
    assert model.device.type == "cuda"
    check_float32_logits(model, tok, cuda_reference(variant))


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_engine_greedy_matches_generate_cuda(variant, cuda_model, cuda_reference):
    model, tok = cuda_model(variant)
    hf = cuda_reference(variant)
    max_tokens = 12
    expected = [hf_greedy(hf, tok.encode(p), max_tokens, None) for p in PROMPTS]
    requests = [request(str(i), p, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    # Chunked prefill sharing steps with decodes; later requests join mid-run.
    lines, engine = run_engine(model, tok, requests, max_batch_tokens=7, max_seqs=2)
    assert engine.store.keys.device.type == "cuda"
    for i, stream in enumerate(expected):
        assert lines[str(i)]["token_ids"] == stream, f"prompt {i}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_prompt_logits_reduced_precision_cuda(variant, dtype, cuda_model, cuda_reference):
    model, tok = cuda_model(variant, dtype)
    # The 1.5x-of-transformers'-own-error rule is the bf16 one; float16's errors are ~8x
    # smaller on both sides, where that ratio is noise. Both get the bf16 tolerances.
    check_reduced_precision_logits(model, tok, cuda_reference(variant, TORCH_DTYPES[dtype]),
                                   cuda_reference(variant), against_float32=dtype == "bfloat16")


# -- 2. the single-process engine: CUDA against CPU --------------------------------------
def test_engine_cuda_greedy_equals_cpu(tiny_model, cuda_model):
    cpu_model, tok = tiny_model("llama_gqa")
    gpu_model, _ = cuda_model("llama_gqa")
    requests = [request(f"g{i}", p, max_tokens=16, temperature=0, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    requests += [request("ids", list(range(5, 40)), max_tokens=9, temperature=0, ignore_eos=True)]
    expected, _ = run_engine(cpu_model, tok, requests, max_batch_tokens=4096)
    expected_tokens = {cid: line["token_ids"] for cid, line in expected.items()}
    for kwargs in (dict(max_batch_tokens=4096), dict(max_batch_tokens=5, max_seqs=2)):
        got, engine = run_engine(gpu_model, tok, requests, **kwargs)
        assert {cid: line["token_ids"] for cid, line in got.items()} == expected_tokens, kwargs
        assert engine.store.keys.device.type == "cuda"


def test_engine_cuda_over_an_int8_store_agrees_with_the_cpu_engine_over_one(tiny_model, cuda_model):
    """--kv-dtype int8 in the single process on CUDA (the torch attention paths over int8 rows): the
    store is int8 on the GPU, and the first greedy tokens are the CPU engine's over an int8 store."""
    cpu_model, tok = tiny_model("llama_gqa")
    gpu_model, _ = cuda_model("llama_gqa")
    requests = [request(f"q{i}", p, max_tokens=8, temperature=0, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    expected, _ = run_engine(cpu_model, tok, requests, kv_dtype="int8")
    got, engine = run_engine(gpu_model, tok, requests, kv_dtype="int8")
    assert engine.store.keys.device.type == "cuda" and engine.store.keys.dtype == torch.int8
    assert all(len(line["token_ids"]) == 8 for line in got.values())
    assert {cid: line["token_ids"][:3] for cid, line in got.items()} == {
        cid: line["token_ids"][:3] for cid, line in expected.items()}  # int8 rounding may split a near tie later


def test_engine_cuda_seeded_sampling_runs_and_repeats(cuda_model):
    """Sampling filters on CUDA logits: every request gets its tokens, and a rerun the same ones."""
    model, tok = cuda_model("llama_gqa")
    requests = [request(f"s{i}", p, max_tokens=8, temperature=0.8, top_p=0.9, top_k=20, min_p=0.01,
                        seed=100 + i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    first, _ = run_engine(model, tok, requests, max_batch_tokens=16)
    again, _ = run_engine(model, tok, requests, max_batch_tokens=16)
    assert all(len(line["token_ids"]) == 8 for line in first.values())
    assert {k: v["token_ids"] for k, v in first.items()} == {k: v["token_ids"] for k, v in again.items()}


def test_generate_command_on_cuda_equals_cpu_engine(checkpoint, model_dir, tmp_path):
    """``glinthawk generate --device cuda`` (a real process) against the in-process CPU engine."""
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "glinthawk", "generate", str(requests), "-o", str(out),
                           "--model", str(model_dir), "--device", "cuda", "--dtype", "float32",
                           "--max-batch-tokens", "16", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    expected = single_process(checkpoint, requests)
    got = read_results(out)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}


# -- 3. two tiers: Tier 1 on CUDA, Tier 2 (KV cache, attention) on CPU -------------------
@pytest.mark.parametrize("nodes", [1, 2])
def test_distributed_tier1_cuda_equals_single_process_cpu(checkpoint, cuda_model, tmp_path, nodes):
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    expected = single_process(checkpoint, requests)
    summary, out = asyncio.run(distributed(cuda_model("llama_gqa"), requests, tmp_path / "out.jsonl",
                                           nodes=nodes, micro_batches=2))
    got = read_results(out)
    assert summary.failed == 0 and summary.done == len(expected)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}
    assert {k: v["text"] for k, v in got.items()} == {k: v["text"] for k, v in expected.items()}


def test_glinthawk_run_device_cuda_equals_single_process_cpu(checkpoint, model_dir, tmp_path):
    """``glinthawk run --device cuda``: real Tier 1 (CUDA) and Tier 2 (CPU) processes on loopback."""
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "glinthawk", "run", str(requests), "-o", str(out),
                           "--model", str(model_dir), "--device", "cuda", "--dtype", "float32", "--tier2-nodes", "2",
                           "--kv-tokens", "4096", "--max-batch-tokens", "16", "--log-dir", str(tmp_path / "logs"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    expected = single_process(checkpoint, requests)
    got = read_results(out)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}


def test_quick_engine_bench_on_cuda(tmp_path, monkeypatch):
    """``glinthawk bench engine --device cuda``: the model, HF and the roofline's limits all on the GPU."""
    from click.testing import CliRunner

    from glinthawk.bench.cli import bench

    monkeypatch.setenv("GLINTHAWK_BENCH_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(bench, ["engine", "--quick", "--device", "cuda", "--out", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "engine.json").read_text())
    assert data["config"]["device"] == "cuda" and data["config"]["dtype"] == "bfloat16"
    assert data["machine"]["gpu_model"]
    for row in data["results"]:
        assert row["tok_s"] > 0 and row["fraction_of_roofline"] > 0 and row["greedy_agreement"] is not None


# -- 4. placement --------------------------------------------------------------------------
def test_auto_device_puts_every_weight_on_cuda(model_dir, tiny_checkpoint):
    from glinthawk.compute.loader import load_model, resolve_device

    assert resolve_device("auto").type == "cuda" and resolve_device(None).type == "cuda"
    for directory, dtype in ((model_dir, "float32"), (tiny_checkpoint("qwen2_bias"), "float16")):
        model = load_model(directory, dtype=dtype, device="auto")
        tensors = [*model._tensors(), model.inv_freq]
        assert all(t.device.type == "cuda" for t in tensors), [t.device for t in tensors]
        assert model.device.type == "cuda" and model.dtype == TORCH_DTYPES[dtype]
        assert model.inv_freq.dtype == torch.float32


# -- 5. CUDA graphs for decode steps (compute/graphs.py, --cuda-graphs) ----------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["llama_gqa", "qwen3"])
def test_captured_stages_equal_the_same_stages_replayed_eagerly_cuda(variant, dtype, cuda_model):
    """Every stage kind through real CUDA graphs against the same padded stage run eagerly
    (``EagerReplay``): bit for bit; and against the unpadded stage: tokens equal, float32
    outputs equal too (cuBLAS may pick another kernel for another row count in 16 bits)."""
    from glinthawk.compute.graphs import EagerReplay, StageGraphs
    from glinthawk.step import compute_stage

    model, _ = cuda_model(variant, dtype)
    captured, replayed = StageGraphs(model, 64), StageGraphs(model, 64, EagerReplay())
    check_every_stage(model, replayed, seed=7, against=lambda work: compute_stage(model, work, captured))
    if dtype == "float32":
        check_every_stage(model, StageGraphs(model, 64), seed=8)
    assert captured.capture.captures == len(captured.runners) > 0


def test_engine_tokens_with_cuda_graphs_equal_tokens_without_cuda(cuda_model):
    """The switch on and off, on the GPU: the same tokens (greedy, seeded, log-probs), with
    prefill chunks sharing steps with decodes."""
    model, tok = cuda_model("llama_gqa")
    requests = [request(f"g{i}", p, max_tokens=16, temperature=0, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    requests += [request(f"s{i}", p, max_tokens=8, temperature=0.8, top_p=0.9, seed=i, logprobs=2, ignore_eos=True)
                 for i, p in enumerate(PROMPTS)]
    for kwargs in (dict(max_batch_tokens=4096), dict(max_batch_tokens=9, max_seqs=3)):
        expected, _ = run_engine(model, tok, requests, **kwargs)
        got, engine = run_engine(model, tok, requests, cuda_graphs=True, **kwargs)
        assert engine.graphs is not None and engine.graphs.capture.captures > 0
        assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}


def test_distributed_tier1_cuda_graphs_equals_single_process_cpu(checkpoint, cuda_model, tmp_path):
    """Tier 1 on the GPU with --cuda-graphs, micro-batches merged: the CPU single process's tokens."""
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    expected = single_process(checkpoint, requests)
    summary, out = asyncio.run(distributed(cuda_model("llama_gqa"), requests, tmp_path / "out.jsonl", nodes=2,
                                           micro_batches=2, cuda_graphs=True))
    assert summary.failed == 0
    assert {k: v["token_ids"] for k, v in read_results(out).items()} == {k: v["token_ids"] for k, v in expected.items()}
