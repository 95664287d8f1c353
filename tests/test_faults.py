"""Surviving failures: a Tier 2 node killed mid-run, a hung node, a killed client resumed."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glinthawk.client import answered, submit
from glinthawk.cluster import LocalCluster
from glinthawk.net.connection import open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.net.server import server_handshake, start_server
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results, single_process

FAULT_PROMPTS = [(f"r{i}", f"Request {i}: the quick brown fox", 30 + i % 7) for i in range(18)]


def mixed_requests(path: Path, copies: int = 1) -> Path:
    """Greedy and seeded-sampling requests, all of fixed length (``copies`` of each, under ids of their own)."""
    with open(path, "w") as f:
        for copy in range(copies):
            for i, (custom_id, prompt, max_tokens) in enumerate(FAULT_PROMPTS):
                sampling = {"temperature": 0} if i % 2 else {"temperature": 0.8, "top_p": 0.95, "seed": i + copy}
                f.write(json.dumps({"custom_id": custom_id + (f"-{copy}" if copy else ""), "prompt": prompt,
                                    "max_tokens": max_tokens, "ignore_eos": True, **sampling}) + "\n")
    return path


def tokens_by_id(results: dict[str, dict]) -> dict[str, list[int]]:
    return {k: v["token_ids"] for k, v in results.items()}


def small_cluster(model_dir: Path, tmp_path: Path, *, tier2_nodes: int, micro_batches: int) -> LocalCluster:
    """Real processes, with steps small enough (2 sequences per micro-batch) for a failure to land mid-run;
    float32, like the single-process references they are compared with."""
    return LocalCluster(model_dir, tier2_nodes=tier2_nodes, kv_tokens=4096, micro_batches=micro_batches, max_seqs=2,
                        max_batch_tokens=64, dtype="float32", log_dir=tmp_path / "logs")


def wait_for_lines(path: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines")


def submit_command(requests: Path, cluster, out: Path) -> list[str]:
    """``glinthawk submit`` of ``requests`` to the cluster's Tier 1, results to ``out``."""
    host, port = cluster.tier1_address
    return [sys.executable, "-m", "glinthawk", "submit", str(requests), "--to", f"{host}:{port}", "-o", str(out),
            "--no-progress"]


def test_sigkill_one_of_three_tier2_nodes_mid_run(checkpoint, model_dir, tmp_path):
    requests = mixed_requests(tmp_path / "in.jsonl")
    expected = single_process(checkpoint, requests)
    out = tmp_path / "out.jsonl"
    with small_cluster(model_dir, tmp_path, tier2_nodes=3, micro_batches=3) as cluster:
        client = subprocess.Popen(submit_command(requests, cluster, out), stderr=subprocess.PIPE, text=True)
        wait_for_lines(out, 2)
        cluster.kill("tier2-1")
        _, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr
        tier1_log = (tmp_path / "logs" / "tier1.log").read_text()
    assert "lost Tier 2 node" in tier1_log
    got = read_results(out)
    assert len(got) == len(FAULT_PROMPTS)
    assert tokens_by_id(got) == tokens_by_id(expected)


@pytest.mark.parametrize("fault", ["hung", "answers without a tensor"])
async def test_broken_tier2_node_is_dropped_and_its_work_rebuilt(checkpoint, tmp_path, fault):
    """A node that completes the handshake and then never answers is lost after the
    heartbeat's timeout; one that answers ATTN_OUT without its tensor, at once. Either way
    its sequences finish on the healthy node, as in a single process."""
    model, tokenizer = checkpoint

    async def hung(conn):
        await server_handshake(conn, {"tier1"}, {"capacity_tokens": 100000, "bytes_per_token": 1})
        if fault == "hung":
            await asyncio.sleep(3600)
        async for header, _ in conn:
            if header["type"] == "attn":
                await conn.send({"type": "attn_out", "mb": header["mb"], "layer": header["layer"]})

    hung_server = await start_server(hung, "127.0.0.1", 0)
    healthy = Tier2Node(kv_tokens=4096)
    healthy_port = await healthy.start("127.0.0.1", 0)
    addresses = [f"127.0.0.1:{hung_server.sockets[0].getsockname()[1]}", f"127.0.0.1:{healthy_port}"]
    # The hung node reports more free room, so placement sends work there first.
    tier1 = Tier1Node(model, tokenizer, addresses, micro_batches=2, heartbeat_s=0.2, heartbeat_timeout_s=1.0,
                      reconnect_seconds=3600)
    requests = mixed_requests(tmp_path / "in.jsonl")
    try:
        port = await tier1.start("127.0.0.1", 0)
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl", progress=False),
                                         timeout=240)
    finally:
        await tier1.close()
        await healthy.close()
        hung_server.close()
    assert summary.done == len(FAULT_PROMPTS) and summary.failed == 0
    assert tokens_by_id(read_results(tmp_path / "out.jsonl")) == tokens_by_id(single_process(checkpoint, requests))
    assert tier1.stats.first_tokens == len(FAULT_PROMPTS)  # re-placed sequences count once


