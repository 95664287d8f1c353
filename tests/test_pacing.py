"""The automatic micro-batch count: the chain of a step over its busiest stage's compute."""

from __future__ import annotations

from glinthawk.net.netem import NetEm
from glinthawk.node.pacing import MOST_IN_FLIGHT, Pacer

from glinthawk.client import submit
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results, single_process, write_requests


def test_one_stage_follows_the_design_formula():
    pacer = Pacer(None)
    pacer.record([[1.0, 3.0]])  # 1 + round trip / compute
    assert pacer.count == 4
    for _ in range(40):  # the window forgets the old steps
        pacer.record([[2.0, 1.0]])
    assert pacer.count == 2


def test_stages_are_paced_by_the_busiest_and_never_below_one_each():
    pacer = Pacer(None)
    pacer.at_least(2)
    pacer.record([[1.0, 1.0], [2.0, 0.5]])  # a chain of 4.5 s over a busiest stage of 2 s
    assert pacer.count == 3
    pacer = Pacer(None)
    pacer.at_least(3)
    pacer.record([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert pacer.count == 3


def test_the_count_has_a_ceiling_and_a_given_count_is_kept():
    pacer = Pacer(None)
    pacer.record([[0.001, 10.0]])
    assert pacer.count == MOST_IN_FLIGHT
    fixed = Pacer(3)
    fixed.at_least(2)
    fixed.record([[0.001, 10.0]])
    assert (fixed.count, fixed.most) == (3, 3)


async def test_with_injected_delay_tier1_keeps_several_micro_batches_in_flight(checkpoint, tmp_path):
    """Round trips of 2 x 10 ms against well under a millisecond of compute a layer: one
    micro-batch would leave Tier 1 idle nearly all the time."""
    model, tokenizer = checkpoint
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    netem = NetEm(10.0, 0.0, None)
    tier2 = [Tier2Node(kv_tokens=4096, netem=netem) for _ in range(2)]
    ports = [await node.start("127.0.0.1", 0) for node in tier2]
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{p}" for p in ports], netem=netem, max_seqs=2)
    try:
        port = await tier1.start("127.0.0.1", 0)
        summary = await submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl", progress=False)
    finally:
        await tier1.close()
        for node in tier2:
            await node.close()
    assert summary.failed == 0
    assert tier1.pacer.count > 2
    assert sum(mb.fanout._round_trip_s is not None for mb in tier1.micro_batch_list) > 2  # they did step
    assert {k: v["token_ids"] for k, v in read_results(tmp_path / "out.jsonl").items()} == {
        k: v["token_ids"] for k, v in single_process(checkpoint, requests).items()}


async def test_a_wait_does_not_count_this_nodes_own_compute():
    """On the CPU the event loop computes: an answer that came during another micro-batch's job is
    read after it. Counted as waiting, that time would justify any number in flight."""
    import asyncio

    from glinthawk.node.fanout import StepClock

    computed = iter([0.0, 10.0])  # the loop computed 10 s (in effect) while the answer was out
    clock = StepClock(lambda: next(computed))
    await clock.wait(asyncio.sleep(0.02))
    assert clock.wait_s == 0.0
    idle = StepClock()
    await idle.wait(asyncio.sleep(0.02))
    assert idle.wait_s >= 0.02


async def test_the_way_down_and_back_is_what_the_next_stage_did_not_spend():
    """A later stage's step that queued there behind others is its time, not the link's."""
    import asyncio

    import torch

    from glinthawk.node.fanout import StepClock

    async def answer(elapsed: float):
        await asyncio.sleep(0.03)
        return torch.zeros(1), [[0.001, 0.002, elapsed]]

    busy = StepClock()
    await busy.hand_on(answer(10.0))  # the next stage spent all of it (and more: clocks differ)
    assert busy.wait_s == 0.0 and busy.stages[1] == [0.001, 0.002, 10.0]
    idle = StepClock()
    await idle.hand_on(answer(0.0))
    assert idle.wait_s >= 0.03
