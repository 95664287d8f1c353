"""structured: schema-constrained requests against the same requests unconstrained.

The constrained run generates what the JSON schema allows, each request stopping when its
document is complete; the unconstrained run then asks every request for exactly as many
tokens as it produced (``ignore_eos``), so both runs generate the same token counts from
the same prompts and batch. The ratio of their tok/s is the cost of computing the token
masks (llguidance, on the thread that owns the sequences) and applying them. It runs the
bundled model (or ``--model``): the generated benchmark checkpoints' word-level tokenizer
is not one a grammar library can take.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click

from glinthawk.bench import knobs
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import ratio, target
from glinthawk.bench.workloads import parse_requests

DEVICES = ("cpu",)
DEFAULTS, QUICK = knobs.STRUCTURED, knobs.STRUCTURED_QUICK
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "language": {"enum": ["python", "c", "rust", "go"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "language", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["The built-in function", "A dictionary maps", "The with statement", "Exceptions are",
           "The module", "A list", "Strings in Python", "The class"]
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "default"


def _context(ctx: BenchContext) -> BenchContext:
    """``ctx`` on the bundled model (unless --model names one), loaded apart from the other suites'."""
    return dataclasses.replace(ctx, model_dir=ctx.model_dir or BUNDLED, _loaded={})


def constrained_lines(count: int, max_tokens: int) -> list[dict]:
    rf = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    return [{"custom_id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
             "temperature": 0.7, "seed": i, "response_format": rf} for i in range(count)]


def _run(model, tokenizer, lines: list[dict], max_batch_tokens: int) -> tuple[float, list[dict]]:
    from glinthawk.engine import Engine
    from glinthawk.results import is_error

    engine = Engine(model, tokenizer, kv_tokens=len(lines) * 512, max_batch_tokens=max_batch_tokens,
                    max_seqs=len(lines))
    engine.warm_all()  # outside the timed run, as the figures have always been measured
    requests = parse_requests(lines)
    out: list[dict] = []
    started = time.perf_counter()
    engine.run(requests, out.append)
    seconds = time.perf_counter() - started
    errors = [line for line in out if is_error(line)]
    if errors:
        raise click.ClickException(f"{len(errors)} benchmark requests failed, e.g. {errors[0]}")
    return seconds, out


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("structured", DEFAULTS, QUICK)
    ctx = _context(ctx)
    model, tokenizer = ctx.load()
    constrained = constrained_lines(knobs["requests"], knobs["max_tokens"])
    _run(model, tokenizer, constrained[:4], knobs["max_batch_tokens"])  # warm up (and compile the schema once)
    rows = []
    for repeat in range(ctx.best_of):  # both runs back to back each time: a shared machine's load moves
        seconds, out = _run(model, tokenizer, constrained, knobs["max_batch_tokens"])
        counts = {line["custom_id"]: line["completion_tokens"] for line in out}
        free = [{**line, "max_tokens": counts[line["custom_id"]], "ignore_eos": True} for line in constrained]
        for line in free:
            del line["response_format"]
        free_seconds, _ = _run(model, tokenizer, free, knobs["max_batch_tokens"])
        tokens = sum(counts.values())
        rows.append({"repeat": repeat, "requests": len(constrained), "generated_tokens": tokens,
                     "constrained_tok_s": tokens / seconds, "unconstrained_tok_s": tokens / free_seconds,
                     "ratio_constrained_to_unconstrained": ratio(tokens / seconds, tokens / free_seconds),
                     "valid_json": sum(_parses(line["text"]) for line in out) / len(out)})
    best = {key: max(row[key] for row in rows) for key in ("constrained_tok_s", "unconstrained_tok_s")}
    best["ratio_constrained_to_unconstrained"] = ratio(best["constrained_tok_s"], best["unconstrained_tok_s"])
    best["valid_json"] = min(row["valid_json"] for row in rows)
    return {
        "config": {**knobs, "device": ctx.device, "dtype": ctx.dtype},
        "model": ctx.model_info(),
        "baseline": {"speed": "the same prompts and token counts unconstrained, same run"},
        "results": rows,
        "summary": best,
        "targets": {"vs_unconstrained": target(
            f">= 0.8 of unconstrained tok/s ({knobs['requests']} schema-constrained requests)",
            best["ratio_constrained_to_unconstrained"], 0.8)},
        "notes": ["the unconstrained run generates exactly the tokens counts of the constrained one (ignore_eos)",
                  f"summary: the best tok/s of each over {ctx.best_of} repeats (each runs both back to back)",
                  "valid_json: the fraction of constrained outputs that parse (finished by max_tokens otherwise)"],
        "table": ([("repeat", "repeat"), ("requests", "requests"), ("generated_tokens", "tokens"),
                   ("constrained_tok_s", "constrained tok/s"), ("unconstrained_tok_s", "unconstrained tok/s"),
                   ("ratio_constrained_to_unconstrained", "ratio"), ("valid_json", "valid")], rows),
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def plot(result: dict, figure) -> None:
    rows = result["results"]
    ax = figure.subplots()
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["constrained_tok_s"] for r in rows], width=0.4, label="schema-constrained")
    ax.bar([x + 0.2 for x in xs], [r["unconstrained_tok_s"] for r in rows], width=0.4, label="unconstrained")
    ax.set_xticks(list(xs), [f"repeat {r['repeat']}" for r in rows])
    ax.set_ylabel("generated tok/s")
    ax.set_title(f"{rows[0]['requests']} requests: constrained/unconstrained "
                 f"{result['summary']['ratio_constrained_to_unconstrained']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
