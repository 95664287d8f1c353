"""The automatic micro-batch count: the chain of a step over its busiest stage's compute."""

from __future__ import annotations

from glinthawk.net.netem import NetEm
from glinthawk.node.pacing import MEASURED_FOR, MOST_IN_FLIGHT, SETTLED_STEPS, Measured, Pacer, best_count, regroup_moves

from glinthawk.client import submit
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results, single_process, write_requests


FULL = {"available": 10_000, "max_rows": 64}  # more sequences waiting than the micro-batches hold
BATCH_128 = {"available": 128, "max_rows": 256}  # every sequence already in flight


def steps(pacer: Pacer, stages: list, rows: int, count: int = SETTLED_STEPS, **supply) -> Pacer:
    for _ in range(count):
        pacer.record(stages, rows, **supply)
    return pacer


def test_one_stage_follows_the_design_formula_when_micro_batches_are_full():
    pacer = Pacer(None)
    steps(pacer, [[1.0, 3.0]], 64, count=SETTLED_STEPS - 1, **FULL)
    assert pacer.count == 2  # the start count until enough steps are measured
    steps(pacer, [[1.0, 3.0]], 64, count=1, **FULL)  # 1 + round trip / compute
    assert pacer.count == 4
    steps(pacer, [[2.0, 1.0]], 64, count=2 * 4 + SETTLED_STEPS - 1, **FULL)  # measured afresh at the new count,
    assert pacer.count == 4  # and its rate too (after two rounds at it) before it is left
    steps(pacer, [[2.0, 1.0]], 64, count=1, **FULL)
    assert pacer.count == 2


def test_a_fixed_batch_is_not_cut_for_waits_a_split_cannot_pay_for():
    """With every sequence in flight, another micro-batch cuts the others smaller: at 10% waits
    (a loopback round trip) one stays, where "1 + wait / compute" rounded up said two."""
    pacer = steps(Pacer(None), [[1.0, 0.1]], 128, **BATCH_128)
    assert pacer.count == 1
    # waits as long as the compute: several, though fewer than a full queue would take
    pacer = steps(Pacer(None), [[1.0, 1.0]], 128, **BATCH_128)
    fixed_size = steps(Pacer(None), [[1.0, 1.0]], 64, **FULL)
    assert 2 <= pacer.count < MOST_IN_FLIGHT and fixed_size.count == 2


def test_the_count_within_the_tolerance_of_the_best_and_without_it():
    # one stage: 1 s compute and 1 s waits a row-batch of 64, queue full: rate(m) = 64m / max(m, 2)
    assert best_count(1 / 64, 1 / 64, 1.0, 10_000, 64, 1, MOST_IN_FLIGHT) == 2
    assert best_count(1 / 64, 1 / 64, 1.0, 10_000, 64, 1, MOST_IN_FLIGHT, current=1) == 2  # up: to the fewest
    # two stages, a chain of 4.5 s over a busiest stage of 2 s: 3 hides it all, 2 is within 15%
    args = (2 / 64, 3 / 64, 1.5, 10_000, 64, 2, MOST_IN_FLIGHT)
    assert (best_count(*args, tolerance=0.0), best_count(*args)) == (3, 2)
    # from more, down only to what is within half the tolerance (2 is at 0.89 of the best): no
    # regrouping back and forth on estimates near the boundary
    assert (best_count(*args, current=3), best_count(*args, current=6)) == (3, 3)
    # all waiting: each one more adds as much, up to the ceiling (14 of 16 is within 15%), as long
    # as there are sequences for them
    all_waiting = (0.001 / 64, 0.001 / 64, 10.0, 10_000, 64, 1, MOST_IN_FLIGHT)
    assert (best_count(*all_waiting, tolerance=0.0), best_count(*all_waiting)) == (MOST_IN_FLIGHT, 14)
    assert best_count(0.001 / 64, 0.001 / 64, 10.0, 5, 64, 1, MOST_IN_FLIGHT, tolerance=0.0) == 5


def test_stages_are_never_below_one_each():
    pacer = Pacer(None)
    pacer.at_least(3)
    steps(pacer, [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], 64, **FULL)
    assert pacer.count == 3


