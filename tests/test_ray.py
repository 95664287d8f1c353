"""glinthawk run --ray: the nodes as Ray actors on a Ray instance started on this machine. Ray is an
optional extra (pip install 'glinthawk[ray]', not in the test extra: it is large), so these tests
skip without it; with it they take about a minute on two cores."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
import torch

from glinthawk.client import fetch_status
from glinthawk.net.auth import SECRET_ENV

from cluster_util import read_results, single_process
from test_faults import FAULT_PROMPTS, mixed_requests, tokens_by_id, wait_for_lines


def test_without_ray_the_message_says_how_to_get_it(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from glinthawk.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    requests = mixed_requests(tmp_path / "in.jsonl")
    result = CliRunner().invoke(main, ["run", str(requests), "-o", str(tmp_path / "out.jsonl"), "--ray", "auto"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --ray needs Ray: pip install 'glinthawk[ray]'"


def test_run_on_ray_equals_a_single_process(checkpoint, model_dir, tmp_path):
    pytest.importorskip("ray")
    requests = mixed_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "glinthawk", "run", str(requests), "-o", str(out), "--ray", "local",
                          "--tier2-nodes", "2", "--model", str(model_dir), "--dtype", "float32", "--kv-tokens", "4096",
                          "--max-batch-tokens", "64", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "2 Tier 2 actor(s) joined" in run.stderr
    assert tokens_by_id(read_results(out)) == tokens_by_id(single_process(checkpoint, requests))


def test_a_killed_tier2_actor_is_restarted_by_ray_and_used_again(checkpoint, model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from glinthawk.ray_cluster import RayCluster

    requests = mixed_requests(tmp_path / "in.jsonl")
    expected = tokens_by_id(single_process(checkpoint, requests))
    tier1 = ["--dtype", "float32", "--micro-batches", "2", "--max-seqs", "2", "--max-batch-tokens", "64"]
    with RayCluster("local", model_dir, 2, tier1_args=tier1, tier2_args=["--kv-tokens", "4096"]) as cluster:
        host, port = cluster.tier1_address
        env = {**os.environ, SECRET_ENV: cluster.secret}
        submit = [sys.executable, "-m", "glinthawk", "submit", "--to", f"{host}:{port}", "--no-progress"]
        out = tmp_path / "out.jsonl"
        client = subprocess.Popen([*submit, str(requests), "-o", str(out)], env=env, stderr=subprocess.PIPE, text=True)
        wait_for_lines(out, 2)
        victim = cluster.tier2[0]
        old_pid, old_address = ray.get(victim.pid.remote()), ray.get(victim.address.remote())
        os.kill(old_pid, signal.SIGKILL)  # the actor's node: the actor goes with it, and Ray restarts it
        _, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr
        assert tokens_by_id(read_results(out)) == expected
        new_address = ray.get(victim.address.remote(), timeout=120)  # waits for the restarted actor
        assert ray.get(victim.pid.remote()) != old_pid and new_address != old_address
        # Tier 1 uses it again: a second file runs with sequences on the restarted node
        again = subprocess.Popen([*submit, str(requests), "-o", str(tmp_path / "again.jsonl")], env=env,
                                 stderr=subprocess.PIPE, text=True)
        seen = asyncio.run(_sequences_seen_on(host, port, new_address, cluster.secret.encode(), again))
        assert again.wait(timeout=300) == 0
    assert seen
    assert len(read_results(tmp_path / "again.jsonl")) == len(FAULT_PROMPTS)


async def _sequences_seen_on(host: str, port: int, address: str, secret: bytes, client: subprocess.Popen) -> bool:
    """Whether ``glinthawk status`` shows ``address`` holding sequences while ``client`` runs."""
    while client.poll() is None:
        status = await fetch_status(host, port, secret=secret)
        if any(node["address"] == address and node["alive"] and node["sequences"] for node in status["tier2"]):
            return True
        await asyncio.sleep(0.05)
    return False


def test_run_on_ray_in_stages_equals_a_single_process(checkpoint, model_dir, tmp_path):
    """--ray with --stages: each stage an actor with Tier 2 actors of its own, chained by --next."""
    pytest.importorskip("ray")
    requests = mixed_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "glinthawk", "run", str(requests), "-o", str(out), "--ray", "local",
                          "--stages", "2", "--tier2-nodes", "1", "--model", str(model_dir), "--dtype", "float32",
                          "--kv-tokens", "4096", "--max-batch-tokens", "64", "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Tier 1 in 2 stages at" in run.stderr and "1 Tier 2 actor(s) joined to each" in run.stderr
    assert tokens_by_id(read_results(out)) == tokens_by_id(single_process(checkpoint, requests))


def test_the_python_api_runs_on_ray_in_stages_with_kv_sized_from_memory(checkpoint, model_dir, tmp_path):
    """LLM(ray=..., stages=2) with no KV size: every stage's Tier 2 actors size their KV from the
    memory Ray reports for their machine, and the output is a local cluster's."""
    ray = pytest.importorskip("ray")
    from glinthawk import LLM, SamplingParams
    from glinthawk.compute.config import ModelConfig
    from glinthawk.compute.kvcache import bytes_per_token
    from glinthawk.ray_cluster import kv_memory_for, node_memory

    prompts = ["The quick brown fox", "Tier two holds the key value cache"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(model_dir, ray="local", stages=2, tier2_nodes=1, dtype="float32") as llm:
        on_ray = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
        status = asyncio.run(fetch_status(*llm._cluster.tier1_address, secret=llm._cluster.secret.encode()))
        memory = node_memory(ray)  # one machine: the driver's is the actors'
    with LLM(model_dir, tier2_nodes=1, dtype="float32", kv_tokens=4096) as llm:
        local = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
    assert on_ray == local and all(len(ids) == 8 for ids in on_ray)
    config = ModelConfig.from_file(model_dir / "config.json")
    for layers, nodes in [(status["layers"], status["tier2"]), *((s["layers"], s["tier2"]) for s in status["stages"])]:
        per_token = bytes_per_token(layers[1] - layers[0], config.num_kv_heads, config.head_dim, torch.float32)
        assert [node["kv_tokens"] for node in nodes] == [kv_memory_for(memory, 2) // per_token]


def test_a_ray_tier2_actor_takes_a_share_of_its_machines_memory():
    from glinthawk.plan import GiB
    from glinthawk.ray_cluster import RAY_KV_FRACTION, kv_memory_for

    alone = kv_memory_for(64 * GiB, 1)
    assert alone == int((RAY_KV_FRACTION * 64 * GiB - GiB) / 1.045)
    assert kv_memory_for(64 * GiB, 4) == int((RAY_KV_FRACTION * 16 * GiB - GiB) / 1.045) < alone
    assert kv_memory_for(64 * GiB, 1, fraction=0.5) < alone
    with pytest.raises(ValueError, match=r"Ray reports 4\.0 GiB of memory on a machine for 4 Tier 2 actor\(s\).*give "
                                         r"--kv-memory \(or --kv-tokens\), or run fewer Tier 2 nodes"):
        kv_memory_for(4 * GiB, 4)


def test_ray_options_leave_the_kv_size_to_each_machine_only_when_none_is_given(model_dir):
    from glinthawk.ray_cluster import RayCluster

    auto = RayCluster.from_options("local", model_dir, 2, stages=2, kv_dtype="int8")
    assert not auto.sized and auto.tier2_args[:2] == ["--kv-dtype", "int8"]
    assert [(r.start, r.stop) for r in auto.stages] == [(0, 1), (1, 2)]  # the test model's 2 layers
    assert RayCluster.from_options("local", model_dir, 2, kv_memory="2GiB").sized
    with pytest.raises(ValueError, match="--stages 9: give 1 to 2 stages"):
        RayCluster.from_options("local", model_dir, 2, stages=9)
