"""Shared prompt prefixes end to end: requests that start alike read one prefix's KV, filled
once, in the engine and across the two tiers; outputs equal a run without the cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cluster_util import read_results
from engine_util import request, run_engine
from glinthawk.client import submit
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node
from glinthawk.prefix import BLOCK_TOKENS, MIN_TOKENS, PrefixCache, shared_length
from glinthawk.requests import parse_line
from glinthawk.sequence import Sequence

SYSTEM = list(range(3, 3 + 70))  # 70 prompt tokens every request starts with


def prompts(count: int, start: list[int] = SYSTEM) -> list[list[int]]:
    return [start + [100 + i, 200 + i % 3, 7] for i in range(count)]


def requests(count: int, **params) -> list:
    params = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, **params}
    return [request(f"r{i}", prompt, line=i + 1, **params) for i, prompt in enumerate(prompts(count))]


def assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    """The same lines: equal tokens and text; log-probs equal to float rounding (the prefix's K/V
    are computed in another batch, so their last bits may differ)."""
    assert got.keys() == want.keys()
    for custom_id, line in want.items():
        other = got[custom_id]
        assert {k: v for k, v in other.items() if k != "logprobs"} == {k: v for k, v in line.items() if k != "logprobs"}
        for mine, theirs in zip(other.get("logprobs") or [], line.get("logprobs") or [], strict=True):
            assert mine["token_id"] == theirs["token_id"]
            assert mine["logprob"] == pytest.approx(theirs["logprob"], abs=1e-4)


def seq(prompt: list[int], **params) -> Sequence:
    return Sequence(request("x", prompt, **params), list(prompt), seed=0)


# -- which prefix -----------------------------------------------------------------------
def test_the_shared_length_saves_the_most_prefill_in_whole_blocks():
    base = seq(SYSTEM + [1, 2])
    assert shared_length(base, []) == 0  # no one to share with
    assert shared_length(base, [seq(SYSTEM + [9])]) == 64  # 70 shared, cut to whole blocks
    # One peer shares 100 tokens, three share 40: 3 x 32 saved beats 1 x 96.
    long_start = list(range(500, 600))
    base = seq(long_start + [1])
    peers = [seq(long_start + [2])] + [seq(long_start[:40] + [i] * 70) for i in range(3)]
    assert shared_length(base, peers) == 32
    same = SYSTEM[:MIN_TOKENS + 1]
    assert shared_length(seq(same), [seq(same)]) == MIN_TOKENS  # the same prompt: all but its last token
    short = SYSTEM[:BLOCK_TOKENS]
    assert shared_length(seq(short), [seq(short)]) == 0  # too short to be worth a prefill of its own
    assert shared_length(seq(SYSTEM[:40] + [1]), [seq(SYSTEM[:20] + [2] * 21)]) == 0  # 20 shared: under MIN_TOKENS
    assert shared_length(seq(SYSTEM, prompt_logprobs=1), [seq(SYSTEM)]) == 0  # its prompt's log-probs need its prefill
    assert 64 % BLOCK_TOKENS == 0


def test_the_cache_finds_the_longest_prefix_and_frees_idle_ones_oldest_first():
    cache = PrefixCache()
    short = cache.add(SYSTEM[:32], seq(SYSTEM))
    long = cache.add(SYSTEM[:64], seq(SYSTEM))
    assert cache.find(SYSTEM + [1]) == [long]
    assert cache.find(SYSTEM[:64]) == [short]  # a reader keeps a token of its own
    assert cache.decide(seq(SYSTEM + [1]), []).kind == "wait"  # not filled yet
    long.ready = short.ready = True
    reader = seq(SYSTEM + [1])
    decision = cache.decide(reader, [])
    assert decision.kind == "read" and decision.copies == [long]
    reader.share(long)
    assert reader.num_cached == 64 and reader.reserve_tokens == len(SYSTEM) + 1 + 16 - 1 - 64
    assert reader.room == [reader.reserve_tokens, long.holder.id]
    cache.touch(short)
    assert cache.idle() == [short]  # long is read
    reader.unshare()
    cache.touch(long)
    assert cache.idle() == [short, long] and reader.num_cached == 0
    cache.drop(long)
    assert cache.find(SYSTEM + [1]) == [short]
    assert PrefixCache(enabled=False).decide(seq(SYSTEM + [1]), [seq(SYSTEM + [2])]).kind == "alone"


# -- the engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"temperature": 0.8, "seed": 5, "logprobs": 2}])
def test_engine_outputs_are_the_same_with_the_cache(checkpoint, params):
    model, tokenizer = checkpoint
    reqs = requests(9, **params) + [request("alone", [5, 6, 7], line=20, max_tokens=4, temperature=0)]
    without, plain = run_engine(model, tokenizer, reqs, prefix_cache=False, max_batch_tokens=128)
    with_cache, shared = run_engine(model, tokenizer, reqs, max_batch_tokens=128)  # run_engine: no KV left behind
    assert_same(with_cache, without)
    # The 64-token prefix is computed once instead of nine times.
    assert plain.stats.prompt_tokens - shared.stats.prompt_tokens == 8 * 64


def test_engine_prompt_logprobs_are_not_read_from_a_prefix(checkpoint):
    model, tokenizer = checkpoint
    reqs = requests(4) + requests(1, prompt_logprobs=1)[:0] + [
        request("scored", SYSTEM + [9, 9], line=30, max_tokens=2, temperature=0, prompt_logprobs=1)]
    without, _ = run_engine(model, tokenizer, reqs, prefix_cache=False)
    with_cache, _ = run_engine(model, tokenizer, reqs)
    assert_same(with_cache, without)
    assert len(with_cache["scored"]["prompt_logprobs"]) == len(SYSTEM) + 2


def test_engine_takes_back_an_unread_prefix_when_room_runs_out(checkpoint):
    """Two groups with different prefixes in a store that holds only one group's KV at a time."""
    model, tokenizer = checkpoint
    other = list(range(400, 470))
    reqs = requests(3) + [request(f"o{i}", p, line=10 + i, max_tokens=6, temperature=0, ignore_eos=True)
                          for i, p in enumerate(prompts(3, other))]
    without, _ = run_engine(model, tokenizer, reqs, prefix_cache=False, kv_tokens=240, max_seqs=3)
    with_cache, engine = run_engine(model, tokenizer, reqs, kv_tokens=240, max_seqs=3)
    assert_same(with_cache, without)


