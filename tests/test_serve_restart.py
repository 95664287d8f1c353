"""A ``glinthawk serve`` killed (SIGKILL) mid-batch and started again on the same --data-dir: the
batch completes, every custom_id answered exactly once, with the single process's tokens."""

from __future__ import annotations

from serve_util import ServeProcess, batch_line, generate, read_jsonl, wait_for, write_lines

from glinthawk.client import fetch_status
from glinthawk.net.loop import run


def test_killed_service_resumes_its_batch(tmp_path):
    # Lengths differ, so results land one after another and the kill falls among them; the longest
    # take some 370 steps, so on a quiet machine too the batch is still running when the kill lands.
    lines = [batch_line(f"r{i}", "The built-in function", 2 + 13 * i, ignore_eos=True) for i in range(30)]
    lines.insert(7, {**batch_line("bad", "x", 1), "body": {"prompt": "", "max_tokens": 1}})
    source = write_lines(tmp_path / "in.jsonl", lines)
    data = tmp_path / "data"
    first = ServeProcess(data)
    try:
        client = first.client()
        with open(source, "rb") as f:
            file_id = client.files.create(file=f, purpose="batch").id
        batch_id = client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                         completion_window="24h").id
        before = wait_for(client, batch_id, lambda b: b.request_counts.completed >= 4)
        first.kill()
    finally:
        first.stop()
    assert before.status == "in_progress" and before.request_counts.completed < 30, before
    second = ServeProcess(data)
    try:
        client = second.client()
        assert client.batches.retrieve(batch_id).status in ("in_progress", "finalizing", "completed")
        batch = wait_for(client, batch_id)
        outputs = read_jsonl(client.files.content(batch.output_file_id).text)
        errors = read_jsonl(client.files.content(batch.error_file_id).text)
        rerun = run(fetch_status(*second.tier1_address()))["requests"]
    finally:
        second.stop()
    assert batch.status == "completed", batch
    ids = [line["custom_id"] for line in outputs + errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert (batch.request_counts.completed, batch.request_counts.failed) == (30, 1)
    assert rerun["admitted"] + rerun["failed"] < len(lines)  # what finished before the kill did not run again
    expected = generate(source, tmp_path / "oracle.jsonl")
    for line in outputs:
        body, oracle = line["response"]["body"], expected[line["custom_id"]]["response"]["body"]
        assert body["choices"][0]["text"] == oracle["choices"][0]["text"]
        assert body["usage"] == oracle["usage"]


def test_serves_a_running_tier1(tmp_path):
    """--to HOST:PORT: the service fronts a cluster it did not start, and leaves it running when it stops."""
    from glinthawk import DEFAULT_MODEL
    from glinthawk.cluster import LocalCluster

    with LocalCluster(DEFAULT_MODEL, tier2_nodes=1, log_dir=tmp_path / "logs") as cluster:
        host, port = cluster.tier1_address
        service = ServeProcess(tmp_path / "data", "--to", f"{host}:{port}")
        try:
            client = service.client()
            assert [m.id for m in client.models.list().data] == ["default"]
            answer = client.completions.create(model="default", prompt="The", max_tokens=3, temperature=0)
            assert answer.usage.completion_tokens == 3
        finally:
            service.stop()
        assert not (tmp_path / "data-cluster-logs").exists()  # it started no cluster of its own
        cluster.check_alive()
