"""Tier 1 in pipeline stages, each with its own Tier 2 nodes: the same tokens as one process."""

from __future__ import annotations

import asyncio
import json

import pytest

from glinthawk.client import SubmitError, submit
from glinthawk.compute.loader import load_model
from glinthawk.node.stage import StageNode
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node
from glinthawk.tokenizer import Tokenizer

from cluster_util import read_results, single_process, write_requests
from pipeline_util import pipeline

GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 11}


def reference(directory, requests):
    model = load_model(directory, dtype="float32", device="cpu")
    return single_process((model, Tokenizer(directory)), requests)


@pytest.mark.parametrize("variant,cuts,nodes", [
    ("llama_gqa", [2], 1), ("llama_gqa", [1, 3], 2), ("qwen2_bias", [2], 2), ("mistral", [1, 2], 1), ("qwen3", [3], 1),
])
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_stages_give_the_single_process_tokens(four_layers, tmp_path, variant, cuts, nodes, sampling):
    directory = four_layers(variant)
    requests = write_requests(tmp_path / "in.jsonl", sampling)
    async with pipeline(directory, cuts, nodes_per_stage=nodes, micro_batches=3, max_batch_tokens=16) as p:
        summary = await submit(requests, "127.0.0.1", p.port, tmp_path / "out.jsonl", progress=False)
    assert summary.failed == 0
    got = read_results(tmp_path / "out.jsonl")
    want = reference(directory, requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}


def fault_requests(path):
    """Greedy and seeded requests long enough for a failure to land mid-run."""
    with open(path, "w") as f:
        for i in range(16):
            sampling = GREEDY if i % 2 else {**SEEDED, "seed": i}
            f.write(json.dumps({"custom_id": f"r{i}", "prompt": f"Request {i}: the quick brown fox",
                                "max_tokens": 24 + i % 5, "ignore_eos": True, **sampling}) + "\n")
    return path


async def wait_for_lines(path, count: int) -> None:
    while not path.exists() or path.read_text().count("\n") < count:
        await asyncio.sleep(0.01)


async def released(nodes) -> None:
    while any(node.store is not None and node.store.num_sequences for node in nodes):
        await asyncio.sleep(0.01)


async def test_a_lost_tier2_node_of_a_later_stage_changes_no_token(four_layers, tmp_path, caplog):
    """One of stage 2:4's two Tier 2 nodes goes away mid-run: its sequences are given back on
    every other stage's nodes and rebuilt, and every result is what one process gives."""
    directory = four_layers()
    requests = fault_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    async with pipeline(directory, [2], nodes_per_stage=2, micro_batches=2, max_seqs=2, max_batch_tokens=16,
                        heartbeat_s=0.2, reconnect_seconds=3600) as p:
        run = asyncio.ensure_future(submit(requests, "127.0.0.1", p.port, out, progress=False))
        await asyncio.wait_for(wait_for_lines(out, 2), 60)
        await p.tier2[1][0].close()
        summary = await asyncio.wait_for(run, 120)
        alive = [*p.tier2[0], p.tier2[1][1]]
        await asyncio.wait_for(released(alive), 10)  # no KV room is left held, on any stage
    assert summary.done == 16 and summary.failed == 0
    assert "stage 2:4: lost Tier 2 node" in caplog.text and "go back to the queue" in caplog.text
    got = read_results(out)
    want = reference(directory, requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}


async def test_a_lost_stage_stops_the_run_naming_it_and_resume_finishes_it(four_layers, tmp_path):
    """Stage 2:4 goes away mid-run: the client stops with an error naming it, its output holds
    whole lines only; once a new stage 2:4 listens where the old one did, --resume finishes the
    file, each request once, with the single process's tokens."""
    directory = four_layers()
    requests = fault_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    async with pipeline(directory, [2], micro_batches=2, max_seqs=2, max_batch_tokens=16, heartbeat_s=0.2,
                        reconnect_seconds=0.05) as p:
        run = asyncio.ensure_future(submit(requests, "127.0.0.1", p.port, out, progress=False))
        await asyncio.wait_for(wait_for_lines(out, 2), 60)
        stage = p.stages[0]
        stage_port = stage._server.sockets[0].getsockname()[1]
        await stage.close()
        with pytest.raises(SubmitError, match=r"stage 2:4 at 127\.0\.0\.1:\d+ is unreachable.*restart it, then rerun "
                                              r"with --resume"):
            await asyncio.wait_for(run, 60)
        partial = read_results(out)  # whole lines, each id once
        assert 2 <= len(partial) < 16
        with pytest.raises(SubmitError, match="stage 2:4"):  # refused while the stage is down
            await submit(requests, "127.0.0.1", p.port, out, progress=False, resume=True)
        again = StageNode(stage.model, [f"127.0.0.1:{port}" for port in p.tier2_ports[1]], settings=stage.settings)
        p.stages[0] = again
        await again.start("127.0.0.1", stage_port)
        await asyncio.wait_for(chain_whole(p.tier1), 30)
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", p.port, out, progress=False, resume=True), 120)
    assert summary.failed == 0 and summary.done == 16 - len(partial)
    got = read_results(out)
    want = reference(directory, requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}


async def chain_whole(tier1) -> None:
    while tier1.chain_down is not None:
        await asyncio.sleep(0.01)