def test_client_killed_then_resumed_equals_undisturbed_run(checkpoint, model_dir, tmp_path):
    requests = mixed_requests(tmp_path / "in.jsonl")
    expected = single_process(checkpoint, requests)
    out = tmp_path / "out.jsonl"
    with small_cluster(model_dir, tmp_path, tier2_nodes=2, micro_batches=2) as cluster:
        command = submit_command(requests, cluster, out)
        client = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        wait_for_lines(out, 3)
        client.send_signal(signal.SIGKILL)
        client.wait()
        with open(out, "a") as f:  # as if killed in the middle of writing a line
            f.write('{"custom_id": "r17", "text": "half a li')
        first_pass = answered(out).ids
        assert 3 <= len(first_pass) < len(FAULT_PROMPTS)
        resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
    got = read_results(out)  # also checks every line is whole JSON and no custom_id twice
    assert tokens_by_id(got) == tokens_by_id(expected)


async def test_results_of_a_vanished_client_are_kept_and_handed_over(checkpoint, tmp_path):
    """The client disconnects mid-run; Tier 1 finishes its requests, spools their results and
    hands them to the resumed client, which does not make Tier 1 generate them again."""
    model, tokenizer = checkpoint
    requests = mixed_requests(tmp_path / "in.jsonl")
    expected = single_process(checkpoint, requests)
    out = tmp_path / "out.jsonl"
    tier2 = Tier2Node(kv_tokens=4096)
    tier2_port = await tier2.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{tier2_port}"], micro_batches=2, spool_dir=tmp_path / "spool")
    try:
        port = await tier1.start("127.0.0.1", 0)
        first = asyncio.create_task(submit(requests, "127.0.0.1", port, out, progress=False))
        while not (out.exists() and out.read_text().count("\n") >= 2):
            await asyncio.sleep(0.01)
        first.cancel()  # the client vanishes; its connection closes
        with pytest.raises(asyncio.CancelledError):
            await first
        while tier1.batch_of:  # Tier 1 carries on without it
            await asyncio.sleep(0.05)
        assert list((tmp_path / "spool").glob("*.jsonl")), "finished results were not spooled"
        generated = tier1.generated_tokens
        summary = await submit(requests, "127.0.0.1", port, out, progress=False, resume=True)
        # Mostly handed over from the spool; only results lost on the wire as the client died run again.
        assert tier1.generated_tokens - generated < generated / 2
        assert summary.failed == 0
    finally:
        await tier1.close()
        await tier2.close()
    assert tokens_by_id(read_results(out)) == tokens_by_id(expected)
    assert not list((tmp_path / "spool").glob("*.jsonl"))


async def test_a_spool_directory_exists_only_while_it_holds_results(checkpoint, caplog):
    """Tier 1 makes its temporary spool directory when it first spools a result: a node that
    fails to start (or is killed before spooling) leaves none behind. One holding results is
    kept at close, and its path logged."""
    from glinthawk.node.batches import Batch

    model, tokenizer = checkpoint
    failed = Tier1Node(model, tokenizer, ["127.0.0.1:1"])
    with pytest.raises(ConnectionError, match="no Tier 2 node usable"):
        await failed.start("127.0.0.1", 0)
    assert not failed.spool_dir.exists()  # before close: a killed node leaves nothing either
    await failed.close()
    assert not failed.spool_dir.exists()

    kept = Tier1Node(model, tokenizer, ["127.0.0.1:1"])
    batch = Batch("b", None, kept.spool_dir / "b.jsonl")
    await batch.deliver({"custom_id": "a"}, failed=False)  # no client attached: spooled
    try:
        await kept.close()
        assert (kept.spool_dir / "b.jsonl").read_text() == '{"custom_id": "a"}\n'
        assert str(kept.spool_dir) in caplog.text
    finally:
        (kept.spool_dir / "b.jsonl").unlink()
        kept.spool_dir.rmdir()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _bulk_run(model_dir: Path, tmp_path: Path, lines: int) -> tuple[int, int]:
    """Submit ``lines`` one-token requests; returns (answered lines, Tier 1 peak RSS in KiB)."""
    requests = tmp_path / f"bulk-{lines}.jsonl"
    with open(requests, "w") as f:
        for i in range(lines):
            f.write(f'{{"custom_id": "b{i}", "prompt": "Request {i}", "max_tokens": 1}}\n')
    out = tmp_path / f"bulk-{lines}.out.jsonl"
    with LocalCluster(model_dir, tier2_nodes=1, kv_tokens=8192, micro_batches=2, max_seqs=256,
                      max_batch_tokens=1024, log_dir=tmp_path / f"logs-{lines}") as cluster:
        subprocess.run(submit_command(requests, cluster, out), check=True, timeout=1800)
        peak = _peak_rss_kib(cluster.nodes[-1].process.pid)
    with open(out) as f:
        answered_lines = sum(1 for _ in f)
    return answered_lines, peak