def test_stages_on_shared_cores_plan_for_the_stages_that_compute_at_once():
    """Three stages of equal compute on cores that run two of them at once: three in flight would
    queue the third on a busy core, so two are enough, and the floor is two, not one a stage."""
    three_stages = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    shared = Pacer(None, concurrent=2)
    shared.at_least(3)
    assert shared.least == 2 and shared.count == 3  # the start guess: one more than the floor
    steps(shared, three_stages, 64, **FULL)
    assert shared.count == 2 and "shared cores" in shared.basis
    # the same stages, each on a device of its own: one a stage
    own = Pacer(None, concurrent=3)
    own.at_least(3)
    steps(own, three_stages, 64, **FULL)
    assert own.count == 3
    # a single stage is unaffected: its chain is its own compute
    single = steps(Pacer(None, concurrent=2), [[1.0, 3.0]], 64, **FULL)
    assert single.count == steps(Pacer(None), [[1.0, 3.0]], 64, **FULL).count == 4


def test_the_count_has_a_ceiling_and_a_given_count_is_kept():
    pacer = Pacer(None)
    steps(pacer, [[0.001, 1000.0]], 64, **FULL)
    assert pacer.most == MOST_IN_FLIGHT and 14 <= pacer.count <= MOST_IN_FLIGHT
    fixed = Pacer(3)
    fixed.at_least(2)
    steps(fixed, [[0.001, 10.0]], 64, **FULL)
    assert (fixed.count, fixed.most) == (3, 3)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed_steps(seconds: dict[int, float], count: int, stages: list | None = None, pacer: Pacer | None = None,
                **supply) -> tuple[Pacer, list[int]]:
    """``count`` decode steps of 64 rows, each taking ``seconds[count in flight]`` of the
    pacer's clock; returns the pacer and its count after each step."""
    clock = _Clock() if pacer is None else pacer.clock
    pacer = pacer or Pacer(None, clock=clock)
    counts = []
    for _ in range(count):
        clock.now += seconds[pacer.count]
        pacer.record(stages or [[1.0, 0.8]], 64, **(supply or FULL), rows=64)
        counts.append(pacer.count)
    return pacer, counts


def test_one_fewer_is_tried_and_kept_where_it_measures_as_fast():
    """Waits of 0.8 of the compute predict two in flight; where the wait is Tier 2 computing on
    Tier 1's own cores, two measure no faster than one, and one is kept."""
    pacer, counts = timed_steps({1: 0.5, 2: 0.5}, 60)
    assert counts[:9] == [2] * 9 and counts[-40:] == [1] * 40
    assert best_count(1 / 64, 1 / 64, 0.8, 10_000, 64, 1, MOST_IN_FLIGHT, current=1) == 2  # what it overrode
    assert "measured" in pacer.basis
    # the run changes under the measurements: what was measured at two no longer holds
    _, later = timed_steps({1: 0.5, 2: 0.5}, 1, pacer=pacer, available=5_000, max_rows=64)
    assert later == [2]


def test_waits_longer_than_the_compute_are_not_second_guessed():
    """Waits three times the compute cannot be this machine's own work: no count is tried
    against the prediction, even where the counts would measure alike."""
    _, counts = timed_steps({count: 0.5 for count in range(1, MOST_IN_FLIGHT + 1)}, 100, stages=[[1.0, 3.0]])
    assert counts[SETTLED_STEPS:] == [4] * (100 - SETTLED_STEPS)


def test_the_predicted_count_is_kept_where_it_measures_faster():
    pacer, counts = timed_steps({1: 1.0, 2: 0.5}, MEASURED_FOR)
    assert 1 in counts  # tried once ...
    tried = counts.index(1)
    assert counts[tried + SETTLED_STEPS + 2:] == [2] * (len(counts) - tried - SETTLED_STEPS - 2)  # ... and left
    assert pacer.measured[2].rate == 2 * pacer.measured[1].rate


