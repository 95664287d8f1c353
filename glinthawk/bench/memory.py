"""memory: resident memory of real Tier 1 and Tier 2 processes while the KV cache grows.

One Tier 2 process (``python -m glinthawk.bench.probe``: the ordinary ``Tier2Node`` that
also reports how many K/V token rows it holds) and one Tier 1 process (``python -m
glinthawk.node --role tier1``). Requests with long prompts and enough new tokens to stay
alive are submitted; Tier 1 prefills them a chunk per step, so the cached tokens grow
step by step while this process samples both VmRSS (``/proc/PID/status``).

- Tier 1 holds weights and activations only: its RSS should stay flat (growth between the
  first and the last checkpoint). A warm-up request pair runs first, so one-off buffers
  (BLAS workspaces, allocator pools) exist before the first sample.
- Tier 2: RSS against the theoretical K/V bytes (cached tokens x bytes per token), as a
  least-squares line through the checkpoints: the slope is RSS bytes per K/V byte, the
  intercept the fixed overhead (interpreter, torch, the kernels' working memory). The RSS
  before and after Tier 1 connected is reported too.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from glinthawk.bench import knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.machine import rss_bytes
from glinthawk.bench.measure import ratio, target
from glinthawk.bench.nodes import node_processes
from glinthawk.bench.workloads import check_results, read_jsonl, request_lines, token_prompts, write_jsonl

DEFAULTS, QUICK = knobs.MEMORY, knobs.MEMORY_QUICK
MIB = 1 << 20


class Sampler(threading.Thread):
    def __init__(self, tier1_pid: int, tier2_pid: int, stats_path: Path, interval: float):
        super().__init__(daemon=True)
        self.pids, self.stats_path, self.interval = (tier1_pid, tier2_pid), stats_path, interval
        self.samples: list[dict] = []
        self.started_at = time.perf_counter()
        self._halt = threading.Event()

    def run(self) -> None:
        import json

        while not self._halt.is_set():
            try:
                stats = json.loads(self.stats_path.read_text())
            except (OSError, ValueError):
                stats = {}
            t1, t2 = (rss_bytes(pid) for pid in self.pids)
            if t1 is not None and t2 is not None:
                self.samples.append({"seconds": time.perf_counter() - self.started_at, "tier1_rss": t1,
                                     "tier2_rss": t2, "filled_tokens": stats.get("filled_tokens", 0),
                                     "reserved_tokens": stats.get("reserved_tokens", 0)})
            self._halt.wait(self.interval)

    def stop(self) -> list[dict]:
        self._halt.set()
        self.join()
        return self.samples


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares slope and intercept of ys against xs."""
    if len(xs) < 2:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var
    return slope, mean_y - slope * mean_x


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("memory", DEFAULTS, QUICK)
    info = ctx.model_info()
    seqs = knobs["sequences"]
    capacity = seqs * (knobs["prompt"] + knobs["new_tokens"]) + 64
    with tempfile.TemporaryDirectory(prefix="glinthawk-bench-memory-") as tmp, node_processes(Path(tmp)) as start:
        measured = _measure(ctx, knobs, info["vocab"], capacity, Path(tmp), start)
    samples = measured["samples"]
    rows = _checkpoint_rows(samples, knobs["checkpoints"], info["kv_bytes_per_token"])
    # Tier 2 RSS against K/V bytes: a least-squares line through the checkpoints. Its slope
    # is what each byte of K/V costs in RSS; its intercept is the fixed overhead (interpreter,
    # torch, the kernels' working memory), which does not grow with the cache.
    fit = _fit([r["theoretical_kv_bytes"] for r in rows], [r["tier2_rss"] for r in rows])
    overhead = fit[1] if fit else measured["tier2_connected"]
    _add_limits(rows, overhead)
    growth = rows[-1]["tier1_growth"] if rows else None
    slope = fit[0] if fit else None
    table = [{**r, "tier1_mib": r["tier1_rss"] / MIB, "tier2_mib": r["tier2_rss"] / MIB,
              "theory_mib": r["theoretical_kv_bytes"] / MIB, "limit_mib": r["tier2_limit_bytes"] / MIB}
             for r in rows]
    return {
        "config": {**knobs, "tier2_kv_tokens": capacity, "micro_batches": 1, "max_seqs": seqs,
                   "processes": "tier1: python -m glinthawk.node; tier2: python -m glinthawk.bench.probe (Tier2Node)"},
        "model": info,
        "baseline": {"tier1": "Tier 1 RSS at the first checkpoint (after a warm-up)",
                     "tier2": "theoretical K/V bytes + fixed overhead (intercept of the fit)",
                     "tier2_overhead_bytes": overhead},
        "results": rows,
        "samples": samples,
        "summary": _summary(measured, rows, fit, overhead, growth),
        "targets": {
            "tier1_flat": target("Tier 1 RSS grows < 5% from the first to the last checkpoint", growth, 0.05,
                                 higher_is_better=False),
            "tier2_bound": target("Tier 2 RSS <= 1.1 x theoretical KV + fixed overhead (value: RSS bytes per "
                                  "K/V byte, the fitted slope)", slope, 1.1, higher_is_better=False),
        },
        "notes": _notes(measured, knobs, rows, fit, overhead),
        "table": ([("cached_tokens", "cached tokens"), ("tier1_mib", "Tier 1 MiB"), ("tier1_growth", "T1 growth"),
                   ("tier2_mib", "Tier 2 MiB"), ("theory_mib", "theory KV MiB"), ("limit_mib", "1.1x+ovh MiB"),
                   ("tier2_ratio_to_theoretical", "(T2-ovh)/theory")], table),
    }


