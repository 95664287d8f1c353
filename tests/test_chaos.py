"""Chaos (slow suite): Tier 2 nodes and the client killed and restarted at random moments of one run."""

from __future__ import annotations

import random
import subprocess
import time

import pytest

from cluster_util import read_results, single_process
from test_faults import mixed_requests, small_cluster, submit_command, tokens_by_id

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [2026, 7])
def test_random_kills_and_restarts_end_with_the_single_process_output(checkpoint, model_dir, tmp_path, seed):
    """Every second or so, SIGKILL one of three Tier 2 nodes (restarted after a moment, at its
    address) or the client (resumed at once). The run ends with every request answered once,
    token for token as in one process, greedy and seeded sampling alike."""
    rng = random.Random(seed)
    requests = mixed_requests(tmp_path / "in.jsonl", copies=4)
    expected = single_process(checkpoint, requests)
    out = tmp_path / "out.jsonl"
    kills = {"tier2": 0, "client": 0}
    with small_cluster(model_dir, tmp_path, tier2_nodes=3, micro_batches=3) as cluster:
        command = submit_command(requests, cluster, out)
        client = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 900
        first = rng.sample(["tier2", "client"], 2)  # each kind at least once, then at random
        while client.poll() is None and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.5))
            if client.poll() is not None:
                break
            kind = first.pop() if first else rng.choice(["tier2", "tier2", "client"])
            if kind == "tier2":
                victim = f"tier2-{rng.randrange(3)}"
                cluster.kill(victim)
                time.sleep(rng.uniform(0.0, 1.0))
                cluster.restart(victim)
                kills["tier2"] += 1
            else:
                client.kill()
                client.wait()
                client = subprocess.Popen(command + ["--resume"], stderr=subprocess.PIPE, text=True)
                kills["client"] += 1
        _, stderr = client.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert client.returncode == 0, stderr
    assert kills["tier2"] >= 1 and kills["client"] >= 1, kills  # the run lasted long enough to be disturbed
    got = read_results(out)  # every line whole JSON, no custom_id twice
    assert tokens_by_id(got) == tokens_by_id(expected)