def test_counts_measured_within_noise_of_each_other_do_not_go_round_in_a_circle(monkeypatch):
    """A prediction that goes 4 -> 3 -> 2 -> 4 (waits measured lower with more in flight), over
    counts that measure 107, 104 and 100 tokens/s: each step down is within noise, the step up
    is not. The count settles instead of regrouping the sequences for ever."""
    from glinthawk.node import pacing

    monkeypatch.setattr(pacing, "best_count", lambda *args, current=None, **kwargs: {4: 3, 3: 2, 2: 4}[current or 2])
    rates = {2: 100.0, 3: 104.0, 4: 107.0}
    _, counts = timed_steps({count: 64 / rate for count, rate in rates.items()}, 200)
    changes = sum(a != b for a, b in zip(counts, counts[1:]))
    assert changes <= 4 and len(set(counts[-100:])) == 1


def test_measurements_are_compared_only_while_the_run_is_alike():
    measured = Measured(rate=100.0, available=128, mix=1.0, at=10)
    assert measured.comparable(Measured(50.0, 120, 1.05, 200))
    assert not measured.comparable(Measured(50.0, 128, 16.0, 20))  # prompt chunks against decodes
    assert not measured.comparable(Measured(50.0, 64, 1.0, 20))  # half the sequences have finished
    assert not measured.comparable(Measured(50.0, 128, 1.0, 10 + MEASURED_FOR + 1))


def test_regrouping_moves_sequences_to_the_micro_batches_the_count_keeps():
    assert regroup_moves([128, 0, 0, 0], 4, 0) == [(1, 32), (2, 32), (3, 32)]
    assert regroup_moves([64, 64, 0, 0], 1, 1) == [(0, 64)]  # beyond the count: gives everything
    assert regroup_moves([64, 64, 0, 0], 1, 0) == []  # the one kept takes, it does not give
    assert regroup_moves([36, 30, 30, 30], 4, 0) == []  # within an eighth of its share: stays put
    assert regroup_moves([60, 30, 22, 16], 4, 0) == [(1, 2), (2, 10), (3, 16)]  # each up to the share, 32


async def run_two_tier(checkpoint, tmp_path, prepare, netem=None, **settings):
    """The default requests through Tier 1 and two Tier 2 nodes in process (``prepare(tier1)``
    before it starts); returns Tier 1 after the run, with the outputs checked against the
    single process's."""
    model, tokenizer = checkpoint
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    tier2 = [Tier2Node(kv_tokens=4096, netem=netem) for _ in range(2)]
    ports = [await node.start("127.0.0.1", 0) for node in tier2]
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{p}" for p in ports], netem=netem, **settings)
    prepare(tier1)
    try:
        port = await tier1.start("127.0.0.1", 0)
        summary = await submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl", progress=False)
    finally:
        await tier1.close()
        for node in tier2:
            await node.close()
    assert summary.failed == 0
    assert {k: v["token_ids"] for k, v in read_results(tmp_path / "out.jsonl").items()} == {
        k: v["token_ids"] for k, v in single_process(checkpoint, requests).items()}
    return tier1


async def test_with_injected_delay_tier1_keeps_several_micro_batches_in_flight(checkpoint, tmp_path):
    """Round trips of 2 x 10 ms against well under a millisecond of compute a layer: one
    micro-batch would leave Tier 1 idle nearly all the time."""
    counts = []  # the count after each step (it falls to one as the last sequences finish)

    def watch(tier1) -> None:
        record = tier1.pacer.record
        tier1.pacer.record = lambda *args: (record(*args), counts.append(tier1.pacer.count))

    tier1 = await run_two_tier(checkpoint, tmp_path, watch, netem=NetEm(10.0, 0.0, None), max_seqs=2)
    assert max(counts) > 2
    assert sum(mb.fanout._round_trip_s is not None for mb in tier1.micro_batch_list) > 2  # they did step


class _Switching(Pacer):
    """One micro-batch until the first step is measured, then three."""

    def record(self, *args) -> None:
        self.count = 3


async def test_running_sequences_are_regrouped_when_the_count_changes(checkpoint, tmp_path):
    """Every sequence is placed in the first micro-batch before any step; when the count grows,
    they are handed over between steps (their KV stays on its node), and the tokens are the
    single process's."""
    def switching(tier1) -> None:
        tier1.pacer = _Switching(None)
        tier1.pacer.count = 1

    tier1 = await run_two_tier(checkpoint, tmp_path, switching, max_seqs=256)
    assert [mb.fanout._round_trip_s is not None for mb in tier1.micro_batch_list[:4]] == [True, True, True, False]


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
