"""Glinthawk's nodes on a workload: Tier 1 and Tier 2 inside this process, ``glinthawk run``'s
``LocalCluster`` of node processes, or node processes started one by one
(``node_processes``), each through the product's own entry points."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from glinthawk.bench.runs import RunResult
from glinthawk.bench.workloads import check_results, read_jsonl, write_jsonl
from glinthawk.cluster import ClusterError, LocalCluster, NodeProcess, spawn_node, stop_process, wait_ready
from glinthawk.settings import StepSettings


async def _two_tier(model, tokenizer, requests_path: Path, out_path: Path, *, nodes: int, micro_batches: int,
                    netem, kv_tokens: int | None, max_batch_tokens: int, max_seqs: int, poll_s: float,
                    kv_memory: int | None = None, kv_dtype: str = "auto") -> RunResult:
    from glinthawk.client import submit
    from glinthawk.node.tier1 import Tier1Node
    from glinthawk.node.tier2 import Tier2Node

    tier2 = [Tier2Node(kv_tokens=kv_tokens, kv_memory=kv_memory, netem=netem, kv_dtype=kv_dtype)
             for _ in range(nodes)]
    tier1 = None
    try:
        ports = [await node.start("127.0.0.1", 0) for node in tier2]
        tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{port}" for port in ports], micro_batches=micro_batches,
                          max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, netem=netem)
        port = await tier1.start("127.0.0.1", 0)
        timeline: list[tuple[float, int, int]] = []
        started = time.perf_counter()

        async def poll() -> None:  # O(1): the poller shares the event loop with the node it watches
            while True:
                timeline.append((time.perf_counter() - started, tier1.generated_tokens, tier1.stats.first_tokens))
                await asyncio.sleep(poll_s)

        poller = asyncio.get_running_loop().create_task(poll())
        try:
            await submit(requests_path, "127.0.0.1", port, out_path, progress=False)
        finally:
            poller.cancel()
        seconds = time.perf_counter() - started
        timeline.append((seconds, tier1.generated_tokens, tier1.stats.first_tokens))
        stats = tier1.merger.stats
        extra = {"tier1_busy_seconds": stats.busy_seconds, "tier1_jobs": stats.jobs,
                 "tier1_micro_batches_per_job": stats.micro_batches / stats.jobs if stats.jobs else None}
        return RunResult(seconds, tier1.generated_tokens, 0, timeline, extra)
    finally:
        if tier1 is not None:
            await tier1.close()
        if netem is not None:  # let frames the emulated link still holds land before Tier 2 shuts down
            await asyncio.sleep((netem.delay_ms + netem.jitter_ms) / 1000 + 0.05)
        for node in tier2:
            await node.close()


def run_two_tier_inprocess(model, tokenizer, lines: list[dict], work_dir: Path, *, nodes: int = 1,
                           micro_batches: int | None = None, delay_ms: float = 0.0,
                           kv_tokens: int | None = None, max_batch_tokens: int = StepSettings.max_batch_tokens,
                           max_seqs: int = StepSettings.max_seqs, poll_s: float = 0.005, kv_memory: int | None = None,
                           kv_dtype: str = "auto") -> RunResult:
    """Tier 1 and Tier 2 nodes in this process (one event loop, real TCP on loopback, real delays);
    each Tier 2 node sized by ``kv_tokens`` or ``kv_memory`` (bytes), keeping K/V as ``kv_dtype``."""
    from glinthawk.net.loop import run
    from glinthawk.net.netem import NetEm

    requests_path = write_jsonl(work_dir / "requests.jsonl", lines)
    out_path = work_dir / "results.jsonl"
    netem = NetEm(delay_ms=delay_ms) if delay_ms > 0 else None
    result = run(_two_tier(model, tokenizer, requests_path, out_path, nodes=nodes, micro_batches=micro_batches,
                           netem=netem, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs,
                           poll_s=poll_s, kv_memory=kv_memory, kv_dtype=kv_dtype))
    result.requests = len(lines)
    check_results(read_jsonl(out_path), sum(line["max_tokens"] for line in lines))
    return result


def run_local_cluster(model_dir: Path, lines: list[dict], work_dir: Path, *, dtype: str, tier2_nodes: int,
                      kv_tokens: int, micro_batches: int | str | None = None,
                      max_batch_tokens: int = StepSettings.max_batch_tokens, max_seqs: int = StepSettings.max_seqs,
                      delay_ms: float = 0.0, stages: int | None = None) -> RunResult:
    """``glinthawk run``: real Tier 2 and Tier 1 processes on loopback; times the submit only.
    ``micro_batches``: see ``LocalCluster`` ("auto": Tier 1 measures the count)."""
    from glinthawk.client import fetch_status, submit
    from glinthawk.net.loop import run

    requests_path = write_jsonl(work_dir / "requests.jsonl", lines)
    out_path = work_dir / "results.jsonl"
    cluster = LocalCluster(model_dir, tier2_nodes=tier2_nodes, kv_tokens=kv_tokens, dtype=dtype, device="cpu",
                           micro_batches=micro_batches, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs,
                           delay_ms=delay_ms, log_dir=work_dir / "logs", stages=stages if stages != 1 else None)
    started = time.perf_counter()
    try:
        with cluster:
            up = time.perf_counter() - started
            host, port = cluster.tier1_address
            started = time.perf_counter()
            summary = run(submit(requests_path, host, port, out_path, progress=False))
            seconds = time.perf_counter() - started
            chosen = run(fetch_status(host, port)).get("micro_batches")  # what Tier 1 ran with (or measured)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    check_results(read_jsonl(out_path), sum(line["max_tokens"] for line in lines))
    return RunResult(seconds, summary.generated_tokens, len(lines), extra={"startup_seconds": up,
                                                                           "micro_batches_used": chosen})


@contextlib.contextmanager
def node_processes(log_dir: Path) -> Iterator[Callable[..., NodeProcess]]:
    """``start(name, args, module="glinthawk.node")``: a node process, ready when it returns (its
    log in ``log_dir``); every one started is stopped on the way out, the last started first."""
    started: list[NodeProcess] = []

    def start(name: str, args: list[str], module: str = "glinthawk.node") -> NodeProcess:
        started.append(node := spawn_node(name, args, log_dir, module=module))
        try:
            wait_ready(node)
        except ClusterError as exc:
            raise click.ClickException(str(exc)) from None
        return node

    try:
        yield start
    finally:
        for node in reversed(started):
            stop_process(node.process)
