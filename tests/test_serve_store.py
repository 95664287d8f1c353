"""The service's pieces without a cluster: the output/error split, paging, and a batch's expiry."""

from __future__ import annotations

import json
import time

import pytest

from glinthawk.serve import runner as runner_module
from glinthawk.serve.batches import BatchStore, split_results, validate_input
from glinthawk.serve.files import FileStore
from glinthawk.serve.runner import Runner, Tier1
from glinthawk.serve.store import ApiError, page


def _line(custom_id: str, status: int = 200, **extra) -> bytes:
    body = {"usage": {"prompt_tokens": 2, "completion_tokens": 3}} if status == 200 else {"error": {"message": "x"}}
    line = {"id": "r", "custom_id": custom_id, "response": {"status_code": status, "body": body}, "error": None}
    return (json.dumps({**line, **extra}) + "\n").encode()


def test_split_keeps_each_custom_id_once_and_drops_a_cut_off_line(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_bytes(_line("a") + _line("b", 400, line=2) + _line("a") + _line("c")[:-9])
    done, failed, usage = split_results(results, tmp_path / "out", tmp_path / "err")
    assert (done, failed, usage) == (1, 1, {"input_tokens": 2, "output_tokens": 3})
    assert [json.loads(t)["custom_id"] for t in (tmp_path / "out").read_text().splitlines()] == ["a"]
    error = json.loads((tmp_path / "err").read_text())
    assert error["custom_id"] == "b" and "line" not in error  # OpenAI's line shape, our bookkeeping stripped


def test_validation_names_each_bad_line(tmp_path):
    good = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    lines = [good, {**good, "custom_id": "b", "method": "GET"}, {**good, "custom_id": ""}, {**good, "body": 1}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n[1]\n")
    total, errors = validate_input(path, "/v1/completions")
    assert total == 5
    assert [(e["line"], e["code"]) for e in errors] == [
        (2, "invalid_method"), (3, "missing_custom_id"), (4, "duplicate_custom_id"), (5, "invalid_json_line")]
    path.write_text("\n\n")
    assert validate_input(path, "/v1/completions")[1][0]["code"] == "empty_file"


def test_page_bounds():
    records = [{"id": f"batch_{i}"} for i in range(5)]
    assert [r["id"] for r in page(records, "batch_3", "2")["data"]] == ["batch_2", "batch_1"]
    for limit in ("0", "101", "x"):
        with pytest.raises(ApiError, match="limit"):
            page(records, None, limit)


async def test_a_batch_past_its_window_expires(tmp_path, monkeypatch):
    files, batches = FileStore(tmp_path / "files", 1 << 20), BatchStore(tmp_path / "batches")
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                  "body": {"prompt": "x"}}) + "\n")
    record = batches.create({"input_file_id": "file-x", "endpoint": "/v1/completions", "completion_window": "24h"},
                            source, "", "default")
    record["expires_at"] = int(time.time()) - 1
    stopped = []

    async def abandon(*args):
        stopped.append(args)

    monkeypatch.setattr(runner_module, "abandon", abandon)
    runner = Runner(batches, files, Tier1("127.0.0.1", 9), max_running=1)  # nothing listens: it must not matter
    runner.start(record)
    await runner.tasks[record["id"]]
    saved = json.loads((batches.dir(record["id"]) / "batch.json").read_text())
    assert saved["status"] == "expired" and saved["expired_at"] and len(stopped) == 1
    assert saved["output_file_id"] is None and saved["request_counts"]["total"] == 1
