"""pipeline: Tier 1 in 1, 2, 3 stages on loopback, and the automatic micro-batch count
against the best one picked by hand.

Each configuration is ``glinthawk run --stages S`` (LocalCluster: a Tier 1 process per
stage, each with its own Tier 2 nodes), with and without injected delay; only the submit is
timed. Every stage count runs with the count Tier 1 measures (``node/pacing.py``) and with
each hand-picked count, ``rounds`` times in turn (each round starting one count later); each
figure is the median of its rounds, and the figure is the automatic count's over the best
hand-picked one's, from the same run. One round sets one sample of the automatic count
against the best of four samples, which a host's run-to-run spread alone holds under 1. On a
machine with fewer cores than processes the stages compete for them, so only ratios mean
anything.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from glinthawk.bench import knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import ratio, target
from glinthawk.bench.nodes import run_local_cluster
from glinthawk.bench.workloads import request_lines, token_prompts

DEFAULTS, QUICK = knobs.PIPELINE, knobs.PIPELINE_QUICK


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("pipeline", DEFAULTS, QUICK)
    model, _ = ctx.load()
    batch, prompt, new = knobs["batch"], knobs["prompt"], knobs["new_tokens"]
    lines = request_lines(token_prompts(batch, prompt, model.config.vocab_size, seed=4), new)
    kv_tokens = batch * (prompt + new)
    stage_counts = [s for s in knobs["stages"] if s <= model.config.num_layers]
    counts = ["auto", *knobs["micro_batches"]]
    rows = []
    for delay in knobs["delay_ms"]:
        for stages in stage_counts:
            runs: dict = {count: [] for count in counts}
            for round_ in range(knobs["rounds"]):
                for count in round_order(counts, round_):
                    ctx.echo(f"  {stages} stage(s), {delay} ms delay, micro-batches {count}, round {round_ + 1}")
                    with tempfile.TemporaryDirectory(prefix="glinthawk-bench-pipeline-") as tmp:
                        runs[count].append(run_local_cluster(
                            ctx.checkpoint(), lines, Path(tmp), dtype=ctx.dtype, tier2_nodes=knobs["tier2_nodes"],
                            kv_tokens=kv_tokens, micro_batches=count, max_batch_tokens=knobs["max_batch_tokens"],
                            max_seqs=batch, delay_ms=delay, stages=stages))
            rows += [_row(stages, delay, count, results) for count, results in runs.items()]
    for row in rows:
        same = [r for r in rows if (r["stages"], r["delay_ms"]) == (row["stages"], row["delay_ms"])]
        best = max((r["tok_s"] for r in same if r["micro_batches"] != "auto"), default=None)
        one_stage_auto = next((r["tok_s"] for r in rows if r["stages"] == 1 and r["delay_ms"] == row["delay_ms"]
                               and r["micro_batches"] == "auto"), None)
        row.update(ratio_to_best_hand_picked=ratio(row["tok_s"], best),
                   ratio_to_one_stage=ratio(row["tok_s"], one_stage_auto))
    autos = [r["ratio_to_best_hand_picked"] for r in rows if r["micro_batches"] == "auto"]
    worst = min((a for a in autos if a is not None), default=None)
    return {
        "config": {**knobs, "kv_tokens_per_node": kv_tokens, "timed": "submit only (cluster up, models loaded)"},
        "model": ctx.model_info(),
        "baseline": {"name": "the best hand-picked micro-batch count for the same stages and delay, same run"},
        "results": rows,
        "summary": {f"auto_{r['stages']}stages_{r['delay_ms']}ms": r["ratio_to_best_hand_picked"]
                    for r in rows if r["micro_batches"] == "auto"},
        "targets": {"auto_count": target(">= 0.95 of the best hand-picked micro-batch count (worst configuration)",
                                         worst, 0.95)},
        "notes": [f"every stage and Tier 2 node is a process on this machine's {os.cpu_count()} cores: the stages "
                  "compete for them, so more stages cannot be faster here; compare counts within a stage count",
                  f"{knobs['tier2_nodes']} Tier 2 node(s) per stage"],
        "table": ([("stages", "stages"), ("delay_ms", "delay ms"), ("micro_batches", "micro-batches"),
                   ("micro_batches_used", "used"), ("tok_s", "tok/s"), ("ratio_to_best_hand_picked", "vs best hand-picked"),
                   ("ratio_to_one_stage", "vs 1 stage")], rows),
    }


def round_order(counts: list, round_: int) -> list:
    """The counts in the order round ``round_`` runs them: each round starts one later, so no
    count always runs first (a host's load drifts within a round)."""
    shift = round_ % len(counts)
    return counts[shift:] + counts[:shift]


def _row(stages: int, delay: float, count, results: list) -> dict:
    """One configuration's figures: the median of its rounds' throughput, and each round's."""
    return {"stages": stages, "delay_ms": delay, "micro_batches": count,
            "micro_batches_used": [r.extra["micro_batches_used"] for r in results],
            "tok_s": statistics.median(r.tokens_per_s for r in results),
            "rounds_tok_s": [r.tokens_per_s for r in results], "seconds": [r.seconds for r in results]}


def plot(result: dict, figure) -> None:
    ax = figure.subplots(1, 1)
    rows = result["results"]
    labels = [f"{r['stages']}st {r['delay_ms']}ms\n{r['micro_batches']}" for r in rows]
    colors = ["tab:orange" if r["micro_batches"] == "auto" else "tab:blue" for r in rows]
    ax.bar(labels, [r["tok_s"] for r in rows], color=colors)
    ax.set_ylabel("generated tok/s")
    ax.tick_params(axis="x", labelsize=6)
    cfg = result["config"]
    ax.set_title(f"pipeline stages, automatic (orange) vs hand-picked micro-batch counts: {cfg['batch']} requests, "
                 f"prompt {cfg['prompt']}, {cfg['new_tokens']} new", fontsize=8)
