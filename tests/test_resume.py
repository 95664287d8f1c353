"""Resuming a batch: a client that dies and one that takes its batch over, or starts it again."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from pathlib import Path

from glinthawk.client import batch_id, submit
from glinthawk.net.connection import client_handshake, open_connection
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
