"""The two-tier runtime against the single-process engine, on loopback.

The matrix runs Tier 1 and Tier 2 nodes in this process (one event loop, real TCP
sockets, real injected delays) so it stays fast; the `glinthawk run` tests at the end
start real processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glinthawk.net.netem import NetEm

from cluster_util import PROMPTS, distributed, read_results, single_process, write_requests

@pytest.mark.parametrize("nodes", [1, 2, 3])
@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("delay", [None, NetEm(delay_ms=20, jitter_ms=5)], ids=["0ms", "20ms+-5"])
async def test_distributed_greedy_equals_single_process(checkpoint, tmp_path, nodes, micro_batches, delay):
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    expected = single_process(checkpoint, requests)
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=nodes,
                                     micro_batches=micro_batches, netem=delay)
    got = read_results(out)
    assert summary.failed == 0 and summary.done == len(PROMPTS)
    assert set(got) == set(expected)
    for custom_id, line in expected.items():
        assert got[custom_id]["token_ids"] == line["token_ids"], custom_id
        assert got[custom_id]["text"] == line["text"]
        assert got[custom_id]["completion_tokens"] == dict((p[0], p[2]) for p in PROMPTS)[custom_id]


async def test_seeded_sampling_distributed_equals_single_process(checkpoint, tmp_path):
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 1234})
    expected = single_process(checkpoint, requests, max_batch_tokens=16)
    _, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=2, micro_batches=3)
    got = read_results(out)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}


async def test_more_requests_than_kv_capacity_all_complete(checkpoint, tmp_path):
    prompts = [(f"r{i}", f"Request number {i} says hello", 6 + i % 5) for i in range(24)]
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0}, prompts)
    expected = single_process(checkpoint, requests)
    # Each sequence needs ~15-20 KV tokens: a node of 40 holds two at a time.
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=2, micro_batches=2,
                                     kv_tokens=40)
    got = read_results(out)
    assert summary.done == len(prompts) and summary.failed == 0
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}


async def test_bad_lines_get_errors_and_the_rest_runs(checkpoint, tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(
        b'{"custom_id": "ok1", "prompt": "Hello", "max_tokens": 3, "temperature": 0}\n'
        b'{"custom_id": "broken", "prompt": \n'
        b'\xff\xfe not utf-8\n'
        b'{"custom_id": "ok1", "prompt": "Duplicate", "max_tokens": 3}\n'
        b'{"custom_id": "big", "prompt": "Hello", "max_tokens": 100000}\n'
        b'{"custom_id": "ok2", "prompt": "World", "max_tokens": 3, "temperature": 0}\n'
    )
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=1, micro_batches=2)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.done == 2 and summary.failed == 4
    errors = [line["error"]["message"] for line in lines if "error" in line]
    assert any("invalid JSON" in e and "line 2" in e for e in errors)
    assert any("UTF-8" in e and "line 3" in e for e in errors)
    assert any("duplicate custom_id 'ok1'" in e for e in errors)
    assert any("exceeds the model's context" in e for e in errors)


# -- OpenAI Batch form -----------------------------------------------------------------
def check_openai_batch_output(line: dict, custom_id: str) -> dict:
    """The fields and types of an OpenAI Batch API output line; returns the response body."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert isinstance(line["id"], str) and line["custom_id"] == custom_id and line["error"] is None
    response = line["response"]
    assert set(response) == {"status_code", "request_id", "body"} and response["status_code"] == 200
    body = response["body"]
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(body)
    assert isinstance(body["created"], int) and isinstance(body["model"], str)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return body


