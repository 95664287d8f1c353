"""Every kind of bad input through the two-tier path: an error line for it, the rest goes on."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from glinthawk.client import SubmitError, submit
from glinthawk.requests import MAX_LINE_BYTES, read_lines

from cluster_util import distributed

GOOD = b'{"custom_id": "good", "prompt": "The quick", "max_tokens": 3, "temperature": 0}'

BAD_LINES = {
    "invalid JSON": (b'{"custom_id": "x", "prompt": ', "invalid JSON"),
    "non-UTF-8 bytes": (b'{"custom_id": "x", "prompt": "\xff\xfe"}', "not valid UTF-8"),
    "missing prompt": (b'{"custom_id": "x", "max_tokens": 3}', "exactly one of 'prompt' or 'messages'"),
    "wrong-typed field": (b'{"custom_id": "x", "prompt": "hi", "max_tokens": "many"}', "max_tokens"),
    "empty prompt": (b'{"custom_id": "x", "prompt": ""}', "'prompt' is empty"),
    "prompt longer than the context": (
        json.dumps({"custom_id": "x", "prompt": "fox " * 400, "max_tokens": 1}).encode(), "exceeds the model's context"),
    "max_tokens <= 0": (b'{"custom_id": "x", "prompt": "hi", "max_tokens": 0}', "max_tokens must be a positive"),
    "max_tokens beyond the context": (b'{"custom_id": "x", "prompt": "hi", "max_tokens": 100000}', "exceeds"),
    "unknown sampling field": (b'{"custom_id": "x", "prompt": "hi", "frequency_penalty": 1}', "unknown field"),
    "temperature < 0": (b'{"custom_id": "x", "prompt": "hi", "temperature": -1}', "temperature must be"),
    "top_p = 0": (b'{"custom_id": "x", "prompt": "hi", "top_p": 0}', "top_p must be in (0, 1]"),
    "top_p > 1": (b'{"custom_id": "x", "prompt": "hi", "top_p": 1.5}', "top_p must be in (0, 1]"),
    "unknown url": (b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"input": "a"}}',
                    "unsupported url"),
    "not an object": (b'[1, 2, 3]', "expected a JSON object"),
    "lone surrogate in the prompt": (b'{"custom_id": "x", "prompt": "bad \\ud800"}', "'prompt' holds a lone"),
    "lone surrogate in the custom_id": (b'{"custom_id": "x\\ud800", "prompt": "hi"}', "'custom_id' holds a lone"),
    "JSON nested too deeply": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
async def test_bad_line_gets_an_error_and_the_rest_runs(checkpoint, tmp_path, kind):
    raw, fragment = BAD_LINES[kind]
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(raw + b"\n" + GOOD + b"\n")
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=1, micro_batches=1)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [line for line in lines if line.get("error") or line.get("response", {}).get("status_code") == 400]
    assert summary.done == 1 and summary.failed == 1 and len(lines) == 2
    (error,) = errors
    message = error["response"]["body"]["error"]["message"] if "response" in error else error["error"]["message"]
    assert fragment in message and "line 1" in message


async def test_duplicate_custom_id_distributed(checkpoint, tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(GOOD + b"\n" + GOOD + b"\n")
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=1, micro_batches=1)
    assert (summary.done, summary.failed) == (1, 1)
    assert "duplicate custom_id 'good'" in out.read_text()


async def test_over_long_line_distributed(checkpoint, tmp_path):
    requests = tmp_path / "in.jsonl"
    with open(requests, "wb") as f:
        f.write(b'{"custom_id": "huge", "prompt": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}\n' + GOOD + b"\n")
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=1, micro_batches=1)
    assert (summary.done, summary.failed) == (1, 1)
    assert f"longer than the {MAX_LINE_BYTES}-byte limit" in out.read_text()


def test_a_1gb_line_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:  # a sparse 1 GiB line of NUL bytes, then a good line
        f.truncate(1 << 30)
        f.seek(1 << 30)
        f.write(b"\n" + GOOD + b"\n")
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            lines = list(read_lines(f))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [raw for _, raw in lines] == [None, GOOD + b"\n"]
    assert peak < 3 * MAX_LINE_BYTES


async def test_empty_file_gives_no_results_and_no_error(checkpoint, tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(b"")
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=1, micro_batches=1)
    assert (summary.done, summary.failed) == (0, 0) and out.read_text() == ""


async def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SubmitError, match="cannot read input file .*missing.jsonl"):
        await submit(tmp_path / "missing.jsonl", "127.0.0.1", 9, tmp_path / "out.jsonl")


async def test_long_lines_go_in_several_submit_frames(checkpoint, tmp_path, monkeypatch):
    """SUBMIT frames end at a byte budget as well as at 64 lines: 64 lines near the 16 MiB line
    limit would pass the 1 GiB frame limit, and Tier 1 would refuse the whole frame."""
    from glinthawk import client
    from glinthawk.net.connection import Connection

    monkeypatch.setattr(client, "BYTES_PER_FRAME", 1000)
    frames = []
    real_send = Connection.send

    async def send(self, msg, tensors=None):
        if msg.get("type") == "submit":
            frames.append(msg["lines"])
        return await real_send(self, msg, tensors)

    monkeypatch.setattr(Connection, "send", send)
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"r{i}-" + "x" * 600, "prompt": "The quick", "max_tokens": 2})
                                + "\n" for i in range(10)))
    summary, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=1, micro_batches=1)
    assert summary.done == 10 and len(out.read_text().splitlines()) == 10
    assert sorted(number for frame in frames for number, _ in frame) == list(range(1, 11))
    assert max(len(frame) for frame in frames) == 2  # 2 lines of ~630 bytes reach the budget
