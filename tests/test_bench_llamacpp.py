"""The engine suite's optional llama.cpp baseline (glinthawk.bench.llamacpp): its output parsed, the
command built for a workload, the line printed when it is not built. The test that runs the real
``llama-batched-bench`` is slow and skips where scripts/build_llamacpp.sh has not built it."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from glinthawk.bench import llamacpp
from glinthawk.bench.llamacpp import Baseline

# stdout of a real run (scripts/build_llamacpp.sh's build, llama-cpp-python 0.3.36; the bench's 125M Llama
# in bf16 on 2 threads): llama-batched-bench -c 3072 -b 2048 -npp 16 -ntg 31 -npl 64 -t 2 -tb 2 -ctk bf16 -ctv bf16
SAMPLE = """
llama_batched_bench: n_kv_max = 16384, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, \
is_tg_separate = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    16 |     31 |   64 |   3008 |    1.181 |   867.12 |    3.593 |   552.11 |    4.774 |   630.03 |

"""


def fake_binary(tmp_path: Path, script: str) -> Path:
    """An executable standing in for llama-batched-bench: ``script`` run by sh."""
    path = tmp_path / "build" / "bin" / llamacpp.BINARY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def test_parse_reads_the_settings_and_the_row_of_a_real_run():
    settings, rows = llamacpp.parse(SAMPLE)
    assert settings["n_kv_max"] == 16384 and settings["n_threads"] == 2 and settings["flash_attn"] == -1
    assert settings["n_threads_batch"] == 2 and settings["n_ubatch"] == 512
    assert rows == [{"pp": 16, "tg": 31, "b": 64, "n_kv": 3008, "t_pp": 1.181, "s_pp": 867.12, "t_tg": 3.593,
                     "s_tg": 552.11, "t": 4.774, "s": 630.03}]


def test_parse_finds_no_row_in_an_error():
    assert llamacpp.parse("main: error: unable to load model\n|  PP |  TG |\n") == ({}, [])


def test_command_for_a_workload():
    base = Baseline(Path("/b/llama-batched-bench"), Path("/m.gguf"), "bfloat16", threads=2, max_batch_tokens=2048)
    # -ntg new-1: its prefill already computes each sequence's first new token
    assert base.command(128, 16, 128) == [
        "/b/llama-batched-bench", "-m", "/m.gguf", "-c", str(128 * 144), "-b", "2048", "-npp", "16", "-ntg", "127",
        "-npl", "128", "-t", "2", "-tb", "2", "-ctk", "bf16", "-ctv", "bf16"]
    fp32 = Baseline(Path("/b"), Path("/m.gguf"), "float32", threads=1, max_batch_tokens=512)
    assert fp32.command(64, 8, 32, ("-fa", "off"))[3:] == [
        "-c", str(64 * 40), "-b", "512", "-npp", "8", "-ntg", "31", "-npl", "64", "-t", "1", "-tb", "1",
        "-ctk", "f32", "-ctv", "f32", "-fa", "off"]


def test_variants_of_the_args_knob():
    assert llamacpp.variants("-fa on;-fa off") == (("-fa", "on"), ("-fa", "off"))
    assert llamacpp.variants("") == ((),) and llamacpp.variants("-ub 2048") == (("-ub", "2048"),)


def test_measure_counts_generated_tokens_over_the_whole_run(tmp_path):
    sample = tmp_path / "sample.txt"
    sample.write_text(SAMPLE)
    base = Baseline(fake_binary(tmp_path, f"cat {sample}"), tmp_path / "m.gguf", "bfloat16", 2, 2048)
    row = base.measure(64, 16, 32)
    # 64 sequences x 32 new tokens over T s (prefill + decode); S t/s counts the prompts' tokens too
    assert row["llamacpp_tok_s"] == pytest.approx(64 * 32 / 4.774)
    assert row["llamacpp_reported_tok_s"] == 630.03 and row["llamacpp_decode_tok_s"] == 552.11
    assert row["llamacpp_seconds"] == 4.774 and row["llamacpp_prefill_seconds"] == 1.181
    assert "-ntg 31 -npl 64" in row["llamacpp_command"] and row["llamacpp_settings"]["n_threads"] == 2


def test_measure_keeps_the_fastest_variant(tmp_path):
    slow, fast = tmp_path / "slow.txt", tmp_path / "fast.txt"
    slow.write_text(SAMPLE)
    fast.write_text(SAMPLE.replace("|    4.774 |", "|    2.000 |"))
    script = f'case "$*" in *"-fa off"*) cat {fast};; *"-fa bad"*) exit 3;; *) cat {slow};; esac'
    base = Baseline(fake_binary(tmp_path, script), tmp_path / "m.gguf", "float32", 2, 2048,
                    variants=(("-fa", "on"), ("-fa", "off"), ("-fa", "bad")))
    row = base.measure(64, 16, 32)
    assert row["llamacpp_args"] == "-fa off" and row["llamacpp_seconds"] == 2.0
    assert row["llamacpp_tok_s"] == pytest.approx(64 * 32 / 2.0) and row["llamacpp_command"].endswith("-fa off")
    tried = row["llamacpp_variants"]
    assert [v["llamacpp_args"] for v in tried] == ["-fa on", "-fa off", "-fa bad"]
    assert tried[0]["llamacpp_seconds"] == 4.774 and "exited 3" in tried[2]["llamacpp_error"]


def test_measure_reports_a_failed_run_without_raising(tmp_path):
    base = Baseline(fake_binary(tmp_path, "echo 'error: unable to load model' >&2; exit 1"), tmp_path / "m.gguf",
                    "float32", 2, 2048)
    row = base.measure(8, 8, 8)
    assert "llamacpp_tok_s" not in row and "exited 1" in row["llamacpp_error"]
    assert "unable to load model" in row["llamacpp_error"]


def test_skip_message_when_the_binary_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path))
    said: list[str] = []
    assert llamacpp.prepare("auto", tmp_path, "float32", "cpu", 2, 2048, said.append) is None
    assert len(said) == 1 and "\n" not in said[0]
    assert "scripts/build_llamacpp.sh" in said[0] and str(tmp_path / "build" / "bin") in said[0]
    said.clear()
    assert llamacpp.prepare("off", tmp_path, "float32", "cpu", 2, 2048, said.append) is None and said == []


def test_an_explicit_path_that_is_not_there_is_refused_in_one_line(tmp_path):
    with pytest.raises(click.ClickException) as caught:
        llamacpp.find_binary(str(tmp_path / "nowhere"))
    message = caught.value.format_message()
    assert "\n" not in message and "scripts/build_llamacpp.sh" in message and "nowhere" in message


def test_found_where_the_build_script_puts_it_and_skipped_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path))
    binary = fake_binary(tmp_path, "exit 0")
    assert llamacpp.find_binary("auto") == binary and llamacpp.find_binary(str(binary)) == binary
    said: list[str] = []
    assert llamacpp.prepare("auto", tmp_path, "bfloat16", "cuda", 2, 2048, said.append) is None
    assert len(said) == 1 and "CPU-only" in said[0]
    # no converter beside it: one line, no conversion tried
    said.clear()
    assert llamacpp.prepare("auto", tmp_path, "bfloat16", "cpu", 2, 2048, said.append) is None
    assert len(said) == 1 and llamacpp.CONVERTER in said[0]


def test_sources_found_in_either_layout(tmp_path):
    for root, sources in ((tmp_path / "cache", tmp_path / "cache" / "llama.cpp"), (tmp_path / "tree", tmp_path / "tree")):
        (sources / "gguf-py").mkdir(parents=True)
        (sources / llamacpp.CONVERTER).write_text("")
        binary = root / "build" / "bin" / llamacpp.BINARY
        binary.parent.mkdir(parents=True)
        binary.write_text("")
        assert llamacpp.source_dir(binary) == sources
    assert llamacpp.source_dir(tmp_path / "elsewhere" / "build" / "bin" / llamacpp.BINARY) is None


def test_gguf_path_follows_the_checkpoint_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path / "llama"))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"1234")
    first = llamacpp.gguf_path(checkpoint, "float32")
    assert first.parent == tmp_path / "llama" / "gguf" and first.name.endswith("-f32.gguf")
    assert llamacpp.gguf_path(checkpoint, "bfloat16").name.endswith("-bf16.gguf")
    assert llamacpp.gguf_path(checkpoint, "float32") == first
    (checkpoint / "model.safetensors").write_bytes(b"123456")  # a rebuilt checkpoint: a new conversion
    assert llamacpp.gguf_path(checkpoint, "float32") != first


@pytest.mark.slow
def test_real_llamacpp_baseline_in_the_engine_suite(tmp_path, monkeypatch):
    """scripts/build_llamacpp.sh's binary on the quick model: converted, run, a ratio in the JSON."""
    binary = llamacpp.find_binary("auto")
    if binary is None:
        pytest.skip(llamacpp.skip_message().strip())
    from glinthawk.bench.cli import bench

    monkeypatch.setenv("GLINTHAWK_BENCH_CACHE", str(tmp_path / "bench-cache"))
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path / "llama"))  # the GGUF goes here, not in the build's cache
    out = tmp_path / "out"
    result = CliRunner().invoke(bench, ["engine", "--quick", "--out", str(out), "--set", f"llamacpp={binary}",
                                        "--set", "long_batch=0", "--set", "hf=false"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "engine.json").read_text())
    row = data["results"][0]
    assert "llamacpp_error" not in row, row["llamacpp_error"]
    assert row["llamacpp_tok_s"] > 0 and row["ratio_ours_to_llamacpp"] > 0
    assert row["llamacpp_settings"]["n_threads"] == data["config"]["llamacpp_run"]["threads"]
    assert data["targets"]["vs_llamacpp"]["value"] == row["ratio_ours_to_llamacpp"]
    assert list((tmp_path / "llama" / "gguf").glob("llama-tiny-*.gguf"))


def test_engine_suite_carries_on_without_it(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from glinthawk.bench.cli import bench

    monkeypatch.setenv("GLINTHAWK_BENCH_CACHE", str(tmp_path / "bench-cache"))
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path / "llama"))
    out = tmp_path / "out"
    result = CliRunner().invoke(bench, ["engine", "--quick", "--out", str(out), "--set", "llamacpp=auto",
                                        "--set", "long_batch=0", "--set", "hf=false"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if "llama.cpp baseline skipped" in line]
    assert len(skipped) == 1 and "scripts/build_llamacpp.sh" in skipped[0]
    data = json.loads((out / "engine.json").read_text())
    assert data["targets"]["vs_llamacpp"]["value"] is None and data["config"]["llamacpp_run"] is None
    assert "llamacpp_tok_s" not in data["results"][0] and data["results"][0]["tok_s"] > 0