# -- two tiers ----------------------------------------------------------------------------
async def two_tier(checkpoint, tmp_path: Path, lines: list[dict], *, nodes: int = 2, kill_after_steps: int | None = None,
                   **tier1_options) -> tuple[dict[str, dict], Tier1Node, list[int]]:
    """Run ``lines`` on Tier 1 + ``nodes`` Tier 2 nodes; results, Tier 1, and each node's peak of written KV tokens."""
    model, tokenizer = checkpoint
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / f"out-{tier1_options.get('prefix_cache', True)}-{kill_after_steps}.jsonl"
    tier2 = [Tier2Node(kv_tokens=4096) for _ in range(nodes)]
    ports = [await node.start("127.0.0.1", 0) for node in tier2]
    tier1 = Tier1Node(model, tokenizer, [f"127.0.0.1:{p}" for p in ports], micro_batches=2, max_batch_tokens=128,
                      reconnect_seconds=3600, **tier1_options)
    peaks = [0] * nodes
    try:
        port = await tier1.start("127.0.0.1", 0)
        run = asyncio.ensure_future(submit(path, "127.0.0.1", port, out, progress=False))
        while not run.done():
            for i, node in enumerate(tier2):
                if node.session is not None:
                    peaks[i] = max(peaks[i], node.session.store.filled_tokens)
            if kill_after_steps is not None and tier1.stats.steps >= kill_after_steps and tier2[0].session:
                await tier2[0].close()
                kill_after_steps = None
            await asyncio.sleep(0.002)
        await run
    finally:
        await tier1.close()
        for node in tier2:
            await node.close()
    return read_results(out), tier1, peaks


def as_lines(reqs) -> list[dict]:
    return [{"custom_id": r.custom_id, "prompt": r.prompt, "max_tokens": r.params.max_tokens,
             "temperature": r.params.temperature, "ignore_eos": True, "seed": 3} for r in reqs]


async def test_two_tiers_read_a_prefix_filled_once_per_node(checkpoint, tmp_path):
    lines = as_lines(requests(24))
    without, plain, plain_peaks = await two_tier(checkpoint, tmp_path, lines, prefix_cache=False)
    with_cache, tier1, peaks = await two_tier(checkpoint, tmp_path, lines)
    assert_same(with_cache, without)
    saved = plain.stats.prompt_tokens - tier1.stats.prompt_tokens
    assert 22 * 64 <= saved <= 23 * 64  # a copy on each node (or one): the prefix is computed once or twice
    assert sum(peaks) < sum(plain_peaks) / 2


async def test_losing_a_node_rebuilds_the_readers_of_its_prefix(checkpoint, tmp_path, caplog):
    lines = as_lines(requests(16))
    for line in lines:
        line["max_tokens"] = 12
    without, _, _ = await two_tier(checkpoint, tmp_path, lines, prefix_cache=False)
    with_loss, tier1, _ = await two_tier(checkpoint, tmp_path, lines, kill_after_steps=4)
    assert_same(with_loss, without)
    assert "sequences on a lost Tier 2 node go back to the queue" in caplog.text


async def test_pipeline_stages_read_a_prefix_on_every_stage(four_layers, tmp_path):
    """Two stages, two Tier 2 nodes each: readers and n choices give the engine's tokens, the
    prefix is filled once per copy on each stage's nodes, and every node's KV is given back."""
    from glinthawk.compute.loader import load_model
    from glinthawk.tokenizer import Tokenizer
    from pipeline_util import pipeline

    directory = four_layers("llama_gqa")
    model, tokenizer = load_model(directory, dtype="float32", device="cpu"), Tokenizer(directory)
    lines = as_lines(requests(12)) + [{"custom_id": "n", "prompt": SYSTEM + [9], "n": 3, "max_tokens": 5,
                                       "temperature": 0.7, "seed": 4, "ignore_eos": True}]
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    engine, _ = run_engine(model, tokenizer, [parse_line(i + 1, json.dumps(line).encode())
                                              for i, line in enumerate(lines)], prefix_cache=False)
    async with pipeline(directory, [2], nodes_per_stage=2, micro_batches=2, max_batch_tokens=128) as p:
        await submit(path, "127.0.0.1", p.port, out, progress=False)
        assert p.tier1.stats.prompt_tokens < sum(len(line["prompt"]) for line in lines) - 10 * 64
        p.tier1.placer.evict_all()
        await asyncio.sleep(0.2)
        assert all(node.session.store.num_sequences == 0 for nodes in p.tier2 for node in nodes if node.session)
    assert_same(read_results(out), engine)
