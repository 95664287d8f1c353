"""latency at an ordinary batch: ``glinthawk run``'s processes (Tier 1 and Tier 2 nodes on loopback),
a batch of 128, each delay with the micro-batch count Tier 1 measures.

A batch of B sequences through L layers needs a round trip per layer for every token, so with
a one-way delay d no count of micro-batches can give more than B / (L x 2d) tokens/s: the
``bound`` column is that over the 0 ms throughput (above 1: the delay alone does not stop it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import ratio, target
from glinthawk.bench.nodes import run_local_cluster
from glinthawk.bench.workloads import request_lines, token_prompts
from glinthawk.cluster import LocalCluster


def run_ordinary(ctx: BenchContext, knobs: dict, model) -> list[dict]:
    """Each delay with the measured count, and 0 ms as ``glinthawk run`` picks it by default too."""
    batch, prompt, new = knobs["ordinary_batch"], knobs["ordinary_prompt"], knobs["ordinary_new_tokens"]
    nodes, layers = knobs["ordinary_tier2_nodes"], model.config.num_layers
    lines = request_lines(token_prompts(batch, prompt, model.config.vocab_size, seed=5), new)
    # each node could hold the whole batch: placement, not room, decides where sequences go
    kv_tokens = batch * (prompt + new) + 64
    points = [(0.0, None)] + [(float(d), "auto") for d in sorted(knobs["ordinary_delays_ms"])]
    rows = []
    for delay, count in points:
        ctx.echo(f"  batch {batch}, {nodes} Tier 2 processes, delay {delay:g} ms, micro-batches: "
                 f"{count or 'glinthawk run default'}")
        with tempfile.TemporaryDirectory(prefix="glinthawk-bench-latency-") as tmp:
            result = run_local_cluster(ctx.checkpoint(), lines, Path(tmp), dtype=ctx.dtype, tier2_nodes=nodes,
                                       kv_tokens=kv_tokens, micro_batches=count, delay_ms=delay, max_seqs=batch)
        shares = LocalCluster(ctx.checkpoint(), tier2_nodes=nodes, micro_batches=count, delay_ms=delay).shares
        rows.append({"delay_ms": delay, "micro_batches": count or "default", "tok_s": result.tokens_per_s,
                     "micro_batches_used": result.extra.get("micro_batches_used"),
                     "tier1_threads": shares.threads_for("tier1"), "tier2_threads": shares.threads_for("tier2"),
                     "bound_tok_s": batch / (layers * 2 * delay / 1000) if delay else None})
    best_zero = max(r["tok_s"] for r in rows if r["delay_ms"] == 0)
    for row in rows:
        row["ratio_to_best_0ms"] = ratio(row["tok_s"], best_zero)
        row["bound_ratio"] = ratio(row["bound_tok_s"], best_zero) if row["bound_tok_s"] else None
    return rows


def ordinary_at(rows: list[dict], delay: float) -> float | None:
    """The measured count's throughput at ``delay`` over the best 0 ms point of the same workload."""
    return next((r["ratio_to_best_0ms"] for r in rows if r["delay_ms"] == delay and r["micro_batches"] == "auto"),
                None)


def ordinary_report(knobs: dict, rows: list[dict]) -> dict:
    """The part's summary entries, targets (the issue's: the measured count at batch 128) and table."""
    batch = knobs["ordinary_batch"]
    return {
        "summary": {f"ordinary_ratio_at_{d}ms": ordinary_at(rows, d) for d in knobs["ordinary_delays_ms"]},
        "targets": {
            "10ms_ordinary": target(f">= 90% of the best 0 ms throughput at 10 ms, batch {batch}, the count measured "
                                    "by Tier 1", ordinary_at(rows, 10), 0.9),
            "50ms_ordinary": target(f">= 75% of the best 0 ms throughput at 50 ms, batch {batch}, the count measured "
                                    "by Tier 1", ordinary_at(rows, 50), 0.75),
        },
        "tables": [([("delay_ms", "delay ms"), ("micro_batches", "micro-batches"), ("micro_batches_used", "measured"),
                     ("tok_s", "tok/s"), ("ratio_to_best_0ms", "vs best 0ms"), ("bound_ratio", "bound"),
                     ("tier1_threads", "T1 threads")], rows)] if rows else [],
    }