async def start_refused(directory, first: range, second: range, *, second_dtype: str = "float32",
                        next_address: str | None = None) -> str:
    """The message a first stage of ``first`` gets at start-up from a next stage of ``second``."""
    tier2 = [Tier2Node(kv_tokens=256), Tier2Node(kv_tokens=256)]
    ports = [await node.start("127.0.0.1", 0) for node in tier2]
    stage = StageNode(load_model(directory, dtype=second_dtype, device="cpu", layers=second), [f"127.0.0.1:{ports[1]}"])
    stage_port = await stage.start("127.0.0.1", 0)
    tier1 = Tier1Node(load_model(directory, dtype="float32", device="cpu", layers=first), Tokenizer(directory),
                      [f"127.0.0.1:{ports[0]}"], next_stage=next_address or f"127.0.0.1:{stage_port}")
    try:
        with pytest.raises(ConnectionError) as refused:
            await tier1.start("127.0.0.1", 0)
        return str(refused.value)
    finally:
        await tier1.close()
        await stage.close()
        for node in tier2:
            await node.close()


@pytest.mark.parametrize("first,second,dtype,message", [
    (range(0, 2), range(3, 4), "float32", "this is stage 3:4, but the stage before ends at layer 2; the stages' "
                                          "layers must follow each other without gap or overlap"),
    (range(0, 3), range(2, 4), "float32", "this is stage 2:4, but the stage before ends at layer 3"),
    (range(0, 2), range(2, 4), "bfloat16", "stage 2:4 runs another model or dtype than the stage before; give every "
                                           "stage the same --model and --dtype"),
])
async def test_a_bad_stage_layout_is_refused_at_start_up(four_layers, first, second, dtype, message):
    refused = await start_refused(four_layers(), first, second, second_dtype=dtype)
    assert message in refused and "the next stage at 127.0.0.1:" in refused


async def test_a_next_stage_that_does_not_answer_is_refused_at_start_up(four_layers):
    refused = await start_refused(four_layers(), range(0, 2), range(2, 4), next_address="127.0.0.1:1")
    assert refused.startswith("the next stage at 127.0.0.1:1 cannot be used:")
    assert "start the stages from the last one, each with --next naming the one after it" in refused


def test_a_stage_whose_weights_do_not_fit_its_device_is_refused(four_layers, monkeypatch):
    from glinthawk.compute import loader

    directory = four_layers()
    config = load_model(directory, dtype="float32", device="cpu").config
    half = loader.weight_bytes(config, range(0, 2), 4)
    monkeypatch.setattr(loader, "free_memory", lambda device: half + 1)
    load_model(directory, dtype="float32", device="cpu", layers=range(0, 2))  # fits
    with pytest.raises(loader.CheckpointError, match=r"layers 0:4 need 0\.00 GiB for their weights in float32 but cpu "
                                                     r"has 0\.00 GiB free; cut the model into more pipeline stages"):
        load_model(directory, dtype="float32", device="cpu")


async def test_status_shows_every_stage_and_its_nodes(four_layers):
    from click.testing import CliRunner

    from glinthawk.cli import main as cli_main

    async with pipeline(four_layers(), [1, 3], nodes_per_stage=2) as p:
        await p.tier2[2][1].close()  # one node of stage 3:4 is gone
        await asyncio.wait_for(stage_node_lost(p.tier1, 3), 10)
        shown = await asyncio.to_thread(CliRunner().invoke, cli_main, ["status", f"127.0.0.1:{p.port}"])
        status = p.tier1.status()
    assert shown.exit_code == 0, shown.output
    assert [s["layers"] for s in status["stages"]] == [[1, 3], [3, 4]] and status["layers"] == [0, 1]
    lines = shown.output.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("stage ")]
    assert [lines[i] for i in headers] == ["stage 0:1 (this node: clients, scheduling)", "stage 1:3", "stage 3:4"]
    last = lines[headers[2]:]
    assert sum(" up " in line for line in last) == 1 and sum(" DOWN " in line for line in last) == 1


async def stage_node_lost(tier1, stage: int) -> None:
    while all(node.alive for node in tier1.later.nodes[stage]):
        await asyncio.sleep(0.01)


async def test_status_lists_a_tier2_node_never_reached(checkpoint):
    model, tokenizer = checkpoint
    tier2 = Tier2Node(kv_tokens=64)
    port = await tier2.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{port}", "127.0.0.1:1"], reconnect_seconds=3600)
    try:
        await tier1.start("127.0.0.1", 0)
        nodes = tier1.status()["tier2"]
    finally:
        await tier1.close()
        await tier2.close()
    assert [(n["address"], n["alive"], n["kv_tokens"]) for n in nodes] == [(f"127.0.0.1:{port}", True, 64),
                                                                         ("127.0.0.1:1", False, 0)]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_stages_under_injected_delay_give_the_single_process_tokens(four_layers, tmp_path, sampling):
    """Every frame between stages and to Tier 2 held 5 ms, jittered: answers arrive in other orders,
    and the tokens are still the single process's."""
    from glinthawk.net.netem import NetEm

    directory = four_layers()
    requests = write_requests(tmp_path / "in.jsonl", sampling)
    async with pipeline(directory, [1, 3], nodes_per_stage=2, netem=NetEm(5.0, 2.0, None),
                        max_batch_tokens=16) as p:
        summary = await submit(requests, "127.0.0.1", p.port, tmp_path / "out.jsonl", progress=False)
    assert summary.failed == 0
    got = read_results(tmp_path / "out.jsonl")
    want = reference(directory, requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}
