"""Timing, ratios to a baseline, targets, and the roofline a decode step is measured against."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def best_of(fn: Callable[[], Any], repeats: int, warmup: int = 1,
            device: torch.device | str = "cpu") -> tuple[float, list[float]]:
    """Best wall time of ``repeats`` calls (after ``warmup`` untimed ones), and all samples.

    On CUDA each call is timed to the end of the work it queued, not to its return.
    """
    finish = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        finish()
        started = time.perf_counter()
        fn()
        finish()
        samples.append(time.perf_counter() - started)
    return min(samples), samples


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0 or not math.isfinite(value) or not math.isfinite(baseline):
        return None
    return value / baseline


def target(description: str, value: float | None, threshold: float, higher_is_better: bool = True) -> dict:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": description, "value": value, "threshold": threshold, "met": met}


@dataclass(frozen=True)
class Roofline:
    """Per-token costs of a decode step, from the model's geometry.

    Bytes read per step: every weight the step multiplies by (all layers, final norm, LM
    head; the embedding only for the rows it looks up) plus each sequence's cached K/V.
    FLOPs: 2 per weight per token (the LM head counted for every sampled row) plus
    attention's q.K and p.V over the context.
    """

    weight_bytes: int
    linear_params: int
    embed_row_bytes: int
    kv_bytes_per_token: int
    attn_flops_per_context_token: int  # per new token, per cached token it attends to (all layers)
    read_bandwidth: float  # bytes/s
    matmul_peak: float  # FLOP/s

    @classmethod
    def of(cls, model, read_bandwidth: float, matmul_peak: float) -> Roofline:
        cfg = model.config
        itemsize = model.embed_tokens.element_size()
        # Read per step: every weight but the embedding table, of which a step gathers a few rows,
        # unless the table itself is the LM head.
        shared = model.lm_head is model.embed_tokens
        weight_bytes = model.weight_bytes() - (0 if shared else model.embed_tokens.numel() * itemsize)
        linear = sum(t.numel() for layer in model.layers for t in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
        linear += model.lm_head.numel()
        return cls(weight_bytes, linear, cfg.hidden_size * itemsize, cfg.kv_bytes_per_token(itemsize),
                   4 * cfg.num_layers * cfg.num_heads * cfg.head_dim, read_bandwidth, matmul_peak)

    def step(self, batch: int, context_tokens: int) -> dict[str, float]:
        """Floors of one decode step of ``batch`` sequences attending ``context_tokens`` cached tokens in all."""
        nbytes = self.weight_bytes + batch * self.embed_row_bytes + context_tokens * self.kv_bytes_per_token
        flops = 2 * batch * self.linear_params + context_tokens * self.attn_flops_per_context_token
        return {"bytes": nbytes, "flops": flops, "bytes_s": nbytes / self.read_bandwidth,
                "flops_s": flops / self.matmul_peak}

    def floor_seconds(self, batch: int, context_tokens: int) -> float:
        step = self.step(batch, context_tokens)
        return max(step["bytes_s"], step["flops_s"])
