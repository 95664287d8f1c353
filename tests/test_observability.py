"""Metrics, status and structured logs of a running cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request

from click.testing import CliRunner

from glinthawk.cli import main as cli_main
from glinthawk.client import submit
from glinthawk.metrics import serve
from glinthawk.net.netem import NetEm
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import write_requests


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_metrics_and_status_during_a_run(checkpoint, tmp_path):
    model, tokenizer = checkpoint
    tier2 = Tier2Node(kv_tokens=4096, netem=NetEm(delay_ms=5))  # a run long enough to look at
    tier2_port = await tier2.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{tier2_port}"], micro_batches=2, max_seqs=2)
    prompts = [(f"r{i}", "The quick brown fox", 40) for i in range(12)]
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0}, prompts)
    out = tmp_path / "out.jsonl"
    try:
        port = await tier1.start("127.0.0.1", 0)
        tier1_metrics = serve(tier1.metrics.registry, "127.0.0.1", 0)
        tier2_metrics = serve(tier2.metrics.registry, "127.0.0.1", 0)
        run = asyncio.create_task(submit(requests, "127.0.0.1", port, out, progress=False))
        while not (out.exists() and out.read_text().count("\n") >= 1):
            await asyncio.sleep(0.02)
        during = await asyncio.to_thread(scrape, tier1_metrics)
        status = await asyncio.to_thread(CliRunner().invoke, cli_main, ["status", f"127.0.0.1:{port}"])
        assert not run.done(), "the run ended before the mid-run checks"
        await run
        tier2_samples = await asyncio.to_thread(scrape, tier2_metrics)
    finally:
        await tier1.close()
        await tier2.close()
    assert during["glinthawk_generated_tokens_total"] > 0
    assert 1 <= during["glinthawk_first_tokens_total"] <= len(prompts)  # one result is written already
    assert tier1.stats.first_tokens == len(prompts)
    assert during["glinthawk_requests_admitted_total"] == len(prompts)
    assert during['glinthawk_kv_tokens_used{node="127.0.0.1:%d"}' % tier2_port] > 0
    assert during["glinthawk_attention_round_trip_seconds_count"] > 0
    assert tier2_samples['glinthawk_tier2_attention_seconds_count{layer="0"}'] > 0
    assert tier2_samples["glinthawk_network_received_bytes_total"] > 0
    text = status.output
    assert status.exit_code == 0, text
    assert f"127.0.0.1:{tier2_port}" in text and " up " in text and "running" in text and "tok/s" in text


def test_json_logs_are_one_object_per_line(tmp_path):
    ready = tmp_path / "addr"
    node = subprocess.Popen([sys.executable, "-m", "glinthawk.node", "--role", "tier2", "--kv-tokens", "16",
                             "--ready-file", str(ready), "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists() or node.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
    finally:
        node.terminate()
        _, stderr = node.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert any("listening on" in line["message"] for line in lines)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