def test_100k_line_submission_keeps_tier1_memory_bounded(model_dir, tmp_path):
    small_lines, small_peak = _bulk_run(model_dir, tmp_path, 2_000)
    big_lines, big_peak = _bulk_run(model_dir, tmp_path, 100_000)
    assert (small_lines, big_lines) == (2_000, 100_000)
    # The queue is bounded (max_waiting) and input is read as room frees: 50x the lines
    # must not mean a Tier 1 that grows with the file. 64 MiB covers allocator noise.
    assert big_peak - small_peak < 64 * 1024, (small_peak, big_peak)


async def as_tier1(port: int, kv_heads: int = 1, head_dim: int = 8, layers: int = 1):
    """A connection to the Tier 2 node at ``port``, introduced as its Tier 1 with a float32
    model of that geometry; returns it and the node's WELCOME."""
    conn = await open_connection("127.0.0.1", port)
    welcome = await client_handshake(conn, "tier1", {"num_layers": layers, "num_kv_heads": kv_heads,
                                                     "head_dim": head_dim, "dtype": "float32"})
    return conn, welcome


async def test_tier2_refuses_work_beyond_its_capacity():
    """A reservation larger than the free KV room gets an ERROR, not an allocation."""
    import torch

    from glinthawk.net.messages import MsgType

    node = Tier2Node(kv_tokens=32)
    port = await node.start("127.0.0.1", 0)
    try:
        conn, welcome = await as_tier1(port)
        assert welcome["capacity_tokens"] == 32
        q = k = v = torch.zeros(1, 1, 8)
        await conn.send({"type": "attn", "mb": 1, "layer": 0, "seqs": [[1, 0, 1]], "reserve": [[1, 33]]},
                        {"q": q, "k": k, "v": v})
        reply, _ = await conn.recv()
        assert reply["type"] == MsgType.ERROR and "KV store full" in reply["message"]
        await conn.send({"type": "attn", "mb": 2, "layer": 0, "seqs": [[2, 0, 1]], "reserve": [[2, 32]]},
                        {"q": q, "k": k, "v": v})
        reply, _ = await conn.recv()
        assert reply["type"] == MsgType.ATTN_OUT  # the node still serves what fits
        conn.close()
    finally:
        await node.close()


@pytest.mark.parametrize("bad", ["q head_dim", "k head_dim", "v kv_heads", "q heads", "integer q"])
async def test_tier2_refuses_tensors_that_do_not_fit_its_store(bad):
    """q, k, v from the network of another head size, head count or dtype than the store's
    get an ERROR naming them (the C kernels would read and write past the buffers), and the
    node serves the next frame."""
    import torch

    from glinthawk.net.messages import MsgType

    node = Tier2Node(kv_tokens=64)
    port = await node.start("127.0.0.1", 0)
    try:
        conn, _ = await as_tier1(port, kv_heads=2, head_dim=16, layers=2)
        good = {"q": torch.randn(1, 4, 16), "k": torch.randn(1, 2, 16), "v": torch.randn(1, 2, 16)}
        broken = dict(good, **{"q head_dim": {"q": torch.randn(1, 4, 256)},
                               "k head_dim": {"k": torch.randn(1, 2, 4)},
                               "v kv_heads": {"v": torch.randn(1, 1, 16)},
                               "q heads": {"q": torch.randn(1, 3, 16)},
                               "integer q": {"q": torch.ones(1, 4, 16, dtype=torch.int32)}}[bad])
        await conn.send({"type": "attn", "mb": 1, "layer": 1, "seqs": [[7, 0, 1]], "reserve": [[7, 60]]}, broken)
        reply, _ = await conn.recv()
        assert reply["type"] == MsgType.ERROR and "for this KV store" in reply["message"]
        await conn.send({"type": "attn", "mb": 2, "layer": 0, "seqs": [[8, 0, 1]], "reserve": [[8, 60]]}, good)
        reply, tensors = await conn.recv()
        assert reply["type"] == MsgType.ATTN_OUT  # its reservation fits: the refused frame kept none
        assert torch.allclose(tensors["out"][0, :2], good["v"][0, 0].expand(2, 16))  # one token: attends to its v
        conn.close()
    finally:
        await node.close()


