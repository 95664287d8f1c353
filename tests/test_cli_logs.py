"""What a run tells its user: progress without a terminal, Tier 1's configuration and batches in its
log, and where the nodes' logs are (a temporary log directory is removed after a clean run, kept and
named otherwise)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from click.testing import CliRunner

from glinthawk import outputs
from glinthawk.cli import main
from glinthawk.cluster import LocalCluster
from glinthawk.outputs import ResultWriter

from cluster_util import distributed


def _result(custom_id: str, tokens: int = 3) -> dict:
    return {"custom_id": custom_id, "text": "x", "completion_tokens": tokens}


def test_without_a_terminal_progress_is_a_plain_line(tmp_path, monkeypatch, capsys):
    """Before, stderr that is not a terminal (a log file, CI) heard nothing until the end of the run."""
    monkeypatch.setattr(outputs, "PROGRESS_EVERY_S", 0.0)  # a line at every result, whatever the clock says
    with ResultWriter(tmp_path / "out.jsonl", total=4) as writer:  # pytest's stderr is no terminal
        writer.write(_result("a"))
        writer.write({"custom_id": "b", "error": {"message": "bad"}})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(", ")[:2] for line in lines] == [["progress: 1/4 results", "0 failed"],
                                                      ["progress: 2/4 results", "1 failed"]]
    assert all("tok/s generated" in line and "ETA" in line for line in lines)


def test_no_progress_means_no_progress_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(outputs, "PROGRESS_EVERY_S", 0.0)
    with ResultWriter(tmp_path / "out.jsonl", total=1, progress=False) as writer:
        writer.write(_result("a"))
    assert capsys.readouterr().err == ""


async def test_tier1_logs_each_client_batch_as_it_arrives_and_finishes(checkpoint, tmp_path, caplog):
    requests = tmp_path / "in.jsonl"
    lines = [json.dumps({"custom_id": f"r{i}", "prompt": "Hi", "max_tokens": 2, "ignore_eos": True}) for i in range(3)]
    requests.write_text("\n".join([*lines, "not json"]) + "\n")
    with caplog.at_level(logging.INFO, logger="glinthawk.tier1"):
        await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=1, micro_batches=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "glinthawk.tier1"]
    attached = [m for m in messages if m.startswith("client attached: batch ")]
    ended = r"batch \w+ finished: 3 results, 1 failed, 6 tokens generated at [\d.]+ tok/s"
    finished = [m for m in messages if re.match(ended, m)]
    assert len(attached) == 1 and len(finished) == 1, messages


def test_run_removes_its_temporary_log_directory_after_a_clean_run(model_dir, tmp_path):
    """Before, every glinthawk run left a glinthawk-run-* directory in /tmp. A bad input line fails (exit 1)
    but the cluster ran cleanly: its logs go too."""
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"custom_id": "a", "prompt": "Hi", "max_tokens": 2}) + "\nnot json\n")
    result = CliRunner().invoke(main, ["run", str(requests), "-o", str(tmp_path / "out.jsonl"), "--model",
                                       str(model_dir), "--tier2-nodes", "1", "--no-progress"])
    assert result.exit_code == 1 and "1 done, 1 failed" in result.output, result.output
    found = re.search(r"logs in (\S+) \(removed after a clean run\)", result.output)
    assert found, result.output
    assert not Path(found.group(1)).exists()


def test_a_cluster_whose_node_died_keeps_its_logs_and_says_where(model_dir, caplog):
    cluster = LocalCluster(model_dir, tier2_nodes=1)
    try:
        with caplog.at_level(logging.WARNING, logger="glinthawk.cluster"):
            with cluster:
                tier1_log = (cluster.log_dir / "tier1.log").read_text()
                cluster.kill("tier2-0")
        assert cluster.log_dir.is_dir() and (cluster.log_dir / "tier2-0.log").is_file()
        assert f"the nodes' logs are kept in {cluster.log_dir}" in caplog.text
        # Tier 1 said what it runs with, at start
        started = r"tier1: model \S+ \(LlamaForCausalLM, \d+ layers\), (float32|bfloat16) on cpu, \d+ torch threads"
        assert re.search(started, tier1_log), tier1_log
    finally:
        if cluster.log_dir is not None:
            shutil.rmtree(cluster.log_dir, ignore_errors=True)
