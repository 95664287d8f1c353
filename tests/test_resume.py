"""Resuming a batch: a client that dies and one that takes its batch over, or starts it again."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path

from glinthawk.client import answered, batch_id, submit
from glinthawk.net.connection import open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node
from glinthawk.requests import read_lines


def write_lines(path: Path, objs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objs))
    return path


def output_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextlib.asynccontextmanager
async def cluster(checkpoint, tmp_path: Path, **tier1_options):
    """One Tier 2 node and a Tier 1 with small steps; yields (Tier 1, its port)."""
    model, tokenizer = checkpoint
    tier2 = Tier2Node(kv_tokens=4096)
    tier2_port = await tier2.start("127.0.0.1", 0)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{tier2_port}"], micro_batches=1, max_seqs=2,
                      max_batch_tokens=64, spool_dir=tmp_path / "spool", **tier1_options)
    try:
        yield tier1, await tier1.start("127.0.0.1", 0)
    finally:
        await tier1.close()
        await tier2.close()


async def test_a_client_that_dies_while_tier1_holds_back_its_input_leaves_the_resumed_client_whole(
        checkpoint, tmp_path):
    """The dead client's handler, parked on a full queue, used to wake after the resumed client
    attached, admit the dead client's queued lines into the new intake (their resent copies then
    failed as duplicates) and detach the new client, whose later results went to the spool."""
    requests = write_lines(tmp_path / "in.jsonl", [
        {"custom_id": f"r{i}", "prompt": f"Request {i}", "max_tokens": 4, "ignore_eos": True} for i in range(40)])
    out = tmp_path / "out.jsonl"
    async with cluster(checkpoint, tmp_path, max_waiting=2) as (tier1, port):
        conn = await open_connection("127.0.0.1", port)  # what `glinthawk submit` sends, killed mid-file
        await client_handshake(conn, "client", {"batch_id": batch_id(requests, out), "resume": False})
        with open(requests, "rb") as f:
            entries = [[number, raw] for number, raw in read_lines(f)]
        for start in range(0, 30, 10):
            await conn.send({"type": "submit", "lines": entries[start:start + 10]})
        while len(tier1.waiting) < 2:  # its handler now waits for room, with frames still unread
            await asyncio.sleep(0.01)
        conn.close()
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, out, progress=False, resume=True), 120)
        assert not list((tmp_path / "spool").glob("*.jsonl"))
    lines = output_lines(out)
    assert [line for line in lines if "error" in line] == []
    assert Counter(line["custom_id"] for line in lines) == Counter(f"r{i}" for i in range(40))
    assert (summary.done, summary.failed) == (40, 0)


async def test_submitting_again_without_resume_starts_over(checkpoint, tmp_path):
    """A new submission of the same files (what LLM.generate does after an interrupted call)
    used to get the old prompts' results for ids still running, and a duplicate of such an id
    was admitted over it, so its end raised and failed its whole micro-batch."""
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(requests, [{"custom_id": f"r{i}", "prompt": f"Old {i}", "max_tokens": 200, "ignore_eos": True}
                           for i in range(3)])
    async with cluster(checkpoint, tmp_path) as (tier1, port):
        first = asyncio.create_task(submit(requests, "127.0.0.1", port, out, progress=False))
        while len(tier1.batch_of) < 3:
            await asyncio.sleep(0.01)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        new = [{"custom_id": f"r{i}", "prompt": f"New {i}", "max_tokens": 3, "ignore_eos": True} for i in range(3)]
        write_lines(requests, new[:1] + [{**new[0], "max_tokens": 2}] + new[1:])
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, out, progress=False), 60)
        assert not tier1.batch_of and not tier1.waiting
        assert all(not mb.size for mb in tier1.micro_batch_list)  # the old requests stopped
    lines = output_lines(out)
    errors = [line["error"]["message"] for line in lines if "error" in line]
    assert errors == ["line 2: duplicate custom_id 'r0'"]
    assert sorted((line["custom_id"], line["completion_tokens"]) for line in lines if "error" not in line) == [
        ("r0", 3), ("r1", 3), ("r2", 3)]
    assert (summary.done, summary.failed) == (3, 1)


async def test_a_duplicate_of_a_request_still_running_is_refused_on_resume(checkpoint, tmp_path):
    """The resumed batch's intake knows the ids still running, so a second line with one is a
    duplicate rather than a request admitted over the running one."""
    requests, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(requests, [{"custom_id": "a", "prompt": "Long", "max_tokens": 200, "ignore_eos": True},
                           {"custom_id": "a", "prompt": "Dup", "max_tokens": 2, "ignore_eos": True},
                           {"custom_id": "b", "prompt": "Other", "max_tokens": 2, "ignore_eos": True}])
    async with cluster(checkpoint, tmp_path) as (tier1, port):
        conn = await open_connection("127.0.0.1", port)  # a client that sent the first line and died
        await client_handshake(conn, "client", {"batch_id": batch_id(requests, out), "resume": False})
        with open(requests, "rb") as f:
            await conn.send({"type": "submit", "lines": [list(next(read_lines(f)))]})
        while not tier1.batch_of:
            await asyncio.sleep(0.01)
        conn.close()
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, out, progress=False, resume=True), 60)
    lines = output_lines(out)
    assert [line["error"]["message"] for line in lines if "error" in line] == ["line 2: duplicate custom_id 'a'"]
    assert sorted((line["custom_id"], line["completion_tokens"]) for line in lines if "error" not in line) == [
        ("a", 200), ("b", 2)]
    assert (summary.done, summary.failed) == (2, 1)


async def test_resuming_does_not_answer_an_openai_line_without_custom_id_again(checkpoint, tmp_path):
    """Its error line had neither a custom_id nor a line number, so every resume added another."""
    body = {"prompt": "Hi", "max_tokens": 2}
    requests = write_lines(tmp_path / "in.jsonl", [
        {"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": body},
        {"method": "POST", "url": "/v1/completions", "body": body}])
    out = tmp_path / "out.jsonl"
    async with cluster(checkpoint, tmp_path) as (_, port):
        for resume in (False, True):
            await submit(requests, "127.0.0.1", port, out, progress=False, resume=resume)
    lines = output_lines(out)
    assert sorted((line.get("line", 0), str(line["custom_id"]), line["response"]["status_code"]) for line in lines) == [
        (0, "ok", 200), (2, "None", 400)]


async def test_a_duplicate_custom_id_error_does_not_answer_the_first_line_with_that_id(checkpoint, tmp_path):
    """The error line of line 2 (a duplicate of line 1's id) carries that id: a resume took it
    for line 1's answer, so line 1 never ran."""
    requests = write_lines(tmp_path / "in.jsonl", [
        {"custom_id": "a", "prompt": "First", "max_tokens": 2}, {"custom_id": "a", "prompt": "Dup", "max_tokens": 2}])
    out = write_lines(tmp_path / "out.jsonl", [  # interrupted before line 1 finished
        {"custom_id": "a", "error": {"message": "line 2: duplicate custom_id 'a'"}, "line": 2}])
    async with cluster(checkpoint, tmp_path) as (_, port):
        summary = await submit(requests, "127.0.0.1", port, out, progress=False, resume=True)
    assert (summary.done, summary.failed) == (1, 0)
    assert [line.get("line") for line in output_lines(out)] == [2, None]


async def test_results_handed_over_twice_are_written_once(checkpoint, tmp_path):
    """A client that dies while Tier 1 hands over its spool wrote part of it; the next resume
    is handed all of it again."""
    requests = write_lines(tmp_path / "in.jsonl", [{"custom_id": f"s{i}", "prompt": "x", "max_tokens": 1}
                                                   for i in range(6)])
    out = tmp_path / "out.jsonl"
    kept = [{"custom_id": f"s{i}", "text": "y", "token_ids": [5], "finish_reason": "length", "prompt_tokens": 1,
             "completion_tokens": 1} for i in range(6)]
    async with cluster(checkpoint, tmp_path) as (tier1, port):
        conn = await open_connection("127.0.0.1", port)  # a batch whose client went away
        await client_handshake(conn, "client", {"batch_id": batch_id(requests, out), "resume": False})
        await conn.recv()
        conn.close()
        while any(batch.conn is not None for batch in tier1.batches.values()):
            await asyncio.sleep(0.01)
        write_lines(tmp_path / "spool" / f"{batch_id(requests, out)}.jsonl", kept)  # finished meanwhile
        write_lines(out, kept[:4])  # handed to a client that died after writing these
        summary = await submit(requests, "127.0.0.1", port, out, progress=False, resume=True)
        assert tier1.stats.admitted == 0
    assert output_lines(out) == kept
    assert (summary.done, summary.failed) == (2, 0)


def test_resume_keeps_the_results_after_an_unreadable_line(tmp_path, caplog):
    """Only a cut-off last line is dropped; one before others used to take every later result with it."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a", "text": "x"}\nnot json\n{"custom_id": "b", "text": "y"}\n{"custom_id": "c", "te')
    done = answered(out)
    assert out.read_text() == '{"custom_id": "a", "text": "x"}\nnot json\n{"custom_id": "b", "text": "y"}\n'
    assert done.ids == {"a", "b"}
    assert "line 2 is not a result line" in caplog.text and "half-written last line" in caplog.text


async def test_a_batch_resumed_under_another_output_path_gets_what_tier1_kept(checkpoint, tmp_path):
    """The client of in.jsonl -> first.jsonl vanishes and its results are spooled; resuming
    in.jsonl into second.jsonl is handed them, and runs only the rest, instead of running every
    line again while the spooled results stay on Tier 1 for nobody."""
    requests = write_lines(tmp_path / "in.jsonl", [
        {"custom_id": f"r{i}", "prompt": f"Request {i}", "max_tokens": 4, "ignore_eos": True} for i in range(12)])
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with cluster(checkpoint, tmp_path) as (tier1, port):
        vanished = asyncio.create_task(submit(requests, "127.0.0.1", port, first, progress=False))
        while not (first.exists() and first.read_text().count("\n") >= 2):
            await asyncio.sleep(0.01)
        vanished.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await vanished
        while tier1.batch_of:  # the rest finishes into the spool
            await asyncio.sleep(0.05)
        kept = sum(path.read_text().count("\n") for path in (tmp_path / "spool").glob("*.jsonl"))
        admitted = tier1.stats.admitted
        summary = await asyncio.wait_for(submit(requests, "127.0.0.1", port, second, progress=False, resume=True),
                                         60)
        assert kept > 0 and tier1.stats.admitted - admitted == 12 - kept
        assert not list((tmp_path / "spool").glob("*.jsonl"))
    assert Counter(line["custom_id"] for line in output_lines(second)) == Counter(f"r{i}" for i in range(12))
    assert (summary.done, summary.failed) == (12, 0)