async def three_requests(checkpoint, tmp_path: Path, fields: dict, **tier1_options):
    """Requests r0..r2 ("The quick", 3 new tokens, plus ``fields``) through a Tier 1 and a
    Tier 2 node in this process, one micro-batch: the summary and the result lines by id."""
    model, tokenizer = checkpoint
    tier2 = Tier2Node(kv_tokens=4096)
    tier2_port = await tier2.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{tier2_port}"], micro_batches=1, **tier1_options)
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": "The quick", "max_tokens": 3, **fields})
                                + "\n" for i in range(3)))
    try:
        port = await tier1.start("127.0.0.1", 0)
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl",
                                                progress=False), timeout=120)
    finally:
        await tier1.close()
        await tier2.close()
    return summary, read_results(tmp_path / "out.jsonl")


async def test_a_step_that_fails_fails_its_requests_and_the_node_goes_on(checkpoint, tmp_path, monkeypatch):
    """An error inside one step (here: the compute) gives those requests error lines; later work still runs."""
    from glinthawk import step

    real_final = step.final_stage
    calls = {"n": 0}

    def flaky_final(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return real_final(*args, **kwargs)

    monkeypatch.setattr(step, "final_stage", flaky_final)
    summary, lines = await three_requests(checkpoint, tmp_path, {"temperature": 0}, max_seqs=1)
    assert (summary.done, summary.failed) == (2, 1)
    assert "simulated device fault" in lines["r0"]["error"]["message"]
    assert lines["r1"]["completion_tokens"] == lines["r2"]["completion_tokens"] == 3


@pytest.mark.parametrize("bad", ["r0", "r2"])
async def test_a_result_that_cannot_be_delivered_holds_back_no_other(checkpoint, tmp_path, monkeypatch, caplog, bad):
    """Three requests finish in one step; delivering one of them fails (first or last in the loop).
    The others are delivered and the batch ends: the rest of the loop used to be skipped, and the run hung."""
    from glinthawk.node import tier1 as tier1_module

    real_result_line = tier1_module.result_line

    def result_line(request, done, model_name):
        if request.custom_id == bad:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return real_result_line(request, done, model_name)

    monkeypatch.setattr(tier1_module, "result_line", result_line)
    summary, lines = await three_requests(checkpoint, tmp_path, {"ignore_eos": True})
    assert set(lines) == {"r0", "r1", "r2"} - {bad} and (summary.done, summary.failed) == (2, 0)
    assert f"line {int(bad[1]) + 1}: its result could not be delivered" in caplog.text


async def test_a_sequence_whose_batch_was_given_up_mid_step_fails_no_other(checkpoint, tmp_path, monkeypatch):
    """A batch given up (its file submitted again without --resume) while a step is in flight
    loses its sequences of that step; the other sequences that finish in it are delivered.
    The finish loop used to look the given-up sequence's batch up, and its KeyError failed
    every request of the micro-batch."""
    from glinthawk.node import microbatch

    real_forget = microbatch.MicroBatch._forget

    def forget(self, seqs):
        for seq in seqs:
            if seq.request.custom_id == "r0" and seq.id in self.host.batch_of:  # what _give_up does to r0
                del self.host.batch_of.pop(seq.id).running["r0"]
        return real_forget(self, seqs)

    monkeypatch.setattr(microbatch.MicroBatch, "_forget", forget)
    summary, lines = await three_requests(checkpoint, tmp_path, {"ignore_eos": True})
    assert set(lines) == {"r1", "r2"} and (summary.done, summary.failed) == (2, 0)


def test_a_tier1_loop_held_up_longer_than_the_heartbeat_timeout_loses_no_node():
    """Tier 1 computes on its event loop's thread: a long stage (or tokenizing a huge line)
    can hold the loop past the heartbeat's timeout while the node's PONGs wait unread. On
    uvloop the heartbeat's timer ran before the reader got them, and a healthy node was
    declared lost. The time the loop was held up no longer counts as the node's silence."""
    from glinthawk.net.loop import run
    from glinthawk.node.links import Tier2Link

    async def main() -> bool:
        node = Tier2Node(kv_tokens=64)
        port = await node.start("127.0.0.1", 0)
        try:
            conn, welcome = await as_tier1(port)
            link = Tier2Link(f"127.0.0.1:{port}", conn, welcome["capacity_tokens"], heartbeat_s=0.05, timeout_s=0.3)
            await asyncio.sleep(0.2)  # a few PONGs
            time.sleep(0.6)  # the loop held up for twice the timeout
            await asyncio.sleep(0.3)
            alive = link.alive
            link.close()
            return alive
        finally:
            await node.close()

    assert run(main())


async def test_a_node_that_hangs_mid_step_is_lost_long_before_the_heartbeat_timeout(checkpoint, tmp_path, caplog):
    """A node that stops answering in the middle of a step is judged against the round trips
    the same micro-batch just measured, not the (here 60 s) silence timeout: its sequences
    finish on the healthy node well within the timeout, as in a single process."""
    model, tokenizer = checkpoint
    hanging, healthy = Tier2Node(kv_tokens=8192), Tier2Node(kv_tokens=4096)
    real_attend, frames = hanging._attend, []

    async def attend_then_hang(*args):
        frames.append(1)
        if len(frames) > 20:
            await asyncio.sleep(3600)  # hung: answers nothing more, PINGs included
        await real_attend(*args)

    hanging._attend = attend_then_hang
    ports = [await hanging.start("127.0.0.1", 0), await healthy.start("127.0.0.1", 0)]
    # The hanging node has more free room, so placement sends work there first.
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{p}" for p in ports], micro_batches=2, heartbeat_s=0.2,
                      heartbeat_timeout_s=60.0, reconnect_seconds=3600)
    requests = mixed_requests(tmp_path / "in.jsonl")
    try:
        port = await tier1.start("127.0.0.1", 0)
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, tmp_path / "out.jsonl", progress=False),
                                         timeout=45)  # a safety net: the silence timeout alone would take 60 s
    finally:
        await tier1.close()
        await hanging.close()
        await healthy.close()
    assert summary.done == len(FAULT_PROMPTS) and summary.failed == 0
    assert tokens_by_id(read_results(tmp_path / "out.jsonl")) == tokens_by_id(single_process(checkpoint, requests))
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lost Tier 2 node")]
    assert len(lost) == 1 and "attention within 1.0 s" in lost[0], lost


