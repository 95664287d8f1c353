"""The planner's model against measured ``glinthawk run``s on loopback (issue 22): predicted / measured
tokens/s within 25% on 3 configurations. Only ratios are compared: every figure the model is fed
(plan_measure.measure_host, and the other processes' load during each run) is measured on this
machine, apart from the run it predicts."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest

from glinthawk import DEFAULT_MODEL
from glinthawk.compute.config import ModelConfig
from glinthawk.plan import Model
from glinthawk.plan_loopback import Host, LoopbackRun, predict

ROUNDS = 2  # each configuration: measure the host, then run it; the ratio is the geometric mean of the rounds


def _run(run: LoopbackRun, work: Path) -> tuple[float, float]:
    """Generated tokens/s of ``run`` as ``glinthawk run`` does it (submit to the last result, the cluster
    up and loaded), and the other processes' threads running meanwhile."""
    from glinthawk.bench.workloads import request_lines, token_prompts, write_jsonl
    from glinthawk.client import submit
    from glinthawk.cluster import LocalCluster
    from glinthawk.net.loop import run as run_async
    from glinthawk.plan_measure import OthersRunning

    lines = request_lines(token_prompts(run.requests, run.prompt_tokens, 4096, seed=2), run.output_tokens)
    requests = write_jsonl(work / "requests.jsonl", lines)
    seq = run.prompt_tokens + run.output_tokens
    with LocalCluster(Path(DEFAULT_MODEL), tier2_nodes=run.tier2_nodes, dtype="bfloat16", device="cpu",
                      micro_batches=run.micro_batches, kv_tokens=run.requests * seq, max_seqs=run.requests,
                      tier1_threads=1,  # the model's one thread a process
                      delay_ms=run.delay_s * 1e3) as cluster:
        host, port = cluster.tier1_address
        with OthersRunning([node.process.pid for node in cluster.nodes]) as others:
            started = time.perf_counter()
            summary = run_async(submit(requests, host, port, work / "out.jsonl", progress=False))
            seconds = time.perf_counter() - started
    assert summary.generated_tokens == run.requests * run.output_tokens
    return summary.generated_tokens / seconds, others.mean


CONFIGS = [  # one Tier 2 node and two micro-batches; two nodes, longer prompts; an injected delay to hide
    LoopbackRun(tier2_nodes=1, requests=32, prompt_tokens=16, output_tokens=32, micro_batches=2),
    LoopbackRun(tier2_nodes=2, requests=64, prompt_tokens=32, output_tokens=16, micro_batches=2),
    LoopbackRun(tier2_nodes=1, requests=32, prompt_tokens=16, output_tokens=32, micro_batches=4, delay_s=0.002),
]


@pytest.mark.slow
@pytest.mark.parametrize("run", CONFIGS, ids=["1-node", "2-nodes", "delay-2ms"])
def test_predicted_tokens_per_s_match_loopback_runs(run, tmp_path):
    from glinthawk.plan_measure import measure_host

    model = Model.of(ModelConfig.from_file(Path(DEFAULT_MODEL) / "config.json"), itemsize=2)
    ratios = []
    for i in range(ROUNDS):
        host = measure_host(Path(DEFAULT_MODEL), "bfloat16")
        work = tmp_path / str(i)
        work.mkdir()
        measured, others = _run(run, work)
        predicted = predict(model, dataclasses.replace(host, others=others), run)
        print(f"{run}: {host}, others {others:.2f}: predicted {predicted.tokens_per_s:.0f} tok/s "
              f"({predicted.bound}), measured {measured:.0f}")
        ratios.append(predicted.tokens_per_s / measured)
    ratio = math.exp(sum(map(math.log, ratios)) / len(ratios))
    assert 0.75 <= ratio <= 1.25, f"predicted / measured {ratio:.2f} (rounds: {[round(r, 2) for r in ratios]})"


def test_the_model_follows_its_terms():
    """Without the measured runs: each bound as its term says (the host's figures made up, round)."""
    model = Model(weights=10**7, flops_per_token=10**7, kv_per_token=6 * 256, wire_per_token=6 * 768, layers=6,
                  max_tokens=512)
    host = Host(matmul_peak=1.25e11, read_bandwidth=1e20, step_s=0.003, round_trip_s=2e-4, message_s=1e-4, cores=2)
    one = predict(model, host, LoopbackRun(1, 32, 16, 32, micro_batches=2))
    # Tier 1: 2 micro-batches x (3 ms + 16 rows x 0.1 ms + 6 layers x 0.1 ms); a cycle, 4.6 + 6 x (0.2 ms +
    # a wait for half of the other job's layer, half the time), is shorter
    assert one.bound == "Tier 1" and one.decode_step_s == pytest.approx(2 * (0.003 + 0.0016 + 0.0006))
    far = predict(model, host, LoopbackRun(1, 32, 16, 32, micro_batches=2, delay_s=0.01))
    # 10 ms each way and half of asyncio's millisecond late, each way; Tier 1 computes 4% of the time
    assert far.bound == "round trips" and far.decode_step_s == pytest.approx(0.0046 + 6 * (0.021 + 2e-4), rel=0.002)
    shared = predict(model, dataclasses.replace(host, others=2.0), LoopbackRun(1, 32, 16, 32, micro_batches=2))
    # the cluster keeps 1 + 0.6 / 5.2 threads busy (Tier 1, and Tier 2 for its share): beside 2 others, on 2 cores
    assert shared.decode_step_s == pytest.approx(one.decode_step_s * (1 + 0.6 / 5.2 + 2) / 2)
    assert one.tokens_per_s == pytest.approx(32 * 32 / (0.005 + one.prompt_step_s + 31 * one.decode_step_s))
    long = predict(model, host, LoopbackRun(1, 32, 16, 32, micro_batches=2, max_batch_tokens=128))
    # a prompt step of 256 rows a micro-batch runs as 2 jobs of 128: the fixed cost twice
    assert long.prompt_step_s == pytest.approx(one.prompt_step_s + 2 * 0.003)
