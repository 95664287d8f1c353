"""Tier 1's scheduling: how micro-batches are merged into compute jobs and when they start."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import torch

from glinthawk.client import submit
from glinthawk.compute.rope import Rotary
from glinthawk.node import tier1
from glinthawk.node.merger import StageMerger, StageWork
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node


def work(stage: int, rows: int) -> StageWork:
    return StageWork(stage, Rotary(torch.zeros(rows, 2), torch.zeros(rows, 2)))


async def test_jobs_merge_ready_micro_batches_up_to_the_row_cap():
    merger = StageMerger(SimpleNamespace(config=SimpleNamespace(num_layers=4)), max_rows=250)
    jobs: list[tuple[int, list[int]]] = []
    merger._compute = lambda stage, works: jobs.append((stage, [w.rows for w in works])) or [None] * len(works)
    merger.start()
    try:
        # Queued before the loop runs: one stage-1 job, then stage 3 capped at 250 rows (a
        # micro-batch larger than the cap still runs, alone).
        await asyncio.gather(*(merger.run(w) for w in
                               [work(1, 10), work(3, 100), work(3, 100), work(3, 100), work(3, 300), work(3, 20)]))
    finally:
        await merger.close()
    assert jobs == [(3, [100, 100]), (3, [100]), (3, [300]), (3, [20]), (1, [10])]


async def test_a_burst_of_requests_starts_in_one_step(checkpoint, tmp_path, monkeypatch):
    """Requests arriving in several SUBMIT frames all make the idle micro-batch's first step."""
    # A burst on a slow machine is still one burst; the micro-batch starts as soon as it is full.
    monkeypatch.setattr(tier1, "GATHER_QUIET_S", 0.3)
    monkeypatch.setattr(tier1, "GATHER_MAX_S", 5.0)
    model, tokenizer = checkpoint
    count, max_tokens = 200, 2  # over three client frames
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": f"item {i}", "max_tokens": max_tokens,
                                            "ignore_eos": True}) + "\n" for i in range(count)))
    tier2 = Tier2Node(kv_tokens=count * 16)
    port2 = await tier2.start("127.0.0.1", 0)
    node = Tier1Node(model, tokenizer, [f"127.0.0.1:{port2}"], micro_batches=1, max_seqs=count,
                     max_batch_tokens=4096)
    try:
        port = await node.start("127.0.0.1", 0)
        summary = await submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl", progress=False)
        jobs = node.merger.stats.jobs
    finally:
        await node.close()
        await tier2.close()
    assert summary.done == count
    # Each step is a job per layer plus the final one; a late part of the burst would need a third step.
    assert jobs == max_tokens * (model.config.num_layers + 1)