async def test_openai_batch_form(checkpoint, tmp_path):
    model, tokenizer = checkpoint
    requests = tmp_path / "in.jsonl"
    chat = [{"role": "user", "content": "The quick brown fox"}]
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "Tier one holds", "max_tokens": 5, "temperature": 0}},
        {"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": chat, "max_tokens": 4, "temperature": 0}},
        {"custom_id": "c3", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]) + "\n")
    _, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=2, micro_batches=2)
    got = read_results(out)
    completion = check_openai_batch_output(got["c1"], "c1")
    assert completion["object"] == "text_completion" and completion["model"] == "tiny"
    assert completion["usage"]["prompt_tokens"] == len(tokenizer.encode("Tier one holds"))
    assert completion["usage"]["completion_tokens"] <= 5
    expected = single_process(checkpoint, requests)["c1"]["response"]["body"]["choices"][0]["text"]
    assert completion["choices"][0]["text"] == expected
    chat_body = check_openai_batch_output(got["c2"], "c2")
    assert chat_body["object"] == "chat.completion"
    assert chat_body["choices"][0]["message"]["role"] == "assistant"
    assert chat_body["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(chat))
    error = got["c3"]
    assert error["response"]["status_code"] == 400
    assert "/v1/embeddings" in error["response"]["body"]["error"]["message"]


# -- real processes ----------------------------------------------------------------------
def glinthawk(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glinthawk", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def node_processes(log_dir: Path) -> list[int]:
    """Pids of live processes whose command line names ``log_dir`` (the cluster's children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().split()[2]
            except OSError:
                continue
            if str(log_dir) in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def completion_tokens(line: dict) -> list[int]:
    """Generated token ids of a result line in either form (the OpenAI form carries only text)."""
    if "token_ids" in line:
        return line["token_ids"]
    choice = line["response"]["body"]["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content"))


def test_glinthawk_run_end_to_end_on_bundled_model(tmp_path):
    """The README's main command; its output equals the single-process engine's, greedy and seeded alike."""
    root = Path(__file__).resolve().parent.parent
    out, single, logs = tmp_path / "out.jsonl", tmp_path / "single.jsonl", tmp_path / "logs"
    proc = glinthawk("run", "examples/prompts.jsonl", "-o", str(out), "--tier2-nodes", "2", "--log-dir", str(logs),
                     "--no-progress", cwd=root)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    reference = glinthawk("generate", "examples/prompts.jsonl", "-o", str(single), "--no-progress", cwd=root)
    _, stderr = reference.communicate(timeout=240)
    assert reference.returncode == 0, stderr
    results, expected = read_results(out), read_results(single)
    examples = [json.loads(line)["custom_id"] for line in (root / "examples" / "prompts.jsonl").read_text().splitlines()]
    assert sorted(results) == sorted(examples)
    assert all(line.get("error") is None for line in results.values())
    assert {k: completion_tokens(v) for k, v in results.items()} == {k: completion_tokens(v) for k, v in expected.items()}
    assert node_processes(logs) == []


def test_ctrl_c_leaves_valid_partial_output_and_no_children(tmp_path, model_dir):
    requests = tmp_path / "in.jsonl"
    write_requests(requests, {"temperature": 0}, [(f"r{i}", "Count with me: 1 2 3", 24) for i in range(16)])
    out, logs = tmp_path / "out.jsonl", tmp_path / "logs"
    # As from a terminal: SIGINT at its default. A child of this process once inherited SIGINT and
    # SIGQUIT ignored, the mark of C's system() running on some thread of it (libtorch calls it),
    # and rightly kept ignoring the Ctrl-C.
    proc = glinthawk("run", str(requests), "-o", str(out), "--model", str(model_dir), "--tier2-nodes", "2",
                     "--max-seqs", "2", "--micro-batches", "2", "--log-dir", str(logs), "--no-progress",
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, stderr
    partial = read_results(out)  # every line is whole JSON
    assert 2 <= len(partial) < 40
    deadline = time.monotonic() + 30
    while node_processes(logs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node_processes(logs) == []


def test_run_stops_with_the_reason_when_its_tier2_nodes_die(tmp_path, model_dir):
    """A Tier 2 node killed (say by the OOM killer) with none left: ``glinthawk run`` used to wait
    forever. Now it names the node, shows its log, keeps what finished, and --resume does the rest."""
    requests = tmp_path / "in.jsonl"
    write_requests(requests, {"temperature": 0}, [(f"r{i}", "Count with me: 1 2 3", 24) for i in range(16)])
    out, logs = tmp_path / "out.jsonl", tmp_path / "logs"
    command = ["run", str(requests), "-o", str(out), "--model", str(model_dir), "--tier2-nodes", "1",
               "--max-seqs", "2", "--log-dir", str(logs), "--no-progress"]
    proc = glinthawk(*command)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        (tier2,) = [pid for pid in node_processes(logs)
                    if b"--role\0tier2" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(tier2, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()  # if it hangs after all: its children die with it
    assert proc.returncode == 1
    assert "every Tier 2 node died" in stderr and "tier2-0 was killed by SIGKILL" in stderr, stderr
    assert "listening on" in stderr and "--resume" in stderr  # its log's tail, and what to do
    assert 2 <= len(read_results(out)) < 16
    resumed = glinthawk(*command, "--resume")
    _, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    assert sorted(read_results(out)) == sorted(f"r{i}" for i in range(16))
    assert node_processes(logs) == []


def test_cluster_watch_waits_while_a_tier2_node_is_left(tmp_path, model_dir):
    from glinthawk.cluster import ClusterError, LocalCluster, NodeProcess, WATCH_INTERVAL_S

    cluster = LocalCluster(model_dir, tier2_nodes=2, log_dir=tmp_path)
    for name in ("tier2-0", "tier2-1", "tier1"):
        (tmp_path / f"{name}.log").write_text(f"last words of {name}\n")
        process = subprocess.Popen(["sleep", "600"])
        cluster.nodes.append(NodeProcess(name, process, tmp_path / f"{name}.log", tmp_path / f"{name}.addr"))

    async def scenario() -> None:
        work = asyncio.ensure_future(asyncio.sleep(600))
        watched = asyncio.ensure_future(cluster.watch(work))
        cluster.kill("tier2-1")
        await asyncio.sleep(3 * WATCH_INTERVAL_S)
        assert not watched.done()  # Tier 1 rebuilds that node's sequences on the other one
        cluster.kill("tier2-0")
        with pytest.raises(ClusterError, match="every Tier 2 node died") as error:
            await watched
        assert "tier2-1 was killed by SIGKILL" in str(error.value) and "last words of tier2-0" in str(error.value)
        assert work.cancelled()
        cluster.kill("tier1")
        with pytest.raises(ClusterError, match="Tier 1 died: tier1 was killed by SIGKILL"):
            await cluster.watch(asyncio.sleep(600))

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


def test_stopping_waits_for_tier1_to_finish_its_drain(tmp_path, model_dir, monkeypatch):
    """On SIGTERM Tier 1 finishes running requests for up to its drain timeout: stop() must not
    SIGKILL it before (their results would be lost, its spool directory left behind)."""
    from glinthawk import cluster as cluster_module
    from glinthawk.node.tier1 import DRAIN_TIMEOUT_S

    waited = {}  # a node's name (its stand-in process here) -> how long stop() lets it take
    monkeypatch.setattr(cluster_module, "stop_process", lambda process, timeout_s: waited.setdefault(process, timeout_s))
    cluster = cluster_module.LocalCluster(model_dir, tier2_nodes=1, log_dir=tmp_path)
    for name in ("tier2-0", "tier1"):
        log, address = tmp_path / f"{name}.log", tmp_path / f"{name}.addr"
        cluster.nodes.append(cluster_module.NodeProcess(name, name, log, address))
    cluster.stop()
    assert waited["tier1"] > DRAIN_TIMEOUT_S >= waited["tier2-0"]


def test_local_cluster_picks_micro_batches_by_delay(model_dir):
    """No delay to hide: one micro-batch (the largest batch). Injected delay: several in flight."""
    from glinthawk.cluster import LocalCluster

    assert LocalCluster(model_dir).in_flight == 1
    assert LocalCluster(model_dir, delay_ms=20).in_flight == 4
    assert LocalCluster(model_dir, jitter_ms=5).in_flight == 4
    assert LocalCluster(model_dir, delay_ms=20, micro_batches=9).in_flight == 9


@pytest.mark.parametrize("delay_ms,micro_batches,tier1,tier2", [
    (0.0, None, 8, 2),  # one micro-batch in flight: the tiers take turns, Tier 1 gets every core
    (10.0, None, 8, 2),  # several in flight (delay): Tier 2's attention is brief, Tier 1 still gets every core
    (0.0, 4, 8, 2),
])
def test_local_cluster_shares_the_cores(monkeypatch, tmp_path, delay_ms, micro_batches, tier1, tier2):
    import os

    from glinthawk.cluster import LocalCluster

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cluster = LocalCluster(tmp_path, tier2_nodes=3, delay_ms=delay_ms, micro_batches=micro_batches)
    assert (cluster.threads_for("tier1"), cluster.threads_for("tier2-0")) == (tier1, tier2)
    held = LocalCluster(tmp_path, tier2_nodes=3, delay_ms=delay_ms, micro_batches=micro_batches, tier1_threads=1)
    assert (held.threads_for("tier1"), held.threads_for("tier2-0")) == (1, tier2)


@pytest.mark.parametrize("cores,stages,expected", [
    (2, 3, 2),  # a thread a stage (each beside its Tier 2 node) on 2 cores: two compute at once
    (2, 2, 2),
    (16, 3, 3),  # 2 threads a stage on 16 cores: all three
])
def test_core_shares_count_the_stages_that_compute_at_once(monkeypatch, cores, stages, expected):
    import os

    from glinthawk.threads import CoreShares

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert CoreShares(stages, tier2_nodes=1, in_flight=None).concurrent_stages() == expected


def test_local_cluster_tells_its_stages_how_many_compute_at_once(monkeypatch, model_dir):
    import os

    from glinthawk.cluster import LocalCluster

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    staged = LocalCluster(model_dir, tier2_nodes=1, stages=2, micro_batches="auto")
    assert (staged.tier1_settings.concurrent_stages, staged.tier1_settings.micro_batches) == (2, None)
    assert LocalCluster(model_dir, tier2_nodes=1, micro_batches="auto").tier1_settings.concurrent_stages is None
    given = LocalCluster(model_dir, tier2_nodes=1, stages=2, micro_batches="auto", concurrent_stages=1)
    assert given.tier1_settings.concurrent_stages == 1  # the user's figure wins


@pytest.mark.parametrize("cores,tier2_nodes,micro_batches,tier1_long,tier2_long", [
    (2, 1, None, True, True),  # Tier 1's one worker spins; the Tier 2 node runs on the core its loop frees
    (2, 2, None, False, True),  # two Tier 2 nodes would wait behind that spinning worker
    (2, 3, None, False, True),
    (16, 1, None, False, False),  # 15 spinning Tier 1 workers leave one core for 8 Tier 2 threads, and back
    (2, 1, 4, True, True),  # several in flight: as with one (Tier 1 takes every core whatever the count)
])
def test_local_cluster_spins_where_the_cores_allow(monkeypatch, tmp_path, cores, tier2_nodes, micro_batches,
                                                   tier1_long, tier2_long):
    import os

    from glinthawk import threads
    from glinthawk.cluster import LocalCluster

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cluster = LocalCluster(tmp_path, tier2_nodes=tier2_nodes, micro_batches=micro_batches)
    expected = {True: threads.LIBGOMP_SPIN_ROUNDS, False: threads.SHARED_CORES_SPIN_ROUNDS}
    assert cluster.spin_rounds_for("tier1") == expected[tier1_long]
    assert cluster.spin_rounds_for("tier2-0") == expected[tier2_long]
    # The long spin is libgomp's default: nothing to pass. The short one goes as GOMP_SPINCOUNT.
    assert cluster.env_for("tier1").get("GOMP_SPINCOUNT") == (None if tier1_long else "10000")
    monkeypatch.setenv("GOMP_SPINCOUNT", "777")  # the user's own choice goes to every node
    assert cluster.env_for("tier1")["GOMP_SPINCOUNT"] == "777"
    assert cluster.env_for("tier2-0")["GOMP_SPINCOUNT"] == "777"
