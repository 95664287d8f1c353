"""Running one suite and writing what it measured: ``SUITE.json`` (with the machine facts
and versions), ``SUITE.png`` and the table on stdout.

Conventions:
- A suite module has ``DEFAULTS`` and ``QUICK`` (its knobs, full and ``--quick`` sizes,
  written in the torch-free ``knobs`` so that ``--help`` can list them), ``run(ctx) -> dict``
  and ``plot(result, figure)``. ``run`` returns
  ``{"config", "results", "summary", "targets", "notes", "table"}`` (and ``more_tables``); ``run_suite`` adds
  the machine facts, versions and timings, writes ``SUITE.json`` and ``SUITE.png`` and
  prints the table.
- Every speed figure comes with a ratio to a baseline measured in the same run.
- Generated-token throughput (tok/s) counts sampled tokens only; prompts are token-id lists,
  decoding is greedy with ``ignore_eos`` so every request produces exactly ``max_tokens``.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from glinthawk.bench.context import BenchContext
from glinthawk.bench.machine import machine_facts, versions

SCHEMA_VERSION = 1


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):  # one figure a round or a point: "4, 3, 3"
        return ", ".join(fmt(item) for item in value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 1e5:
            return f"{value:.3g}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def render_table(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """``columns``: (key, header) pairs."""
    cells = [[header for _, header in columns]] + [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save_plot(path: Path, plot: Callable[[dict, Any], None], result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(11, 4.8), dpi=110)
    try:
        plot(result, figure)
        label = f"{result['suite']} | {result['machine'].get('cpu_model')} | {result['config'].get('dtype', '')}"
        if result.get("quick"):
            label += " | --quick"
        figure.suptitle(label, fontsize=9)
        figure.tight_layout(rect=(0, 0, 1, 0.95))
        figure.savefig(path)
    finally:
        plt.close(figure)


def run_suite(name: str, ctx: BenchContext) -> dict:
    """Run one suite: measure, then write ``NAME.json``, ``NAME.png`` and print the table."""
    module = importlib.import_module(f"glinthawk.bench.{name}")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    ctx.echo(f"== bench {name}{' (quick)' if ctx.quick else ''}")
    machine = machine_facts()
    started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    body = module.run(ctx)
    elapsed = time.perf_counter() - started
    result = {
        "suite": name,
        "schema": SCHEMA_VERSION,
        "quick": ctx.quick,
        "started_at": started_at,
        "elapsed_seconds": elapsed,
        "machine": machine | {"load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": versions(),
        "command": sys.argv,
        **body,
    }
    result["config"] = {"dtype": ctx.dtype, "quick": ctx.quick, "best_of": ctx.best_of, **body.get("config", {})}
    tables = [result.pop("table", None), *result.pop("more_tables", [])]
    json_path = ctx.out_dir / f"{name}.json"
    json_path.write_text(json.dumps(_finite(result), indent=1, default=_json_default) + "\n", encoding="utf-8")
    save_plot(ctx.out_dir / f"{name}.png", module.plot, result)
    for table in filter(None, tables):
        click.echo(render_table(*table))
    for key, check in result.get("targets", {}).items():
        verdict = {True: "met", False: "NOT met", None: "n/a"}[check["met"]]
        click.echo(f"  target {key}: {check['target']} -> {fmt(check['value'])} ({verdict})")
    for note in result.get("notes", []):
        click.echo(f"  note: {note}")
    click.echo(f"  wrote {json_path} and {name}.png ({elapsed:.1f} s)")
    return result
