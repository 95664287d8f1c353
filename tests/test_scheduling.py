"""Tier 1's scheduling: how micro-batches are merged into compute jobs and when they start."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from glinthawk.client import submit
from glinthawk.compute.rope import Rotary
from glinthawk.node import microbatch, tier1
from glinthawk.node.microbatch import MicroBatch
from glinthawk.node.merger import StageMerger, StageWork
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node


def work(stage: int, rows: int) -> StageWork:
    return StageWork(stage, Rotary(torch.zeros(rows, 2), torch.zeros(rows, 2)))


def merger_for_tests(own_thread: bool) -> StageMerger:
    return StageMerger(SimpleNamespace(config=SimpleNamespace(num_layers=4)), max_rows=250, own_thread=own_thread)


@pytest.mark.parametrize("own_thread", [False, True])
async def test_jobs_merge_ready_micro_batches_up_to_the_row_cap(own_thread):
    merger = merger_for_tests(own_thread)
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


@pytest.mark.parametrize("own_thread", [False, True])
async def test_a_failed_job_fails_its_micro_batches_and_the_next_job_runs(own_thread):
    merger = merger_for_tests(own_thread)

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


@pytest.mark.parametrize("own_thread", [False, True])
async def test_every_job_and_the_warm_up_run_on_one_thread(own_thread):
    """One thread touches torch: a second one would bring a second OpenMP team (see merger.py)."""
    merger = merger_for_tests(own_thread)
    threads: list[int] = []

    def compute(stage: int, works: list[StageWork]) -> list:
        threads.append(threading.get_ident())
        return [stage] * len(works)

    merger._compute = compute
    merger.start()
    try:
        await merger.call(lambda: threads.append(threading.get_ident()))
        assert await merger.run(work(1, 10), alone=True) == 1
        assert await asyncio.gather(merger.run(work(2, 10)), merger.run(work(2, 10)), merger.run(work(3, 10))) == [2, 2, 3]
    finally:
        await merger.close()
    assert len(threads) == 4 and len(set(threads)) == 1
    assert (threads[0] == threading.get_ident()) is not own_thread
    assert merger.stats.jobs == 3 and merger.stats.micro_batches == 4


async def test_a_micro_batch_alone_on_the_loop_computes_at_once():
    """Alone, with nothing queued, the work runs in the awaiting micro-batch's own turn: no
    loop pass between the result of one layer and the compute of the next."""
    merger = merger_for_tests(own_thread=False)
    order: list[str] = []
    merger._compute = lambda stage, works: order.append(f"job {stage}") or [stage] * len(works)
    merger.start()
    try:
        asyncio.get_running_loop().call_soon(order.append, "next loop pass")
        assert await merger.run(work(1, 10), alone=True) == 1
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(merger.run(work(2, 10)))  # not alone: waits for the pass's others
        asyncio.get_running_loop().call_soon(order.append, "same pass")
        assert await queued == 2
    finally:
        await merger.close()
    assert order == ["job 1", "next loop pass", "same pass", "job 2"]


async def test_tier1_touches_torch_from_one_thread(checkpoint, tmp_path, monkeypatch):
    """The warm-up and every stage of a real Tier 1 (two micro-batches in flight) run on one thread."""
    model, tokenizer = checkpoint
    threads: set[int] = set()
    real_warm_up, real_compute = tier1.warm_up, StageMerger._compute
    monkeypatch.setattr(tier1, "warm_up", lambda *a: threads.add(threading.get_ident()) or real_warm_up(*a))
    monkeypatch.setattr(StageMerger, "_compute",
                        lambda self, *a: threads.add(threading.get_ident()) or real_compute(self, *a))
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": f"item {i}", "max_tokens": 3,
                                            "ignore_eos": True}) + "\n" for i in range(6)))
    tier2 = Tier2Node(kv_tokens=512)
    port2 = await tier2.start("127.0.0.1", 0)
    node = Tier1Node(model, tokenizer, [f"127.0.0.1:{port2}"], micro_batches=2, max_seqs=3)
    try:
        port = await node.start("127.0.0.1", 0)
        summary = await submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl", progress=False)
    finally:
        await node.close()
        await tier2.close()
    assert summary.done == 6
    assert threads == {threading.get_ident()}  # on the CPU: the event loop's thread


async def test_a_burst_of_requests_starts_in_one_step(checkpoint, tmp_path, monkeypatch):
    """Requests arriving in several SUBMIT frames all make the idle micro-batch's first step."""
    # A burst on a slow machine is still one burst; the micro-batch starts as soon as it is full.
    monkeypatch.setattr(microbatch, "GATHER_QUIET_S", 0.3)
    monkeypatch.setattr(microbatch, "GATHER_MAX_S", 5.0)
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


@dataclass(eq=False)
class FakeLink:
    """A Tier 2 link as placement sees it: its KV account and whether it takes sequences."""

    alive: bool
    capacity_tokens: int
    free_tokens: int
    sequences: int = 0
    draining: bool = False

    @property
    def placeable(self) -> bool:
        return self.alive and not self.draining


async def test_a_request_no_alive_node_can_hold_does_not_stall_the_queue(checkpoint, tmp_path, caplog):
    """Nodes of 256 and 64 KV tokens, the large one gone: a request of 100 tokens first in the queue
    is passed over (with one warning) and those behind it run; one that only waits for room still
    holds the queue; once the large node is back, the large request is placed first."""
    from glinthawk.scheduling import Intake
    from glinthawk.requests import parse_line

    model, tokenizer = checkpoint
    node = Tier1Node(model, tokenizer, [], spool_dir=tmp_path)
    node.micro_batch_list = [MicroBatch(node, model, tokenizer, node.settings.max_seqs,
                                        node.settings.max_batch_tokens)]
    large = FakeLink(alive=False, capacity_tokens=256, free_tokens=256)
    small = FakeLink(alive=True, capacity_tokens=64, free_tokens=64)
    node.pool.links = {"large": large, "small": small}
    intake = Intake(tokenizer, model.config.max_position_embeddings, model.config.vocab_size, None)
    queue = {}
    for number, (custom_id, max_tokens) in enumerate([("large", 91), ("s1", 5), ("s2", 5), ("s3", 5), ("room", 39),
                                                      ("s4", 5)], 1):
        line = json.dumps({"custom_id": custom_id, "prompt": [5] * (10 if max_tokens > 5 else 4),
                           "max_tokens": max_tokens})
        queue[custom_id] = seq = intake.admit(parse_line(number, line.encode()))
        node.batch_of[seq.id] = SimpleNamespace(id="b")
        node.waiting.append("b", seq)
    assert [queue[k].reserve_tokens for k in ("large", "s1", "room")] == [100, 8, 48]

    def waiting() -> list[str]:
        return [seq.request.custom_id for seq in node.waiting]

    node.place_waiting()
    node.place_waiting()
    # "room" fits the small node but not its 40 free tokens: s4 behind it waits too.
    assert waiting() == ["large", "room", "s4"] and small.free_tokens == 40
    warnings = [r.getMessage() for r in caplog.records if "largest alive Tier 2 node" in r.getMessage()]
    assert warnings == ["line 1 of batch b needs 100 KV tokens but the largest alive Tier 2 node holds 64; it waits "
                        "until a node large enough (re)joins, and requests behind it go first"]
    large.alive = True
    node.place_waiting()
    assert waiting() == [] and large.free_tokens == 256 - 100 - 48 - 8
    assert node.micro_batch_list[0].incoming[3:] == [queue["large"], queue["room"], queue["s4"]]
