"""Helpers for driving the single-process engine and the compute core in tests."""

from __future__ import annotations

from collections import Counter

import torch

from glinthawk.compute.attention import attend
from glinthawk.compute.kvcache import KVStore
from glinthawk.compute.layers import forward, head
from glinthawk.compute.sampling import SamplingParams
from glinthawk.engine import Engine
from glinthawk.requests import PLAIN, Request
from glinthawk.results import is_error

# The variant the session fixtures store as a sharded checkpoint (index + several files).
SHARDED_VARIANT = "mistral"
SHARD_SIZE = "40KB"

# Prompts of clearly different lengths (2, ~14, ~34, ~70 tokens with the test tokenizer).
PROMPTS = [
    "Once",
    "The quick brown fox",
    "Tier one holds the weights; tier two holds the key value cache. Offline batch",
    "Glinthawk splits every transformer layer across two tiers of machines. "
    "The quick brown fox jumps over the lazy dog.",
]


def request(custom_id: str, prompt: str | list[int], line: int = 0, n: int = 1, **params) -> Request:
    return Request(custom_id, line, PLAIN, SamplingParams(**params), prompt=prompt, n=n)


def run_engine(model, tokenizer, requests, kv_tokens: int = 4096, **engine_kwargs) -> tuple[dict[str, dict], Engine]:
    """Run ``requests`` through a fresh Engine; returns (custom_id -> output line, engine).

    Fails if any request is answered twice or not at all, or if KV room leaks.
    """
    engine = Engine(model, tokenizer, kv_tokens=kv_tokens, **engine_kwargs)
    lines: list[dict] = []
    engine.run(list(requests), lines.append)
    ids = Counter(line["custom_id"] for line in lines)
    assert all(n == 1 for n in ids.values()), f"answered more than once: {ids}"
    assert set(ids) == {r.custom_id for r in requests}, "a request got no answer"
    assert engine.store.num_sequences == 0 and engine.store.free_tokens == kv_tokens, "KV room leaked"
    return {line["custom_id"]: line for line in lines}, engine


def ok(line: dict) -> dict:
    assert not is_error(line), line
    return line


@torch.inference_mode()
def prompt_logits(model, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Logits of every prompt position, computed through the KV store in chunks of ``chunk`` tokens."""
    n = len(token_ids)
    chunk = chunk or n
    store = KVStore(model.config.num_layers, model.config.num_kv_heads, model.config.head_dim, n,
                    model.dtype, model.device)
    store.reserve("seq", n)
    ids = torch.tensor(token_ids, dtype=torch.int64, device=model.device)
    out = []
    for start in range(0, n, chunk):
        count = min(chunk, n - start)

        def local(layer, q, k, v, start=start, count=count):
            return attend(store, layer, ["seq"], [start], [count], q, k, v)

        positions = torch.arange(start, start + count, device=model.device)
        x = forward(model, ids[start:start + count], positions, local)
        out.append(head(model, x).float())
    return torch.cat(out)
