"""Tier 2 nodes that join a running Tier 1 (--join) and leave it (SIGTERM, glinthawk drain): capacity
grows and shrinks mid-run, and the output is that of an undisturbed run."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys

import pytest

from glinthawk.client import submit
from glinthawk.drain import drain_node
from glinthawk.node import joiner as joiner_module
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results, single_process
from test_faults import FAULT_PROMPTS, mixed_requests, small_cluster, submit_command, tokens_by_id


async def until(condition, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` (a progress check, not a timing one: the timeout only ends a hung test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def until_refused(node: Tier2Node, dialed) -> None:
    """Start ``node`` (which joins ``dialed``), wait until it gives up, then close both."""
    try:
        await node.start("127.0.0.1", 0)
        await until(node.finished.is_set, "the refusal", timeout=30)
    finally:
        await dialed.close()
        await node.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tier1_for(checkpoint, addresses: list[str], **options) -> Tier1Node:
    model, tokenizer = checkpoint
    return Tier1Node(model, tokenizer, addresses, micro_batches=2, max_seqs=2, max_batch_tokens=64, **options)


@pytest.mark.parametrize("timeout_s", [60.0, 0.0], ids=["sequences-finish", "sequences-move"])
async def test_a_node_joins_mid_run_and_another_is_drained(checkpoint, tmp_path, timeout_s):
    """Start with node A; B joins mid-run and takes sequences (its KV fills); A is drained with
    glinthawk drain's request: its sequences finish there (or, with no time given, move), it is told
    LEFT, and every request is answered once, as in a single process."""
    requests = mixed_requests(tmp_path / "in.jsonl")
    expected = single_process(checkpoint, requests)
    a = Tier2Node(kv_tokens=4096)
    a_address = f"127.0.0.1:{await a.start('127.0.0.1', 0)}"
    tier1 = tier1_for(checkpoint, [a_address])
    port = await tier1.start("127.0.0.1", 0)
    b = Tier2Node(kv_tokens=4096, join=f"127.0.0.1:{port}")
    out = tmp_path / "out.jsonl"
    try:
        run = asyncio.create_task(submit(requests, "127.0.0.1", port, out, progress=False))
        await until(lambda: tier1.stats.finished >= 2, "the first results")
        b_address = f"127.0.0.1:{await b.start('127.0.0.1', 0)}"
        await until(lambda: b_address in tier1.links and tier1.links[b_address].sequences > 0, "B to take sequences")
        b_used = max(node["kv_tokens_used"] for node in tier1.status()["tier2"] if node["address"] == b_address)
        assert b_used > 0 and b.store is not None
        await until(lambda: tier1.links[a_address].sequences > 0, "A to hold sequences")
        moved = await drain_node("127.0.0.1", port, a_address, timeout_s)
        assert a.finished.is_set() and a.failure is None  # A was told LEFT: its process would exit 0
        assert [node["address"] for node in tier1.status()["tier2"]] == [b_address]
        summary = await asyncio.wait_for(run, 240)
    finally:
        await tier1.close()
        await a.close()
        await b.close()
    assert (moved > 0) == (timeout_s == 0.0)
    assert summary.done == len(FAULT_PROMPTS) and summary.failed == 0
    got = read_results(out)  # asserts no request was answered twice
    assert tokens_by_id(got) == tokens_by_id(expected)


async def test_draining_an_unknown_node_says_which_nodes_there_are(checkpoint):
    a = Tier2Node(kv_tokens=4096)
    a_address = f"127.0.0.1:{await a.start('127.0.0.1', 0)}"
    tier1 = tier1_for(checkpoint, [a_address])
    port = await tier1.start("127.0.0.1", 0)
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:1 is not a Tier 2 node in use here.*{a_address}"):
            await drain_node("127.0.0.1", port, "127.0.0.1:1", 1.0)
    finally:
        await tier1.close()
        await a.close()


async def test_a_joiner_waits_for_tier1_and_joins_again_after_it_restarts(checkpoint, tmp_path, monkeypatch):
    """Tier 1 with no --tier2 at all: a node that dialed before it was up joins once it is; after
    Tier 1 restarts, the node joins the new one, which runs a file on it."""
    monkeypatch.setattr(joiner_module, "RETRY_MAX_S", 0.2)
    port = free_port()
    node = Tier2Node(kv_tokens=4096, join=f"127.0.0.1:{port}")
    address = f"127.0.0.1:{await node.start('127.0.0.1', 0)}"
    await asyncio.sleep(0.3)  # it has dialed and failed at least once
    try:
        for life in range(2):
            tier1 = tier1_for(checkpoint, [])
            await tier1.start("127.0.0.1", port)
            try:
                await until(lambda: address in tier1.links and tier1.links[address].alive, f"a join in life {life}")
                if life == 1:
                    requests = mixed_requests(tmp_path / "in.jsonl")
                    summary = await submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl", progress=False)
                    assert summary.done == len(FAULT_PROMPTS)
                    assert tokens_by_id(read_results(tmp_path / "out.jsonl")) == tokens_by_id(
                        single_process(checkpoint, requests))
            finally:
                await tier1.close()
            await until(lambda: node.session is None, "the node to see Tier 1 go")
        assert not node.finished.is_set()
    finally:
        await node.close()


@pytest.mark.parametrize("fault", ["secret", "protocol version", "geometry"])
async def test_a_join_tier1_cannot_take_is_refused_clearly_on_both_sides(checkpoint, monkeypatch, caplog, fault):
    caplog.set_level(logging.INFO)
    secret = b"tier1 secret" if fault == "secret" else None
    tier1 = tier1_for(checkpoint, [], secret=secret)
    port = await tier1.start("127.0.0.1", 0)
    if fault == "protocol version":  # the joiner speaks an older protocol
        monkeypatch.setattr("glinthawk.net.handshake.PROTOCOL_VERSION", 4)
    node = Tier2Node(kv_memory=16 if fault == "geometry" else 1 << 20, join=f"127.0.0.1:{port}",
                     secret=b"another secret" if fault == "secret" else None)
    await until_refused(node, tier1)
    tier1_said = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("glinthawk.tier1")
                          or r.name.startswith("glinthawk.net"))
    expected = {"secret": ("secret", "authentication failed"),
                "protocol version": ("protocol version", "protocol version mismatch"),
                "geometry": ("holds no token", "asked to join but cannot be used")}[fault]
    assert expected[0] in node.failure
    assert expected[1] in tier1_said
    assert not tier1.links


def test_sigterm_on_a_joined_node_process_drains_it_and_it_exits_0(checkpoint, model_dir, tmp_path):
    """Real processes: a node started with --join takes sequences; SIGTERM mid-run makes it leave
    (Tier 1 finishes or moves its sequences first) and exit 0; the output is unchanged."""
    requests = mixed_requests(tmp_path / "in.jsonl")
    expected = single_process(checkpoint, requests)
    out = tmp_path / "out.jsonl"
    log_path = tmp_path / "joiner.log"
    with small_cluster(model_dir, tmp_path, tier2_nodes=1, micro_batches=2) as cluster:
        host, port = cluster.tier1_address
        with open(log_path, "w") as log:
            joiner = subprocess.Popen([sys.executable, "-m", "glinthawk.node", "--role", "tier2", "--join",
                                       f"{host}:{port}", "--kv-tokens", "4096", "--threads", "1"], stderr=log)
        try:
            asyncio.run(_until_status(host, port, lambda node: node["joined"] and node["alive"], "the join"))
            client = subprocess.Popen(submit_command(requests, cluster, out), stderr=subprocess.PIPE, text=True)
            asyncio.run(_until_status(host, port, lambda node: node["joined"] and node["sequences"] > 0,
                                      "sequences on the joined node"))
            joiner.send_signal(signal.SIGTERM)
            assert joiner.wait(timeout=120) == 0, log_path.read_text()
        finally:
            if joiner.poll() is None:
                joiner.kill()
        _, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr
        tier1_log = (tmp_path / "logs" / "tier1.log").read_text()
    assert "joined" in tier1_log and "left (" in tier1_log
    assert "leaving" in log_path.read_text()
    got = read_results(out)
    assert tokens_by_id(got) == tokens_by_id(expected)


async def _until_status(host: str, port: int, node_test, what: str) -> None:
    """Poll ``glinthawk status`` until one of the Tier 2 nodes passes ``node_test``."""
    from glinthawk.client import fetch_status

    for _ in range(2400):
        if any(node_test(node) for node in (await fetch_status(host, port))["tier2"]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_leaving_node_of_a_later_stage_lets_its_sequences_finish(four_layers, tmp_path, caplog):
    """A node of a later stage that leaves (SIGTERM: drain) is placed on no more: the sequences it
    holds finish there, nothing is rebuilt; it is let go, and every result is what one process gives."""
    from pipeline_util import pipeline
    from test_pipeline import fault_requests, reference
    from test_pipeline import wait_for_lines as lines_written

    caplog.set_level(logging.INFO)
    directory = four_layers()
    requests = fault_requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    async with pipeline(directory, [2], nodes_per_stage=2, micro_batches=2, max_seqs=2, max_batch_tokens=16,
                        heartbeat_s=0.2, reconnect_seconds=3600) as p:
        run = asyncio.ensure_future(submit(requests, "127.0.0.1", p.port, out, progress=False))
        await asyncio.wait_for(lines_written(out, 2), 60)
        leaving = p.tier2[1][0]
        await until(lambda: leaving.store is not None and leaving.store.used_tokens > 0, "sequences on the node")
        await asyncio.wait_for(leaving.drain(), 90)  # what SIGTERM does
        assert leaving.finished.is_set() and leaving.failure is None
        assert leaving.store is None or leaving.store.num_sequences == 0  # they finished before it was let go
        summary = await asyncio.wait_for(run, 120)
    assert summary.done == 16 and summary.failed == 0
    assert "left (0 sequences moved)" in caplog.text and "go back to the queue" not in caplog.text
    got, want = read_results(out), reference(directory, requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}
