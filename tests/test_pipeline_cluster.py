"""Pipeline stages as real processes (``glinthawk run --stages``, ``LocalCluster(stages=...)``),
and what SIGKILL of one of their processes does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glinthawk.cluster import LocalCluster, stage_layers
from glinthawk.compute.loader import load_model
from glinthawk.tokenizer import Tokenizer

from checkpoints import build_checkpoint
from cluster_util import read_results, single_process
from test_faults import submit_command, wait_for_lines
from test_pipeline import fault_requests


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("four"), "llama_gqa", layers=4, seed=5)


def tokens(results: dict) -> dict:
    return {k: v["token_ids"] for k, v in results.items()}


def reference(directory, requests) -> dict:
    return tokens(single_process((load_model(directory, dtype="float32", device="cpu"), Tokenizer(directory)),
                                 requests))


def test_stage_layers_split_evenly_or_as_given():
    assert stage_layers(None, 4) == [range(4)]
    assert stage_layers(2, 4) == [range(0, 2), range(2, 4)]
    assert stage_layers("3", 32) == [range(0, 10), range(10, 21), range(21, 32)]
    assert stage_layers("0:1,1:4", 4) == [range(0, 1), range(1, 4)]
    for bad in ("0:2,3:4", "0:3,2:4", "1:4", "0:2", "0:2,2:2,2:4", "x", 0, 5):
        with pytest.raises(ValueError, match="--stages"):
            stage_layers(bad, 4)


@pytest.mark.parametrize("stages", ["2", pytest.param("0:1,1:3,3:4", marks=pytest.mark.slow)])  # 3 stages: test_pipeline
def test_glinthawk_run_with_stages_gives_the_single_process_tokens(four_layer_dir, tmp_path, stages):
    requests = fault_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "glinthawk", "run", str(requests), "-o", str(out), "--model",
                           str(four_layer_dir), "--dtype", "float32", "--stages", stages, "--tier2-nodes", "1",
                           "--no-progress", "--log-dir", str(tmp_path / "logs")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count = len(stages.split(",")) if "," in stages else int(stages)
    assert f"cluster up: {count} stages, each with 1 Tier 2 node(s)" in done.stderr
    assert tokens(read_results(out)) == reference(four_layer_dir, requests)


@pytest.mark.slow  # the same loss in process: test_pipeline.py::test_a_lost_tier2_node_of_a_later_stage_changes_no_token
def test_sigkill_of_a_tier2_node_of_stage_two(four_layer_dir, tmp_path):
    requests = fault_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    with LocalCluster(four_layer_dir, tier2_nodes=2, stages=2, kv_tokens=4096, max_seqs=2, max_batch_tokens=16,
                      dtype="float32", log_dir=tmp_path / "logs") as cluster:
        client = subprocess.Popen(submit_command(requests, cluster, out), stderr=subprocess.PIPE, text=True)
        wait_for_lines(out, 2)
        cluster.kill("stage-1-tier2-0")
        _, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr
    assert "stage 2:4: lost Tier 2 node" in (tmp_path / "logs" / "tier1.log").read_text()
    assert tokens(read_results(out)) == reference(four_layer_dir, requests)


def test_sigkill_of_a_stage_stops_the_run_naming_it_and_resume_finishes(four_layer_dir, tmp_path):
    requests = fault_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    with LocalCluster(four_layer_dir, tier2_nodes=1, stages=2, kv_tokens=4096, max_seqs=2, max_batch_tokens=16,
                      dtype="float32", log_dir=tmp_path / "logs") as cluster:
        command = submit_command(requests, cluster, out)
        client = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        wait_for_lines(out, 2)
        cluster.kill("stage-1")
        _, stderr = client.communicate(timeout=120)
        assert client.returncode != 0
        assert "stage 2:4 at 127.0.0.1:" in stderr and "restart it, then rerun with --resume" in stderr, stderr
        assert "Traceback" not in stderr
        partial = read_results(out)
        assert 2 <= len(partial) < 16
        cluster.restart("stage-1")
        resumed = None
        for _ in range(50):  # until the first stage has found the restarted one
            resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
            if "restart it" not in resumed.stderr:
                break
        assert resumed.returncode == 0, resumed.stderr
    assert tokens(read_results(out)) == reference(four_layer_dir, requests)


@pytest.mark.parametrize("args,message", [
    (["--layers", "0:2"], "--layers 0:2 ends before the model's last layer (4); give --next HOST:PORT"),
    (["--layers", "2:4", "--next", "127.0.0.1:9"], "--next is for a stage before the last"),
    (["--layers", "3:1"], "layers 3:1 are not a range of the model's 4 layers"),
    (["--layers", "two"], "expected A:B (layers A..B-1)"),
])
def test_glinthawk_node_refuses_a_stage_it_cannot_be(four_layer_dir, args, message):
    done = subprocess.run([sys.executable, "-m", "glinthawk.node", "--role", "tier1", "--tier2", "127.0.0.1:9",
                           "--model", str(four_layer_dir), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_python_api_takes_stages(four_layer_dir):
    from glinthawk import LLM, SamplingParams
    from glinthawk.engine import Engine
    from glinthawk.requests import parse_line

    prompts = ["The quick brown fox", "Tier one holds the weights"]
    with LLM(model=four_layer_dir, stages=2, tier2_nodes=1, dtype="float32") as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6,
                                                                                      ignore_eos=True))]
    model = load_model(four_layer_dir, dtype="float32", device="cpu")
    lines: list[dict] = []
    Engine(model, Tokenizer(four_layer_dir), kv_tokens=1024).run(
        [parse_line(i + 1, json.dumps({"custom_id": str(i), "prompt": p, "max_tokens": 6, "temperature": 0,
                                        "ignore_eos": True}).encode()) for i, p in enumerate(prompts)], lines.append)
    assert got == [line["token_ids"] for line in sorted(lines, key=lambda line: int(line["custom_id"]))]
