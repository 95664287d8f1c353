"""``glinthawk bench SUITE --quick``: every suite writes its JSON (figures, ratios, machine
facts, configuration) and its plot. No speed is asserted: these machines are shared."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

from glinthawk.bench import SUITES
from glinthawk.bench.cli import bench
from glinthawk.bench.context import parse_knob
from glinthawk.bench.measure import Roofline
from glinthawk.bench.report import render_table
from glinthawk.bench.runs import decode_rate
from glinthawk.compute import matmul
from glinthawk.compute.loader import fast_bfloat16_cpu

# Per suite: fields every result row (or the named rows) must carry, ratios first.
ROW_FIELDS = {
    "limits": ["value", "unit"],
    "engine": ["tok_s", "decode_tok_s", "roofline_tok_s", "fraction_of_roofline", "hf_tok_s", "ratio_ours_to_hf"],
    "kernels": ["seconds"],
    "cluster": ["tok_s", "ratio_to_single_process"],
    "latency": ["delay_ms", "in_flight", "tok_s", "ratio_to_0ms_same_in_flight", "ratio_to_best_0ms"],
    "memory": ["cached_tokens", "tier1_rss", "tier2_rss", "theoretical_kv_bytes", "tier1_growth",
               "tier2_ratio_to_theoretical"],
    "capacity": ["context", "single_batch", "two_tier_batch", "single_decode_tok_s", "two_tier_decode_tok_s",
                 "decode_ratio", "end_to_end_ratio"],
    "pipeline": ["stages", "delay_ms", "micro_batches", "tok_s", "ratio_to_best_hand_picked", "ratio_to_one_stage"],
    "structured": ["constrained_tok_s", "unconstrained_tok_s", "ratio_constrained_to_unconstrained", "valid_json"],
    "prefix": ["tok_s_without", "tok_s_with", "speedup", "peak_kv_tokens_without", "peak_kv_tokens_with", "kv_ratio",
               "identical_outputs"],
}
TARGETS = {"limits": set(), "engine": {"roofline", "vs_hf", "long_context", "vs_llamacpp"},
           "kernels": {"attention", "attention_int8", "linear"},
           "cluster": {"vs_single"}, "latency": {"10ms", "50ms", "10ms_ordinary", "50ms_ordinary"},
           "memory": {"tier1_flat", "tier2_bound"}, "capacity": {"ratio_2048", "int8_batch"}, "pipeline": {"auto_count"},
           "structured": {"vs_unconstrained"}, "prefix": {"throughput", "kv", "no_shared_prefix", "n"}}


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """A private checkpoint cache, so the tests never depend on (or touch) ~/.cache."""
    path = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLINTHAWK_BENCH_CACHE", str(path))
        yield path


def run_bench(*args: str):
    result = CliRunner().invoke(bench, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def has_ratio(row: dict) -> bool:
    return any("ratio" in key or "fraction" in key or "growth" in key for key in row)


@pytest.mark.parametrize("suite", SUITES)
def test_quick_suite_writes_json_and_plot(suite, tmp_path, bench_cache):
    out = tmp_path / "out"
    result = run_bench(suite, "--quick", "--out", str(out))
    assert suite in result.output
    data = json.loads((out / f"{suite}.json").read_text())
    png = out / f"{suite}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert data["suite"] == suite and data["quick"] is True and data["elapsed_seconds"] > 0
    machine = data["machine"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "ram_bytes", "load_average"):
        assert key in machine, key
    assert machine["logical_cores"] >= 1 and machine["torch_threads"] >= 1 and machine["ram_bytes"] > 0
    assert machine["float32_cpu_matmul"] == ("glinthawk _matmul" if matmul.PANELS else "oneDNN")
    for key in ("python", "torch", "numpy", "transformers"):
        assert data["versions"][key], key
    config = data["config"]
    # --dtype auto: the rule, float32 unless the CPU has fast bf16
    assert config["dtype"] == ("bfloat16" if fast_bfloat16_cpu() else "float32")
    assert config["quick"] is True and len(config) > 3

    rows = data["results"]
    assert rows, "no results"
    fields = ROW_FIELDS[suite]
    for row in rows:
        if suite == "cluster" and "single" in row["system"]:
            assert row["ratio_to_single_process"] is not None
            continue
        for key in fields:
            assert key in row, (key, row)
        assert has_ratio(row), row
    assert set(data["targets"]) == TARGETS[suite]
    for check in data["targets"].values():
        assert {"target", "value", "threshold", "met"} <= set(check)
    if suite != "limits":
        assert data["model"]["parameters"] > 0 and data["model"]["kv_bytes_per_token"] > 0


def test_ratios_are_numbers_where_measured(tmp_path, bench_cache):
    out = tmp_path / "out"
    run_bench("cluster", "--quick", "--out", str(out), "--set", "tier2_nodes=1", "--set", "cluster.mode=inprocess")
    data = json.loads((out / "cluster.json").read_text())
    assert [r.get("tier2_nodes") for r in data["results"]] == [None, None, 1]
    assert all(isinstance(r["ratio_to_single_process"], float) for r in data["results"])
    assert data["config"]["mode"] == "inprocess"


def test_unknown_knob_and_bad_value_are_refused(tmp_path):
    runner = CliRunner()
    result = runner.invoke(bench, ["limits", "--quick", "--out", str(tmp_path), "--set", "nonsense=1"])
    assert result.exit_code != 0 and "unknown knob" in result.output
    result = runner.invoke(bench, ["limits", "--quick", "--out", str(tmp_path), "--set", "read_mib=lots"])
    assert result.exit_code != 0 and "read_mib" in result.output


def test_device_cuda_only_for_suites_that_run_there(tmp_path):
    runner = CliRunner()
    result = runner.invoke(bench, ["kernels", "--quick", "--out", str(tmp_path), "--device", "cuda"])
    assert result.exit_code != 0 and "CPU only" in result.output and "--device cuda" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(bench, ["engine", "--quick", "--out", str(tmp_path), "--device", "cuda"])
        assert result.exit_code != 0 and "no CUDA device" in result.output
    assert not list(tmp_path.iterdir())


def test_help_lists_suites_and_knobs():
    result = CliRunner().invoke(bench, ["--help"])
    assert result.exit_code == 0
    for suite in SUITES:
        assert f"{suite}:" in result.output
    assert "delays_ms=0,1,5,10,20,50" in result.output


def test_help_lists_the_defaults_each_suite_runs_with():
    """--help reads the knobs from bench/knobs.py, without importing the suites (they import torch)."""
    import importlib

    from glinthawk.bench import knobs

    for suite in SUITES:
        assert importlib.import_module(f"glinthawk.bench.{suite}").DEFAULTS is knobs.DEFAULTS[suite]


def test_parse_knob_types():
    assert parse_knob("3", 1, "k") == 3
    assert parse_knob("0.5", 1.0, "k") == 0.5
    assert parse_knob("1,2,4", [1], "k") == [1, 2, 4]
    assert parse_knob("no", True, "k") is False
    assert parse_knob("inprocess", "processes", "k") == "inprocess"


def test_decode_rate_starts_when_every_sequence_has_a_token():
    # Four sequences; the first has two tokens before the last one has its first.
    timeline = [(0.0, 0, 0), (1.0, 1, 1), (2.0, 3, 2), (3.0, 6, 3), (4.0, 10, 4), (5.0, 14, 4), (6.0, 18, 4)]
    assert decode_rate(timeline, sequences=4, total=18) == pytest.approx(4.0)
    assert decode_rate(timeline, sequences=4, total=20) is None
    assert decode_rate(timeline, sequences=5, total=18) is None


def test_roofline_step_is_bound_by_the_slower_floor():
    roof = Roofline(weight_bytes=1000, linear_params=500, embed_row_bytes=10, kv_bytes_per_token=100,
                    attn_flops_per_context_token=8, read_bandwidth=1000.0, matmul_peak=1000.0)
    step = roof.step(batch=2, context_tokens=10)
    assert step["bytes"] == 1000 + 2 * 10 + 10 * 100 and step["flops"] == 2 * 2 * 500 + 10 * 8
    assert roof.floor_seconds(2, 10) == pytest.approx(max(step["bytes"], step["flops"]) / 1000.0)


def test_render_table_aligns_columns():
    text = render_table([("a", "alpha"), ("b", "b")], [{"a": 1.5, "b": None}, {"a": 12345.0, "b": "x"}])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1


def test_bench_shapes_and_their_cache_markers():
    from glinthawk.bench.checkpoint import BENCH_MODEL, SHAPES, SMOLLM2_MODEL

    assert SHAPES == {"llama-125m": BENCH_MODEL, "smollm2-135m": SMOLLM2_MODEL}
    assert 134e6 < SMOLLM2_MODEL.params() < 135e6  # SmolLM2-135M: 134.5M parameters, embeddings tied
    # an untied spec's marker is what it was before `tied` existed, so cached checkpoints still match
    assert "tied" not in BENCH_MODEL.marker() and SMOLLM2_MODEL.marker()["tied"] is True


def test_pipeline_rounds_take_the_median_and_start_one_count_later_each():
    from glinthawk.bench.pipeline import _row, round_order
    from glinthawk.bench.runs import RunResult

    counts = ["auto", 1, 2, 4]
    assert [round_order(counts, r)[0] for r in range(5)] == ["auto", 1, 2, 4, "auto"]
    assert all(sorted(map(str, round_order(counts, r))) == sorted(map(str, counts)) for r in range(4))
    runs = [RunResult(1.0, tokens, 8, extra={"micro_batches_used": used})
            for tokens, used in ((100, 2), (300, 3), (200, 4))]
    row = _row(3, 10, "auto", runs)
    assert row["tok_s"] == 200 and row["rounds_tok_s"] == [100, 300, 200] and row["micro_batches_used"] == [2, 3, 4]
    assert render_table([("micro_batches_used", "used")], [row]).splitlines()[-1].strip() == "2, 3, 4"
