"""cluster: the two-tier runtime against the single-process Engine on the same work.

``mode=processes`` (default) is what ``glinthawk run`` does: N Tier 2 processes and one
Tier 1 process on loopback (``glinthawk.cluster.LocalCluster``), the requests sent with
``glinthawk.client.submit``; only the submit is timed (not process start-up or model
loading). ``mode=inprocess`` runs the same nodes inside this process instead. The
baseline, the single-process Engine, runs the same requests in this process, once before
and after every cluster run; each cluster run is compared with the mean of the two
single-process runs around it (the machine is shared: this cancels slow drifts).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from glinthawk.bench import knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import ratio, target
from glinthawk.bench.nodes import run_local_cluster, run_two_tier_inprocess
from glinthawk.bench.runs import RunResult, run_engine
from glinthawk.bench.workloads import request_lines, token_prompts
from glinthawk.cluster import LocalCluster

DEFAULTS, QUICK = knobs.CLUSTER, knobs.CLUSTER_QUICK


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("cluster", DEFAULTS, QUICK)
    if knobs["mode"] not in ("processes", "inprocess"):
        raise ValueError(f"cluster.mode must be processes or inprocess, got {knobs['mode']!r}")
    model, tokenizer = ctx.load()
    batch, prompt, new = knobs["batch"], knobs["prompt"], knobs["new_tokens"]
    lines = request_lines(token_prompts(batch, prompt, model.config.vocab_size, seed=2), new)
    kv_tokens = batch * (prompt + new)
    run_engine(model, tokenizer, lines[:2], kv_tokens=kv_tokens)  # warm-up

    def single() -> float:
        ctx.echo(f"  single-process Engine: {batch} requests, prompt {prompt}, {new} new tokens")
        return run_engine(model, tokenizer, lines, kv_tokens=kv_tokens, max_seqs=batch,
                          max_batch_tokens=knobs["max_batch_tokens"]).tokens_per_s

    # Baseline runs interleave with the cluster runs (S C S C S ...): each cluster run is
    # compared with the mean of the single-process runs just before and just after it.
    singles = [single()]
    rows = []
    for nodes in knobs["tier2_nodes"]:
        micro_batches = knobs["micro_batches"]  # each spans every Tier 2 node
        ctx.echo(f"  two-tier ({knobs['mode']}): {nodes} Tier 2 node(s), {micro_batches} micro-batches")
        result = _two_tier(ctx, knobs, lines, nodes, kv_tokens)
        singles.append(single())
        baseline = (singles[-2] + singles[-1]) / 2
        rows.append({"system": f"two-tier, {nodes} Tier 2", "tier2_nodes": nodes, "micro_batches": micro_batches,
                     "seconds": result.seconds, "tok_s": result.tokens_per_s, "baseline_tok_s": baseline,
                     "ratio_to_single_process": ratio(result.tokens_per_s, baseline), **result.extra})
    baseline = sum(singles) / len(singles)
    base_rows = [{"system": f"single-process (run {i + 1})", "tok_s": value,
                  "ratio_to_single_process": ratio(value, baseline)} for i, value in enumerate(singles)]
    worst = min((r["ratio_to_single_process"] for r in rows), default=None)
    return {
        "config": {**knobs, "kv_tokens_per_node": kv_tokens, "max_seqs": batch,
                   "timed": "submit only (cluster already up, model loaded)"},
        "model": ctx.model_info(),
        "baseline": {"name": "single-process Engine, same requests; each cluster run against the mean of the "
                             "single-process runs just before and after it", "tok_s": baseline, "runs": singles,
                     "spread": ratio(max(singles), min(singles))},
        "results": base_rows + rows,
        "summary": {"single_process_tok_s": baseline,
                    **{f"two_tier_{r['tier2_nodes']}_ratio": r["ratio_to_single_process"] for r in rows}},
        "targets": {"vs_single": target(">= 85% of single-process throughput (worst node count)", worst, 0.85)},
        "notes": [f"two-tier mode: {knobs['mode']} ("
                  + ("LocalCluster: real Tier 1 / Tier 2 processes on loopback" if knobs["mode"] == "processes"
                     else "Tier1Node / Tier2Node in this process, real TCP on loopback") + ")",
                  "all processes share this machine's cores: Tier 2 attention competes with Tier 1 compute",
                  (f"torch threads: {torch.get_num_threads()} in the single-process engine; node processes get "
                   "LocalCluster's share (tier1_threads, tier2_threads in each row; in-process nodes share this "
                   f"process's {torch.get_num_threads()}); {os.cpu_count()} cores in all")],
        "table": ([("system", "system"), ("micro_batches", "micro-batches"), ("tok_s", "tok/s"),
                   ("ratio_to_single_process", "ratio to single")], base_rows + rows),
    }



def _two_tier(ctx: BenchContext, knobs: dict, lines: list[dict], nodes: int, kv_tokens: int) -> RunResult:
    """One two-tier run in ``knobs["mode"]``; node processes' thread shares and spin-wait in ``extra``."""
    micro_batches, batch = knobs["micro_batches"], knobs["batch"]
    with tempfile.TemporaryDirectory(prefix="glinthawk-bench-cluster-") as tmp:
        if knobs["mode"] != "processes":
            model, tokenizer = ctx.load()
            return run_two_tier_inprocess(model, tokenizer, lines, Path(tmp), nodes=nodes,
                                          micro_batches=micro_batches, kv_tokens=kv_tokens,
                                          max_batch_tokens=knobs["max_batch_tokens"], max_seqs=batch)
        result = run_local_cluster(ctx.checkpoint(), lines, Path(tmp), dtype=ctx.dtype, tier2_nodes=nodes,
                                   kv_tokens=kv_tokens, micro_batches=micro_batches,
                                   max_batch_tokens=knobs["max_batch_tokens"], max_seqs=batch)
    shares = LocalCluster(ctx.checkpoint(), tier2_nodes=nodes, micro_batches=micro_batches).shares
    result.extra.update(tier1_threads=shares.threads_for("tier1"), tier2_threads=shares.threads_for("tier2"),
                        tier1_spin_rounds=shares.spin_rounds_for("tier1"))
    return result

def plot(result: dict, figure) -> None:
    ax = figure.subplots(1, 1)
    rows = result["results"]
    colors = ["tab:gray" if "single" in r["system"] else "tab:blue" for r in rows]
    bars = ax.bar([r["system"].replace(", ", "\n") for r in rows], [r["tok_s"] for r in rows], color=colors)
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['ratio_to_single_process']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(0.85 * result["baseline"]["tok_s"], color="tab:red", linestyle=":", label="85% of single-process")
    ax.set_ylabel("generated tok/s")
    cfg = result["config"]
    ax.set_title(f"two-tier vs single process: {cfg['batch']} requests, prompt {cfg['prompt']}, "
                 f"{cfg['new_tokens']} new ({cfg['mode']})", fontsize=9)
    ax.legend(fontsize=8)
