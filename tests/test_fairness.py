"""Tier 1 shares its queue fairly: batches (clients' submissions) take turns for KV room."""

from __future__ import annotations

import asyncio
import json

from glinthawk.client import submit
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node

from cluster_util import read_results

STOPS = [f"never-{i}-" for i in range(500)]  # costly to match, and never hit


def lines_in(path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


async def test_a_small_batch_behind_a_large_costly_one_gets_its_turn(checkpoint, tmp_path):
    """Four requests submitted while 64 of a large, stop-string-heavy batch wait for room finish
    after a few of the large batch's results, not after every large request queued before
    them: each batch reads its client up to its share of the queue, and batches take turns."""
    model, tokenizer = checkpoint
    large_in, small_in = tmp_path / "large.jsonl", tmp_path / "small.jsonl"
    large_in.write_text("".join(json.dumps({"custom_id": f"L{i}", "prompt": f"Large request {i}", "max_tokens": 6,
                                            "ignore_eos": True, "stop": STOPS}) + "\n" for i in range(200)))
    small_in.write_text("".join(json.dumps({"custom_id": f"S{i}", "prompt": f"Small {i}", "max_tokens": 6,
                                            "ignore_eos": True}) + "\n" for i in range(4)))
    large_out, small_out = tmp_path / "large.out.jsonl", tmp_path / "small.out.jsonl"
    tier2 = Tier2Node(kv_tokens=4096)
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{await tier2.start('127.0.0.1', 0)}"], micro_batches=1,
                      max_seqs=4, max_batch_tokens=64, max_waiting=64)
    try:
        port = await tier1.start("127.0.0.1", 0)
        large = asyncio.create_task(submit(large_in, "127.0.0.1", port, large_out, progress=False))
        while len(tier1.waiting) < 64 or lines_in(large_out) < 2:
            await asyncio.sleep(0.01)
        before = lines_in(large_out)
        summary = await asyncio.wait_for(submit(small_in, "127.0.0.1", port, small_out, progress=False), 120)
        during = lines_in(large_out) - before
        assert not large.done()
        large.cancel()
    finally:
        await tier1.close()
        await tier2.close()
    assert summary.done == 4 and len(read_results(small_out)) == 4
    assert during < 32, f"the small batch waited for {during} of the large batch's results"