def _measure(ctx: BenchContext, knobs: dict, vocab: int, capacity: int, work: Path, start) -> dict:
    """Start the two node processes (``start``: ``nodes.node_processes``), warm Tier 1 up, then
    sample both RSS while the requests run; the samples and the RSS at each stage before."""
    from glinthawk.client import submit
    from glinthawk.net.loop import run as run_async

    seqs, prompt, new = knobs["sequences"], knobs["prompt"], knobs["new_tokens"]
    stats_path = work / "tier2-stats.json"
    requests_path = write_jsonl(work / "requests.jsonl", request_lines(token_prompts(seqs, prompt, vocab, seed=4), new))
    tier2 = start("tier2", ["--listen", "127.0.0.1:0", "--kv-tokens", str(capacity), "--stats-file", str(stats_path)],
                  module="glinthawk.bench.probe")
    time.sleep(0.3)
    measured = {"tier2_idle": rss_bytes(tier2.process.pid)}
    tier1 = start("tier1", ["--role", "tier1", "--model", str(ctx.checkpoint()), "--tier2", tier2.address, "--listen",
                            "127.0.0.1:0", "--dtype", ctx.dtype, "--device", "cpu", "--micro-batches", "1",
                            "--max-batch-tokens", str(knobs["max_batch_tokens"]), "--max-seqs", str(seqs)])
    time.sleep(0.5)
    measured.update(tier1_idle=rss_bytes(tier1.process.pid), tier2_connected=rss_bytes(tier2.process.pid))
    host, port = tier1.address.rsplit(":", 1)
    # Warm-up: one prefill chunk of the measured size and a decode step, so Tier 1's
    # one-off buffers (BLAS workspaces, allocator pools) exist before the first sample.
    warm = request_lines(token_prompts(2, min(prompt, knobs["max_batch_tokens"] // 2), vocab, seed=40), 2,
                         prefix="warm")
    run_async(submit(write_jsonl(work / "warm.jsonl", warm), host, int(port), work / "warm-out.jsonl", progress=False))
    check_results(read_jsonl(work / "warm-out.jsonl"), 4)
    measured["tier1_warm"] = rss_bytes(tier1.process.pid)
    sampler = Sampler(tier1.process.pid, tier2.process.pid, stats_path, knobs["sample_ms"] / 1000)
    sampler.start()
    ctx.echo(f"  {seqs} requests, prompt {prompt}, {new} new tokens; Tier 2 holds up to {capacity} tokens")
    started = time.perf_counter()
    try:
        run_async(submit(requests_path, host, int(port), work / "results.jsonl", progress=False))
    finally:
        measured["samples"] = sampler.stop()
    measured["seconds"] = time.perf_counter() - started
    check_results(read_jsonl(work / "results.jsonl"), seqs * new)
    return measured


def _checkpoint_rows(samples: list[dict], checkpoints: list[int], bytes_per_token: int) -> list[dict]:
    """The first sample at or past each checkpoint's cached tokens (one row per distinct sample)."""
    rows = []
    for checkpoint in checkpoints:
        sample = next((s for s in samples if s["filled_tokens"] >= checkpoint), None)
        if sample is not None and (not rows or sample["filled_tokens"] > rows[-1]["cached_tokens"]):
            rows.append({"checkpoint_tokens": checkpoint, "cached_tokens": sample["filled_tokens"],
                         "tier1_rss": sample["tier1_rss"], "tier2_rss": sample["tier2_rss"],
                         "theoretical_kv_bytes": sample["filled_tokens"] * bytes_per_token})
    return rows


def _add_limits(rows: list[dict], overhead: float) -> None:
    """Each row's Tier 1 growth and Tier 2 RSS against its K/V bytes plus the fixed ``overhead``."""
    for row in rows:
        theoretical = row["theoretical_kv_bytes"]
        row["tier1_growth"] = ratio(row["tier1_rss"] - rows[0]["tier1_rss"], rows[0]["tier1_rss"])
        row["tier2_kv_rss"] = row["tier2_rss"] - overhead
        row["tier2_ratio_to_theoretical"] = ratio(row["tier2_rss"] - overhead, theoretical)
        row["tier2_limit_bytes"] = 1.1 * theoretical + overhead
        row["tier2_within_limit"] = row["tier2_rss"] <= row["tier2_limit_bytes"]


def _summary(measured: dict, rows: list[dict], fit, overhead: float, growth: float | None) -> dict:
    within = all(r["tier2_within_limit"] for r in rows) if rows else None
    return {"tier1_idle_rss": measured["tier1_idle"], "tier1_warm_rss": measured["tier1_warm"],
            "tier2_idle_rss": measured["tier2_idle"], "tier2_connected_rss": measured["tier2_connected"],
            "tier2_all_within_limit": within, "tier2_fixed_overhead": overhead,
            "tier2_fit_slope": fit[0] if fit else None, "tier2_fit_intercept": fit[1] if fit else None,
            "tier1_growth": growth,
            "tier2_worst_ratio_to_theoretical": max((r["tier2_ratio_to_theoretical"] for r in rows[1:]
                                                     if r["tier2_ratio_to_theoretical"] is not None), default=None),
            "peak_cached_tokens": max((s["filled_tokens"] for s in measured["samples"]), default=0),
            "seconds": measured["seconds"]}


def _notes(measured: dict, knobs: dict, rows: list[dict], fit, overhead: float) -> list[str]:
    within = all(r["tier2_within_limit"] for r in rows) if rows else None
    notes = [f"Tier 2 RSS = {overhead / MIB:.1f} MiB fixed overhead + {fit[0]:.3f} x theoretical K/V bytes "
             f"(least-squares over the checkpoints; {measured['tier2_idle'] / MIB:.1f} MiB before Tier 1 connected, "
             f"{measured['tier2_connected'] / MIB:.1f} MiB after, before any attention ran)" if fit
             else "too few checkpoints for a fit",
             f"every checkpoint within 1.1 x theoretical + fixed overhead: {within}",
             (f"Tier 1 RSS after a warm-up request pair (one {knobs['max_batch_tokens']}-token prefill chunk): "
              f"{measured['tier1_warm'] / MIB:.1f} MiB"),
             f"Tier 1 idle RSS (model loaded, nothing run): {measured['tier1_idle'] / MIB:.1f} MiB",
             "cached tokens = K/V rows written on Tier 2 (all layers), read from the node's store"]
    peak_filled = max((s["filled_tokens"] for s in measured["samples"]), default=0)
    if peak_filled < knobs["checkpoints"][-1]:
        notes.append(f"cached tokens peaked at {peak_filled}, below the last checkpoint "
                     f"{knobs['checkpoints'][-1]}: raise sequences, prompt or new_tokens")
    return notes


def plot(result: dict, figure) -> None:
    left, right = figure.subplots(1, 2)
    samples = result["samples"]
    if samples:  # the growth phase only: once sequences finish, the fill drops while RSS stays
        peak = max(range(len(samples)), key=lambda i: samples[i]["filled_tokens"])
        samples = [s for s in samples[:peak + 1] if s["filled_tokens"] > 0]
    overhead = result["baseline"]["tier2_overhead_bytes"]
    bpt = result["model"]["kv_bytes_per_token"]
    tokens = [s["filled_tokens"] for s in samples]
    left.plot(tokens, [s["tier1_rss"] / MIB for s in samples], ".", markersize=3, label="Tier 1 RSS")
    left.plot(tokens, [s["tier2_rss"] / MIB for s in samples], ".", markersize=3, label="Tier 2 RSS")
    xs = sorted(set(tokens))
    left.plot(xs, [(x * bpt + overhead) / MIB for x in xs], "--", color="tab:gray", label="theoretical KV + overhead")
    left.plot(xs, [(1.1 * x * bpt + overhead) / MIB for x in xs], ":", color="tab:red", label="1.1x KV + overhead")
    left.set_xlabel("cached tokens (on Tier 2)")
    left.set_ylabel("MiB")
    left.set_title("resident memory while the KV cache grows")
    left.legend(fontsize=8)
    rows = result["results"]
    right.plot([r["cached_tokens"] for r in rows], [r["tier2_ratio_to_theoretical"] for r in rows], marker="o",
               label="Tier 2 (RSS - overhead) / theoretical")
    right.plot([r["cached_tokens"] for r in rows], [1 + r["tier1_growth"] for r in rows], marker="s",
               label="Tier 1 RSS / first checkpoint")
    right.axhline(1.1, color="tab:red", linestyle=":")
    right.axhline(1.05, color="tab:orange", linestyle=":")
    if rows:
        right.set_xscale("log", base=2)
    right.set_xlabel("cached tokens")
    right.set_ylabel("ratio")
    right.set_title("against the targets")
    right.legend(fontsize=8)
