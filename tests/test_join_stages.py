"""Tier 2 nodes that join a later pipeline stage (--join naming that stage) and are drained
through it: the first stage starts (or stops) placing on them from the stage's NODES frame,
and the output is that of one process."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from glinthawk.client import submit
from glinthawk.drain import drain_node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results
from pipeline_util import pipeline
from test_join import until, until_refused
from test_pipeline import fault_requests, reference, wait_for_lines

TIGHT = {"micro_batches": 2, "max_seqs": 2, "max_batch_tokens": 16, "heartbeat_s": 0.2, "reconnect_seconds": 3600}


def port_of(server_node) -> int:
    return server_node._server.sockets[0].getsockname()[1]


def later_account(tier1, address: str):
    """The first stage's account of the later-stage node at ``address`` (None until it heard of it)."""
    return next((a for accounts in tier1.later.nodes.values() for a in accounts if a.address == address), None)


async def placements_while_leaving(account) -> bool:
    """Whether the first stage places a sequence on ``account``'s node once it knows it is leaving
    (a sequence lives many steps, so one placed there is seen by polling)."""
    while not account.draining:
        await asyncio.sleep(0.001)
    fewest = account.sequences
    while account.alive:
        if account.sequences > fewest:
            return True
        fewest = min(fewest, account.sequences)
        await asyncio.sleep(0.001)
    return False


@pytest.mark.parametrize("timeout_s", [60.0, 0.0], ids=["sequences-finish", "sequences-move"])
async def test_a_node_joins_stage_two_mid_run_and_another_of_it_is_drained(four_layers, tmp_path, caplog, timeout_s):
    """Stage 2:4 starts with nodes A and B; C joins it mid-run and the first stage places on C
    (its KV fills); A is drained through stage 2:4: the first stage places nothing more there, its
    sequences finish (or, with no time given, move), it is told LEFT; every request is answered
    once, with the tokens of one process."""
    caplog.set_level(logging.INFO)
    directory = four_layers()
    requests = fault_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    async with pipeline(directory, [2], nodes_per_stage=2, **TIGHT) as p:
        stage_port = port_of(p.stages[0])
        run = asyncio.ensure_future(submit(requests, "127.0.0.1", p.port, out, progress=False))
        await asyncio.wait_for(wait_for_lines(out, 2), 60)
        joiner = Tier2Node(kv_tokens=4096, join=f"127.0.0.1:{stage_port}")
        c_address = f"127.0.0.1:{await joiner.start('127.0.0.1', 0)}"
        await until(lambda: (a := later_account(p.tier1, c_address)) is not None and a.sequences > 0,
                    "the first stage to place on the joined node")
        await until(lambda: joiner.store is not None and joiner.store.used_tokens > 0, "its KV to fill")
        leaving, a_address = p.tier2[1][0], f"127.0.0.1:{p.tier2_ports[1][0]}"
        await until(lambda: later_account(p.tier1, a_address).sequences > 0, "sequences on A")
        placed_on_leaving = asyncio.ensure_future(placements_while_leaving(later_account(p.tier1, a_address)))
        moved = await asyncio.wait_for(drain_node("127.0.0.1", stage_port, a_address, timeout_s), 90)
        assert not await placed_on_leaving
        assert leaving.finished.is_set() and leaving.failure is None  # told LEFT: its process would exit 0
        assert leaving.store is None or leaving.store.num_sequences == 0 or timeout_s == 0.0
        summary = await asyncio.wait_for(run, 180)
        later = {node["address"]: node["alive"] for node in p.tier1.status()["stages"][0]["tier2"]}
        await joiner.close()
    assert (moved > 0) == (timeout_s == 0.0)
    assert ("go back to the queue" in caplog.text) == (timeout_s == 0.0)  # nothing rebuilt when they finish there
    assert "stage 2:4: Tier 2 node " + a_address + " is leaving" in caplog.text
    assert later[c_address] and not later[a_address]
    assert summary.done == 16 and summary.failed == 0
    got, want = read_results(out), reference(directory, requests)  # read_results: no request answered twice
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}


async def test_a_stage_started_without_nodes_runs_on_nodes_that_join_it(four_layers, tmp_path):
    """As on Ray: stage 2:4 has no --tier2, its nodes --join it; requests wait for them, then run."""
    directory = four_layers()
    requests = fault_requests(tmp_path / "in.jsonl")
    async with pipeline(directory, [2], nodes_per_stage=[1, 0], **TIGHT) as p:
        assert p.tier1.status()["stages"][0]["tier2"] == []
        run = asyncio.ensure_future(submit(requests, "127.0.0.1", p.port, tmp_path / "out.jsonl", progress=False))
        await asyncio.sleep(0.3)
        assert p.tier1.stats.finished == 0  # nothing runs without a node for stage 2:4
        joiner = Tier2Node(kv_tokens=4096, join=f"127.0.0.1:{port_of(p.stages[0])}")
        await joiner.start("127.0.0.1", 0)
        try:
            summary = await asyncio.wait_for(run, 180)
        finally:
            await joiner.close()
    assert summary.done == 16 and summary.failed == 0
    got, want = read_results(tmp_path / "out.jsonl"), reference(directory, requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}


async def test_draining_a_later_stage_node_through_the_first_says_where_to(four_layers):
    async with pipeline(four_layers(), [2], **TIGHT) as p:
        node = f"127.0.0.1:{p.tier2_ports[1][0]}"
        with pytest.raises(RuntimeError, match=f"{node} is a Tier 2 node of stage 2:4: drain it through that stage"):
            await drain_node("127.0.0.1", p.port, node, 1.0)


async def test_join_to_an_address_that_is_not_a_tier1_stage_says_so():
    """A node told to --join another Tier 2 node's port ends with a message naming the mistake."""
    other = Tier2Node(kv_tokens=64)
    port = await other.start("127.0.0.1", 0)
    node = Tier2Node(kv_tokens=64, join=f"127.0.0.1:{port}")
    await until_refused(node, other)
    assert f"--join 127.0.0.1:{port} is not a Tier 1 stage" in node.failure
    assert "give --join the --listen address of Tier 1" in node.failure


async def test_a_leaving_later_stage_node_is_let_go_once_only_unread_prefixes_are_left(four_layers, tmp_path):
    """After a run, stage 2:4's nodes keep its shared prefixes (a cache). Draining one gives them
    back (the first stage evicts what a leaving node keeps) instead of waiting out the timeout."""
    from test_prefix import as_lines, requests as prefix_requests

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in as_lines(prefix_requests(8))))
    async with pipeline(four_layers(), [2], nodes_per_stage=2, micro_batches=2, max_batch_tokens=128) as p:
        summary = await submit(path, "127.0.0.1", p.port, tmp_path / "out.jsonl", progress=False)
        index = next(i for i, node in enumerate(p.tier2[1]) if node.store is not None and node.store.num_sequences)
        moved = await asyncio.wait_for(drain_node("127.0.0.1", port_of(p.stages[0]),
                                                  f"127.0.0.1:{p.tier2_ports[1][index]}", 60.0), 90)
        assert p.tier2[1][index].finished.is_set()
        assert all(prefix.route[1].placeable for prefix in p.tier1.prefixes)
    assert summary.done == 8 and moved == 0  # nothing was left running there: the prefix holders were let go
