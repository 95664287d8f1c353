"""glinthawk run --ray: the nodes as Ray actors on a Ray instance started on this machine. Ray is an
optional extra (pip install 'glinthawk[ray]', not in the test extra: it is large), so these tests
skip without it; with it they take about a minute on two cores."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from glinthawk.client import fetch_status
from glinthawk.net.auth import SECRET_ENV
from glinthawk.settings import Tier1Settings, Tier2Settings

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
    tier1 = Tier1Settings(micro_batches=2, max_seqs=2, max_batch_tokens=64)
    kv = Tier2Settings(kv_tokens=4096)
    with RayCluster("local", model_dir, 2, dtype="float32", tier1=tier1, tier2=kv) as cluster:
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
    """LLM(ray=..., stages=2) with no KV size: every stage's Tier 2 actor reserves, of Ray's memory
    resource, the KV it holds and its process (Ray's accounting shows just that held), the largest
    its machine holds for two; and the output is a local cluster's."""
    ray = pytest.importorskip("ray")
    from glinthawk import LLM, SamplingParams
    from glinthawk.compute.config import ModelConfig
    from glinthawk.compute.kvcache import bytes_per_token
    from glinthawk.ray_memory import kv_memory_for, reservation

    prompts = ["The quick brown fox", "Tier two holds the key value cache"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(model_dir, ray="local", stages=2, tier2_nodes=1, dtype="float32") as llm:
        on_ray = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
        status = asyncio.run(fetch_status(*llm._cluster.tier1_address, secret=llm._cluster.secret.encode()))
        reserved, memory = list(llm._cluster.reserved), ray.cluster_resources()["memory"]  # one machine
        held = _memory_held(ray, sum(reserved))
    with LLM(model_dir, tier2_nodes=1, dtype="float32", kv_tokens=4096) as llm:
        local = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
    assert on_ray == local and all(len(ids) == 8 for ids in on_ray)
    kv = kv_memory_for(memory, 2)  # both Tier 2 actors on this machine: an even share of its 80%
    assert reserved == [reservation(kv)] * 2 and held == sum(reserved)
    config = ModelConfig.from_file(model_dir / "config.json")
    for layers, nodes in [(status["layers"], status["tier2"]), *((s["layers"], s["tier2"]) for s in status["stages"])]:
        per_token = bytes_per_token(layers[1] - layers[0], config.num_kv_heads, config.head_dim, torch.float32)
        assert [node["kv_tokens"] for node in nodes] == [kv // per_token]  # the KV it reserved, in whole tokens


def _memory_held(ray, expected: float) -> float:
    """Ray's memory resource held by actors, once it reads ``expected`` (its view of what is free
    lags the actors' start a little), or as it reads after 60 s."""
    deadline = time.monotonic() + 60
    while True:
        held = ray.cluster_resources()["memory"] - ray.available_resources().get("memory", 0)
        if held == expected or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def test_run_on_ray_refuses_a_kv_size_no_machine_holds_before_starting_anything(model_dir, tmp_path):
    pytest.importorskip("ray")
    requests = mixed_requests(tmp_path / "in.jsonl")
    run = subprocess.run([sys.executable, "-m", "glinthawk", "run", str(requests), "-o", str(tmp_path / "out.jsonl"),
                          "--ray", "local", "--tier2-nodes", "1", "--model", str(model_dir), "--kv-memory", "64TiB",
                          "--no-progress"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert re.fullmatch(r"Error: the Ray cluster could not run it: each Tier 2 actor reserves 68486\.1 GiB of Ray's "
                        r"memory resource \(its KV and 1 GiB for its process\) and a CPU: Ray's machines hold 0 of the "
                        r"1; give a smaller --kv-memory \(or --kv-tokens\), fewer Tier 2 nodes, or more machines",
                        run.stderr.strip().splitlines()[-1]), run.stderr
    assert "cluster up" not in run.stderr


def test_a_tier2_actor_ray_cannot_place_is_named_with_the_memory_it_misses(model_dir):
    """Other work holds all but 1 GiB of Ray's memory: the Tier 2 actor (a 1 GiB KV reserves over
    2 GiB) stays pending, and after the wait it is given the run stops, saying what it misses."""
    ray = pytest.importorskip("ray")
    from glinthawk.plan import GiB
    from glinthawk.ray_cluster import RayCluster
    from glinthawk.ray_memory import reservation

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        other = ray.util.placement_group([{"memory": ray.cluster_resources()["memory"] - GiB}])
        ray.get(other.ready())  # placed: it holds that memory now
        cluster = RayCluster("local", model_dir, 1, dtype="float32", tier2=Tier2Settings(kv_memory="1GiB"),
                             place_timeout_s=5)
        with pytest.raises(RuntimeError) as refused:
            cluster.__enter__()
        need = reservation(GiB) / GiB
        assert str(refused.value) == (
            f"1 of 1 Tier 2 actor(s) did not start within 5 s: they need {need:.1f} GiB of Ray's memory resource "
            f"({need:.1f} GiB each) and Ray has 1.0 GiB of it free on all machines together; free some (other work "
            "holds it), or give a smaller --kv-memory or fewer Tier 2 nodes")
    finally:
        ray.shutdown()


def test_ray_options_leave_the_kv_size_to_each_machine_only_when_none_is_given(model_dir):
    from glinthawk.ray_cluster import RayCluster

    auto = RayCluster.from_options("local", model_dir, 2, stages=2, kv_dtype="int8", delay_ms=5)
    assert not auto.sized and auto.tier2_settings.kv_dtype == "int8" and auto.netem.delay_ms == 5
    assert [(r.start, r.stop) for r in auto.stages] == [(0, 1), (1, 2)]  # the test model's 2 layers
    assert RayCluster.from_options("local", model_dir, 2, kv_memory="2GiB").sized
    with pytest.raises(ValueError, match="--stages 9: give 1 to 2 stages"):
        RayCluster.from_options("local", model_dir, 2, stages=9)
