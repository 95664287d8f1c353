"""capacity, int8 part: what ``--kv-dtype int8`` buys a Tier 2 node of a fixed memory.

At each context C the node gets the memory that holds ``int8_base_batch`` sequences of C
tokens in the model's dtype; the same node with ``--kv-dtype int8`` then announces its
own capacity (scales included), and Tier 1 runs as many sequences as that holds. Both runs
are the in-process two-tier emulation of the main suite (one Tier 2 node, one
micro-batch), back to back in one process after a warm-up run, ``int8_repeats`` times in
alternating order (base first, then int8 first), best of each kept, so the ratios compare
like with like on a shared machine. Accuracy comes from ``kvquality`` on the bundled (trained) model: greedy
agreement and mean |delta logit| against the unquantized cache, per dtype.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from glinthawk import DEFAULT_MODEL
from glinthawk.bench import knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import ratio
from glinthawk.bench.nodes import run_two_tier_inprocess
from glinthawk.bench.workloads import request_lines, token_prompts
from glinthawk.compute.kvcache import bytes_per_token

DEFAULTS, QUICK = knobs.CAPACITY_INT8, knobs.CAPACITY_INT8_QUICK
QUALITY_PROMPTS = ["The built-in function", "A class definition", "When an exception is raised",
                   "The import statement", "String literals can be enclosed in", "The for statement is used to"]


def run(ctx: BenchContext, knobs: dict, model, tokenizer, info: dict) -> dict:
    """{"rows": per context, "quality": per dtype, "min_batch_ratio"}."""
    if len(knobs["int8_base_batch"]) != len(knobs["int8_contexts"]):
        raise ValueError("capacity.int8_base_batch needs one batch size per context")
    cfg = model.config
    int8_bytes = bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.int8)
    with tempfile.TemporaryDirectory(prefix="glinthawk-bench-int8-") as tmp:  # warm-up: first-run costs
        run_two_tier_inprocess(model, tokenizer, request_lines(token_prompts(2, 8, info["vocab"]), 4), Path(tmp),
                               nodes=1, micro_batches=1, kv_tokens=64, kv_dtype="int8")
    rows = [_point(ctx, knobs, model, tokenizer, info, context, batch, int8_bytes)
            for context, batch in zip(knobs["int8_contexts"], knobs["int8_base_batch"])]
    ctx.echo("  int8 accuracy on the bundled model")
    quality = {dtype: _quality(dtype, knobs["int8_quality_tokens"]) for dtype in ("float32", "bfloat16")}
    return {"rows": rows, "quality": quality, "kv_bytes_per_token": {"model_dtype": info["kv_bytes_per_token"],
                                                                     "int8": int8_bytes},
            "min_batch_ratio": min((r["batch_ratio"] for r in rows), default=None)}


def _point(ctx: BenchContext, knobs: dict, model, tokenizer, info: dict, context: int, base_batch: int,
           int8_bytes: int) -> dict:
    new = knobs["int8_new_tokens"]
    prompt = context - new
    if prompt < 1:
        raise ValueError(f"context {context} leaves no room for a prompt before {new} new tokens")
    memory = base_batch * context * info["kv_bytes_per_token"]
    batches = {"auto": base_batch, "int8": memory // int8_bytes // context}
    lines = request_lines(token_prompts(batches["int8"], prompt, info["vocab"], seed=7), new)
    row = {"context": context, "tier2_memory_bytes": memory, "base_batch": base_batch, "int8_batch": batches["int8"],
           "batch_ratio": batches["int8"] / base_batch, "samples": {"base": [], "int8": []}}
    for repeat in range(knobs["int8_repeats"]):
        for kv_dtype in (("auto", "int8") if repeat % 2 == 0 else ("int8", "auto")):
            batch = batches[kv_dtype]
            ctx.echo(f"  context {context}: Tier 2 of {memory / 2**20:.1f} MiB, --kv-dtype {kv_dtype}, batch {batch}")
            with tempfile.TemporaryDirectory(prefix="glinthawk-bench-int8-") as tmp:
                result = run_two_tier_inprocess(model, tokenizer, lines[:batch], Path(tmp), nodes=1, micro_batches=1,
                                                kv_memory=memory, kv_dtype=kv_dtype, max_seqs=batch)
            row["samples"]["base" if kv_dtype == "auto" else "int8"].append(
                {"decode_tok_s": result.decode_tokens_per_s(), "tok_s": result.tokens_per_s})
    for name, samples in row["samples"].items():
        row[f"{name}_decode_tok_s"] = max((s["decode_tok_s"] or 0.0 for s in samples), default=None) or None
        row[f"{name}_tok_s"] = max(s["tok_s"] for s in samples)
    row["decode_ratio"] = ratio(row["int8_decode_tok_s"], row["base_decode_tok_s"])
    row["end_to_end_ratio"] = ratio(row["int8_tok_s"], row["base_tok_s"])
    return row


def _quality(dtype: str, new_tokens: int) -> dict:
    """Greedy agreement and |delta logit| of an int8 cache on the bundled model in ``dtype``."""
    from glinthawk.bench.kvquality import compare
    from glinthawk.compute.loader import load_model
    from glinthawk.tokenizer import Tokenizer

    model = load_model(DEFAULT_MODEL, dtype=dtype, device="cpu")
    tokenizer = Tokenizer(DEFAULT_MODEL, extra_eos_ids=model.config.eos_token_ids)
    runs = [compare(model, tokenizer.encode(p), new_tokens) for p in QUALITY_PROMPTS]
    return {"prompts": len(runs), "steps": new_tokens, "agree": [r["agree"] for r in runs],
            "all_agree": sum(r["agree"] == new_tokens for r in runs),
            "mean_abs_dlogit": sum(r["mean_abs_dlogit"] for r in runs) / len(runs),
            "max_abs_dlogit": max(r["max_abs_dlogit"] for r in runs),
            "mean_abs_logit": sum(r["mean_abs_logit"] for r in runs) / len(runs)}


TABLE = [("context", "context"), ("tier2_memory_bytes", "Tier 2 bytes"), ("base_batch", "base batch"),
         ("int8_batch", "int8 batch"), ("batch_ratio", "batch ratio"), ("base_decode_tok_s", "base dec tok/s"),
         ("int8_decode_tok_s", "int8 dec tok/s"), ("decode_ratio", "dec ratio"), ("end_to_end_ratio", "e2e ratio")]
