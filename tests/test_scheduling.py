"""Tier 1's scheduling: how micro-batches are merged into compute jobs and when they start."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import torch

from glinthawk.client import submit
from glinthawk.compute.rope import Rotary
from glinthawk.node import merger as merger_module
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


async def test_a_failed_job_fails_its_micro_batches_and_the_next_job_runs():
    merger = StageMerger(SimpleNamespace(config=SimpleNamespace(num_layers=4)), max_rows=250)

    def compute(stage: int, works: list[StageWork]) -> list:
        if stage == 2:
            raise RuntimeError("simulated fault")
        return [stage] * len(works)

    merger._compute = compute
    merger.start()
    try:
        results = await asyncio.gather(merger.run(work(2, 10)), merger.run(work(2, 10)), merger.run(work(1, 10)),
                                       return_exceptions=True)
    finally:
        await merger.close()
    assert [str(r) for r in results[:2]] == ["simulated fault"] * 2 and results[2] == 1
    assert merger.stats.jobs == 1


async def test_a_micro_batch_alone_computes_on_the_event_loop_unless_the_compute_thread_is_busy(monkeypatch):
    """Alone in flight, a micro-batch has nothing to overlap its compute with: it skips the
    hops to the compute thread, once that stage is known to be quick. Behind a running job,
    or where the stage is slow or not yet timed, it goes to the compute thread."""
    merger = StageMerger(SimpleNamespace(config=SimpleNamespace(num_layers=4)), max_rows=250)
    threads: list[tuple[int, int]] = []
    gate = threading.Event()

    def compute(stage: int, works: list[StageWork]) -> list:
        if stage == 3:
            gate.wait(10)
        threads.append((stage, threading.get_ident()))
        return [stage] * len(works)

    merger._compute = compute
    merger.start()
    loop_thread = threading.get_ident()
    try:
        assert await merger.run(work(1, 10), alone=True) == 1  # not yet timed: the thread
        assert await merger.run(work(1, 10), alone=True) == 1  # quick: here
        assert await merger.run(work(2, 10)) == 2  # not alone: the thread
        held = asyncio.ensure_future(merger.run(work(3, 10)))
        for _ in range(1000):
            if merger._busy:
                break
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(merger.run(work(1, 10), alone=True))
        await asyncio.sleep(0)  # it is queued, not computed, while the stage-3 job holds the thread
        gate.set()
        assert await held == 3 and await queued == 1
        monkeypatch.setattr(merger_module, "INLINE_MAX_S", 0.0)  # every stage is now too slow to run here
        assert await merger.run(work(1, 10), alone=True) == 1
    finally:
        gate.set()
        await merger.close()
    on_loop = [(stage, thread == loop_thread) for stage, thread in threads]
    assert on_loop == [(1, False), (1, True), (2, False), (3, False), (1, False), (1, False)]
    assert merger.stats.jobs == 6


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
