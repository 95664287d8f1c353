"""latency: two-tier throughput with an injected one-way delay between the tiers.

Tier 1 and one Tier 2 node run in this process (one event loop, real TCP on loopback);
every frame either way is held back by ``delay`` ms (``glinthawk.net.netem``), so a layer's
round trip costs at least ``2 * delay``. The same requests run at each (delay,
micro-batches in flight) point; with enough micro-batches in flight Tier 1 keeps
computing while others are on the wire, and the delay disappears from the throughput.

Ratios: to the 0 ms point with the same number of micro-batches, and to the best 0 ms
point. ``tier1_busy`` is the fraction of the wall time Tier 1 spent computing stages.
Then the same at an ordinary batch, through ``glinthawk run``'s processes
(``latency_ordinary``): the figure the targets with the measured count are about.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from glinthawk.bench import knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.latency_ordinary import ordinary_report, run_ordinary
from glinthawk.bench.measure import ratio, target
from glinthawk.bench.nodes import run_two_tier_inprocess
from glinthawk.bench.workloads import request_lines, token_prompts

# Hiding a 100 ms round trip per layer needs well over that much Tier 1 work per layer in
# flight, since micro-batches drift into clumps. On this 2-core machine a batch of 6144 in
# bfloat16 is about 150 ms of work per layer, and half that in float32, whose matmuls are
# half as fast (batch 0 picks by dtype). 4608, which was as much work before the Tier 2
# plan reuse and the chunked head, left Tier 1 84% busy at 50 ms (0.73-0.79 of the 0 ms
# throughput against 0.87 at 6144). At batch 256 a step is all waiting.
DEFAULTS, QUICK = knobs.LATENCY, knobs.LATENCY_QUICK
BATCH_BY_DTYPE = {"float32": 3072, "bfloat16": 6144}


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("latency", DEFAULTS, QUICK)
    model, tokenizer = ctx.load()
    knobs["batch"] = knobs["batch"] or BATCH_BY_DTYPE.get(ctx.dtype, BATCH_BY_DTYPE["float32"])
    batch, prompt, new = knobs["batch"], knobs["prompt"], knobs["new_tokens"]
    lines = request_lines(token_prompts(batch, prompt, model.config.vocab_size, seed=3), new)
    kv_tokens = batch * (prompt + new)

    def point(delay: float, in_flight: int, work: list[dict]):
        with tempfile.TemporaryDirectory(prefix="glinthawk-bench-latency-") as tmp:
            return run_two_tier_inprocess(model, tokenizer, work, Path(tmp), nodes=1,
                                          micro_batches=None if in_flight == "auto" else in_flight,
                                          delay_ms=delay, kv_tokens=kv_tokens,
                                          max_batch_tokens=knobs["max_batch_tokens"], max_seqs=batch)

    point(0, 2, lines[:4])  # warm-up
    rows = []
    # In-flight counts outermost, delays (0 ms first) inside: each point's own 0 ms baseline is
    # measured minutes, not the whole sweep, before it.
    for in_flight in knobs["in_flight"]:
        for delay in sorted(knobs["delays_ms"]):
            ctx.echo(f"  delay {delay} ms, {in_flight} micro-batch(es) in flight")
            result = point(delay, in_flight, lines)
            rows.append({"delay_ms": delay, "in_flight": in_flight, "seconds": result.seconds,
                         "tok_s": result.tokens_per_s,
                         "tier1_busy": ratio(result.extra["tier1_busy_seconds"], result.seconds),
                         "micro_batches_per_job": result.extra["tier1_micro_batches_per_job"]})
    zero = {r["in_flight"]: r["tok_s"] for r in rows if r["delay_ms"] == 0}
    best_zero = max(zero.values(), default=None)
    for row in rows:
        row["ratio_to_0ms_same_in_flight"] = ratio(row["tok_s"], zero.get(row["in_flight"]))
        row["ratio_to_best_0ms"] = ratio(row["tok_s"], best_zero)

    best_at, auto_at = (lambda delay: _best_at(rows, delay)), (lambda delay: _auto_at(rows, delay))
    ordinary = run_ordinary(ctx, knobs, model) if knobs["ordinary_batch"] else []
    report = ordinary_report(knobs, ordinary)

    return {
        "config": {**knobs, "tier2_nodes": 1, "kv_tokens": kv_tokens,
                   "mode": "inprocess: Tier1Node + Tier2Node in this process, real TCP on loopback",
                   "delay": "one-way, each direction (round trip per layer >= 2 x delay)"},
        "model": ctx.model_info(),
        "baseline": {"name": "0 ms point, same run", "best_0ms_tok_s": best_zero, "per_in_flight": zero},
        "results": rows,
        "ordinary": ordinary,
        "summary": {**{f"best_ratio_at_{d}ms": best_at(d) for d in knobs["delays_ms"]},
                    **{f"auto_ratio_at_{d}ms": auto_at(d) for d in knobs["delays_ms"]}, **report["summary"]},
        "targets": {
            "10ms": target(">= 90% of the best 0 ms throughput at 10 ms (best micro-batch count)", best_at(10), 0.9),
            "50ms": target(">= 80% of the best 0 ms throughput at 50 ms (best micro-batch count)", best_at(50), 0.8),
            **report["targets"],
        },
        "notes": ["the same requests at every point; tok/s = generated tokens / time of the whole submit",
                  "a target is n/a when its delay is not in delays_ms"],
        "table": ([("delay_ms", "delay ms"), ("in_flight", "in flight"), ("tok_s", "tok/s"),
                   ("ratio_to_0ms_same_in_flight", "vs 0ms same"), ("ratio_to_best_0ms", "vs best 0ms"),
                   ("tier1_busy", "Tier 1 busy"), ("micro_batches_per_job", "mb/job")], rows),
        "more_tables": report["tables"],
    }


def _best_at(rows: list[dict], delay: float) -> float | None:
    values = [r["ratio_to_best_0ms"] for r in rows if r["delay_ms"] == delay and r["ratio_to_best_0ms"]]
    return max(values) if values else None


def _auto_at(rows: list[dict], delay: float) -> float | None:
    """The measured count's throughput at ``delay`` over its own at 0 ms."""
    return next((r["ratio_to_0ms_same_in_flight"] for r in rows
                 if r["delay_ms"] == delay and r["in_flight"] == "auto"), None)


def plot(result: dict, figure) -> None:
    left, right = figure.subplots(1, 2)
    rows = result["results"]
    delays = sorted({r["delay_ms"] for r in rows})
    in_flight = sorted({r["in_flight"] for r in rows}, key=lambda count: (count == "auto", str(count).zfill(4)))
    for count in in_flight:
        points = sorted((r["delay_ms"], r["tok_s"]) for r in rows if r["in_flight"] == count)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{count} in flight")
    left.set_xscale("symlog", linthresh=1)
    left.set_xlabel("injected one-way delay (ms)")
    left.set_ylabel("generated tok/s")
    left.set_title("throughput vs delay")
    left.legend(fontsize=8)
    for delay in delays:  # the hand-picked counts (the measured one has no place on this axis)
        points = sorted((r["in_flight"], r["ratio_to_best_0ms"] or 0) for r in rows
                        if r["delay_ms"] == delay and r["in_flight"] != "auto")
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{delay} ms")
    right.axhline(1.0, color="tab:gray", linestyle="--")
    right.axhline(0.8, color="tab:red", linestyle=":")
    right.set_xscale("log", base=2)
    right.set_xlabel("micro-batches in flight")
    right.set_ylabel("throughput / best 0 ms")
    right.set_title("delay hidden by micro-batches in flight")
    right.legend(fontsize=8)