async def test_an_answer_is_not_due_before_those_sent_ahead_of_it_on_the_same_node():
    """A node answers in order, so a frame queued behind a long one (a new sequence's first
    step, which may compact the store) gets that one's deadline, not its own short one."""
    from glinthawk.node.links import DEADLINE_FLOOR_S, Tier2Link

    async def silent(conn):
        await server_handshake(conn, {"tier1"}, {"capacity_tokens": 100, "bytes_per_token": 1})
        await asyncio.sleep(3600)

    server = await start_server(silent, "127.0.0.1", 0)
    conn = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    await client_handshake(conn, "tier1", {})
    link = Tier2Link("silent", conn, 100, heartbeat_s=3600, timeout_s=30.0)
    try:
        q = torch.zeros(1, 1, 8)
        await link.send_attention(0, 0, {}, q, q, q, expected_s=None)  # the whole timeout
        await link.send_attention(1, 3, {}, q, q, q, expected_s=0.001)  # alone: the floor
        (_, first, first_allowed), (_, second, second_allowed) = link._waiting[0], link._waiting[1]
        assert first_allowed == 30.0 and second == first and second_allowed > DEADLINE_FLOOR_S
        await link.send_attention(2, 3, {}, q, q, q, expected_s=0.001)
        link._waiting.clear()
        await link.send_attention(3, 3, {}, q, q, q, expected_s=0.001)
        assert link._waiting[3][2] == DEADLINE_FLOOR_S
    finally:
        link.close()
        server.close()


async def test_a_tier2_node_that_stays_down_is_tried_less_often_and_reported_once(checkpoint, caplog):
    """Retried every 20 ms it would be tried some 75 times in 1.5 s, with a warning each time;
    each failure doubles the wait instead, and only the first is a warning."""
    model, tokenizer = checkpoint
    healthy = Tier2Node(kv_tokens=64)
    port = await healthy.start("127.0.0.1", 0)
    dead = "127.0.0.1:1"
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{port}", dead], reconnect_seconds=0.02)
    attempts = []
    real_connect = tier1.pool.connect

    async def counted(address, **how):
        attempts.extend([address] if address == dead else [])
        return await real_connect(address, **how)

    tier1.pool.connect = counted
    try:
        await tier1.start("127.0.0.1", 0)
        await asyncio.sleep(1.5)
    finally:
        await tier1.close()
        await healthy.close()
    assert 2 <= len(attempts) <= 10, len(attempts)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and dead in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
