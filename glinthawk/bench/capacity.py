"""capacity: the paper's claim, emulated on one machine.

Tier 1 gets a memory budget of weights + ``tier1_kv_mib`` MiB (by default 48 MiB: about
19% of the benchmark model's bfloat16 weights and room for 4096 tokens, 10% of its float32
ones and room for 2048; a 16 GiB T4 beside a 13.5 GB Llama-2-7B keeps about 19% of the
weights for KV). The single-process
engine must keep its KV cache inside that budget, so its KV capacity is
``tier1_kv_mib / bytes per token`` tokens and its batch at context C is capped at
``capacity // (C - 1)`` sequences. The two-tier run keeps KV on Tier 2 (in this process,
real TCP on loopback) and runs ``two_tier_batch`` sequences at once, by default as one
micro-batch: at these small batches two micro-batches rarely merge on Tier 1, so each
would read all the weights again.

Each run generates ``new_tokens`` tokens per sequence after a prompt of ``C - new_tokens``
tokens. Prefill chunks finish one or two sequences per step, so sequences start (and end)
decoding a step apart: ``new_tokens`` must be well above the batch for the decode phase to
be mostly full-batch steps rather than the shrinking tail (with 16 new tokens, batch 16
decoded at an average batch of 8 and gave 1.8x at 2048 where 128 give 3.3x). Throughput
is measured over the decode phase (from the moment every sequence has its first token to
the last token), since the batch cap is what limits decoding; the end-to-end rate
(prefill included) is reported too. This is an emulation: both tiers share
this machine's cores and memory bandwidth, unlike Tier 2 CPU nodes of their own.

Then ``--kv-dtype int8`` against the model's dtype on a Tier 2 node of a fixed memory
(``capacity_int8``): the batch each holds, its decode throughput, and int8's accuracy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from glinthawk.bench import capacity_int8, knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import ratio, target
from glinthawk.bench.nodes import run_two_tier_inprocess
from glinthawk.bench.report import render_table
from glinthawk.bench.runs import run_engine
from glinthawk.bench.workloads import request_lines, token_prompts

DEFAULTS, QUICK = knobs.CAPACITY, knobs.CAPACITY_QUICK
MIB = 1 << 20


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("capacity", DEFAULTS, QUICK)
    if len(knobs["two_tier_batch"]) != len(knobs["contexts"]):
        raise ValueError("capacity.two_tier_batch needs one batch size per context")
    model, tokenizer = ctx.load()
    info = ctx.model_info()
    bytes_per_token = info["kv_bytes_per_token"]
    single_kv_tokens = int(knobs["tier1_kv_mib"] * MIB) // bytes_per_token
    run_engine(model, tokenizer, request_lines(token_prompts(2, 4, info["vocab"]), 2), kv_tokens=64)  # warm-up
    rows = [_context_row(ctx, knobs, info, context, big_batch, single_kv_tokens)
            for context, big_batch in zip(knobs["contexts"], knobs["two_tier_batch"])]
    at_2048 = next((r["decode_ratio"] for r in rows if r["context"] == 2048), None)
    int8 = capacity_int8.run(ctx, knobs, model, tokenizer, info)
    ctx.echo(render_table(capacity_int8.TABLE, int8["rows"]))
    return {
        "config": {**knobs, "tier1_budget_bytes": info["weight_bytes"] + int(knobs["tier1_kv_mib"] * MIB),
                   "single_kv_tokens": single_kv_tokens, "two_tier_mode": "inprocess, 1 Tier 2 node",
                   "scaled_down": True},
        "model": info,
        "baseline": {"name": "single-process engine inside the Tier 1 memory budget, same run"},
        "results": rows,
        "kv_int8": int8,
        "summary": {**{f"decode_ratio_at_{r['context']}": r["decode_ratio"] for r in rows},
                    **{f"int8_batch_ratio_at_{r['context']}": r["batch_ratio"] for r in int8["rows"]},
                    **{f"int8_decode_ratio_at_{r['context']}": r["decode_ratio"] for r in int8["rows"]}},
        "targets": {"ratio_2048": target(">= 3x the single-process throughput at context 2048 (decode phase)",
                                         at_2048, 3.0),
                    "int8_batch": target(">= 1.8x the batch of the model's dtype at the same Tier 2 memory "
                                         "(--kv-dtype int8)", int8["min_batch_ratio"], 1.8)},
        "notes": _notes(knobs, rows),
        "table": ([("context", "context"), ("single_batch", "single batch"), ("single_decode_tok_s", "single dec tok/s"),
                   ("two_tier_batch", "2-tier batch"), ("two_tier_decode_tok_s", "2-tier dec tok/s"),
                   ("decode_ratio", "ratio"), ("single_tok_s", "single tok/s"), ("two_tier_tok_s", "2-tier tok/s"),
                   ("end_to_end_ratio", "e2e ratio")], rows),
    }


def _context_row(ctx: BenchContext, knobs: dict, info: dict, context: int, big_batch: int,
                 single_kv_tokens: int) -> dict:
    """One context: the single process inside Tier 1's KV budget against two tiers at ``big_batch``."""
    model, tokenizer = ctx.load()
    new = knobs["new_tokens"]
    prompt = context - new
    if prompt < 1:
        raise ValueError(f"context {context} leaves no room for a prompt before {new} new tokens")
    reserve = prompt + new - 1
    single_batch = min(big_batch, single_kv_tokens // reserve)
    lines = request_lines(token_prompts(big_batch, prompt, info["vocab"], seed=5), new)
    row = {"context": context, "prompt": prompt, "new_tokens": new, "single_batch": single_batch,
           "two_tier_batch": big_batch, "single_kv_tokens": single_kv_tokens}
    if single_batch > 0:
        ctx.echo(f"  context {context}: single process, batch {single_batch} (KV budget {single_kv_tokens} tokens)")
        single = run_engine(model, tokenizer, lines[:single_batch], kv_tokens=single_kv_tokens,
                            max_batch_tokens=knobs["max_batch_tokens"], max_seqs=single_batch)
        row.update({"single_tok_s": single.tokens_per_s, "single_decode_tok_s": single.decode_tokens_per_s(),
                    "single_seconds": single.seconds})
    else:
        ctx.echo(f"  context {context}: single process cannot hold one sequence in {single_kv_tokens} KV tokens")
        row.update({"single_tok_s": 0.0, "single_decode_tok_s": 0.0, "single_seconds": None})
    ctx.echo(f"  context {context}: two-tier, batch {big_batch}")
    with tempfile.TemporaryDirectory(prefix="glinthawk-bench-capacity-") as tmp:
        two = run_two_tier_inprocess(model, tokenizer, lines, Path(tmp), nodes=1,
                                     micro_batches=knobs["micro_batches"], kv_tokens=big_batch * (reserve + 1),
                                     max_batch_tokens=knobs["max_batch_tokens"], max_seqs=big_batch)
    row.update({"two_tier_tok_s": two.tokens_per_s, "two_tier_decode_tok_s": two.decode_tokens_per_s(),
                "two_tier_seconds": two.seconds})
    row["decode_ratio"] = ratio(row["two_tier_decode_tok_s"], row["single_decode_tok_s"] or None)
    row["end_to_end_ratio"] = ratio(row["two_tier_tok_s"], row["single_tok_s"] or None)
    return row


def _notes(knobs: dict, rows: list[dict]) -> list[str]:
    notes = [
        ("emulation on one machine: Tier 1's memory budget is imposed on the single-process engine's KV capacity; "
         "the two-tier run's Tier 2 shares this machine's cores and memory bandwidth"),
        "decode tok/s: from every sequence having its first token to the last token; tok/s: whole run",
        (f"sizes chosen to fit a ~25 minute 'bench all' on a 2-core machine: two-tier batches "
         f"{knobs['two_tier_batch']} at contexts {knobs['contexts']} (the paper's runs use far larger batches)"),
    ]
    notes.append("int8: a Tier 2 node of the memory that holds int8_base_batch sequences in the model's dtype, "
                 "with --kv-dtype auto and int8, back to back; accuracy: greedy agreement and mean |delta logit| of "
                 "the bundled model over an int8 cache (kv_int8.quality)")
    if any(r["single_batch"] == 0 for r in rows):
        notes.append("where the single process cannot hold one sequence its throughput is 0 and the ratio is null "
                     "(unbounded)")
    return notes


def plot(result: dict, figure) -> None:
    left, right = figure.subplots(1, 2)
    rows = result["results"]
    labels = [str(r["context"]) for r in rows]
    positions = range(len(rows))
    width = 0.38
    left.bar([p - width / 2 for p in positions], [r["single_decode_tok_s"] or 0 for r in rows], width,
             label="single process (Tier 1 budget)", color="tab:gray")
    left.bar([p + width / 2 for p in positions], [r["two_tier_decode_tok_s"] or 0 for r in rows], width,
             label="two-tier", color="tab:blue")
    for p, r in zip(positions, rows):
        text = f"{r['decode_ratio']:.1f}x" if r["decode_ratio"] else "single\ndoes not fit"
        left.annotate(text, (p + width / 2, r["two_tier_decode_tok_s"] or 0), ha="center", va="bottom", fontsize=8)
    left.set_xticks(list(positions), labels)
    left.set_xlabel("context (tokens)")
    left.set_ylabel("decode tok/s")
    left.set_title("throughput within the Tier 1 memory budget (emulation)")
    left.legend(fontsize=8)
    right.bar([p - width / 2 for p in positions], [r["single_batch"] for r in rows], width, color="tab:gray",
              label="single-process batch")
    right.bar([p + width / 2 for p in positions], [r["two_tier_batch"] for r in rows], width, color="tab:blue",
              label="two-tier batch")
    right.set_xticks(list(positions), labels)
    right.set_xlabel("context (tokens)")
    right.set_ylabel("sequences at once")
    right.set_title("batch that fits")
    right.legend(fontsize=8)
