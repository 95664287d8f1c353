"""Helpers for the two-tier tests: request files, result files, and both ways of running them."""

from __future__ import annotations

import io
import json
from pathlib import Path

from glinthawk.client import submit
from glinthawk.engine import Engine
from glinthawk.net.netem import NetEm
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node
from glinthawk.requests import parse_stream

PROMPTS = [
    ("short", "The quick", 9),
    ("medium", "Tier one holds the weights; tier two holds the key value cache.", 5),
    ("long", "Offline batch inference runs millions of prompts through one model. " * 3, 12),
    ("one", "A", 7),
    ("numbers", "1 2 3 4 5", 10),
    ("fox", "The quick brown fox jumps over the lazy dog.", 3),
]


def write_requests(path: Path, sampling: dict, prompts=PROMPTS) -> Path:
    with open(path, "w") as f:
        for custom_id, prompt, max_tokens in prompts:
            f.write(json.dumps({"custom_id": custom_id, "prompt": prompt, "max_tokens": max_tokens,
                                "ignore_eos": True, **sampling}) + "\n")
    return path


def read_results(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), "a request was answered twice"
    return {line["custom_id"]: line for line in lines}


def single_process(checkpoint, requests: Path, max_batch_tokens: int = 64, kv_tokens: int = 4096) -> dict[str, dict]:
    """The single-process engine's result lines for a requests file, by custom_id (the oracle)."""
    with open(requests, "rb") as f:
        return _engine_results(checkpoint, f, max_batch_tokens, kv_tokens)


def engine_lines(checkpoint, lines: list[dict], max_batch_tokens: int = 64, kv_tokens: int = 4096) -> dict[str, dict]:
    """The same for request lines given as dicts."""
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    return _engine_results(checkpoint, data, max_batch_tokens, kv_tokens)


def _engine_results(checkpoint, stream, max_batch_tokens: int, kv_tokens: int) -> dict[str, dict]:
    model, tokenizer = checkpoint
    out: list[dict] = []
    Engine(model, tokenizer, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens).run(parse_stream(stream),
                                                                                        out.append)
    return {line["custom_id"]: line for line in out}


async def distributed(checkpoint, requests: Path, out: Path, *, nodes: int, micro_batches: int,
                      netem: NetEm | None = None, kv_tokens: int = 4096, max_batch_tokens: int = 64,
                      kv_dtype: str = "auto", **tier1_settings):
    model, tokenizer = checkpoint
    tier2 = [Tier2Node(kv_tokens=kv_tokens, netem=netem, kv_dtype=kv_dtype) for _ in range(nodes)]
    ports = [await node.start("127.0.0.1", 0) for node in tier2]
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{p}" for p in ports], micro_batches=micro_batches,
                      max_batch_tokens=max_batch_tokens, netem=netem, **tier1_settings)
    try:
        port = await tier1.start("127.0.0.1", 0)
        summary = await submit(requests, "127.0.0.1", port, out, progress=False)
    finally:
        await tier1.close()
        for node in tier2:
            await node.close()
    return summary, out


async def losing_a_node(checkpoint, requests: Path, out: Path, *, after_steps: int, kv_tokens: int = 4096,
                        max_batch_tokens: int = 8):
    """Two Tier 2 nodes, one closed once Tier 1 has run ``after_steps`` steps; the submit's summary."""
    import asyncio

    model, tokenizer = checkpoint
    tier2 = [Tier2Node(kv_tokens=kv_tokens) for _ in range(2)]
    ports = [await node.start("127.0.0.1", 0) for node in tier2]
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{p}" for p in ports], micro_batches=2,
                      max_batch_tokens=max_batch_tokens, reconnect_seconds=3600)
    try:
        port = await tier1.start("127.0.0.1", 0)
        run = asyncio.ensure_future(submit(requests, "127.0.0.1", port, out, progress=False))
        while tier1.stats.steps < after_steps and not run.done():
            await asyncio.sleep(0.001)
        await tier2[0].close()
        return await asyncio.wait_for(run, timeout=240)
    finally:
        await tier1.close()
        await tier2[1].close()
