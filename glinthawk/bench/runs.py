"""Runs timed as a ``RunResult``, and the single-process Engine's run (step by step, against
the roofline): the baseline every two-tier figure is compared with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from glinthawk.bench.measure import Roofline
from glinthawk.bench.workloads import check_results, parse_requests
from glinthawk.compute.graphs import StageGraphs
from glinthawk.settings import StepSettings


@dataclass
class RunResult:
    seconds: float
    generated_tokens: int
    requests: int
    # (seconds since start, tokens generated, sequences that have their first token)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    def decode_tokens_per_s(self) -> float | None:
        """Generation rate once every sequence has its first token (all prefills done)."""
        return decode_rate(self.timeline, self.requests, self.generated_tokens)


def decode_rate(timeline: list[tuple[float, int, int]], sequences: int, total: int) -> float | None:
    """Tokens per second from the moment all ``sequences`` have their first token to the ``total``-th token."""
    start = next(((t, n) for t, n, started in timeline if started >= sequences), None)
    end = next(((t, n) for t, n, _ in timeline if n >= total), None)
    if start is None or end is None or end[0] <= start[0] or end[1] <= start[1]:
        return None
    return (end[1] - start[1]) / (end[0] - start[0])


def run_engine(model, tokenizer, lines: list[dict], *, kv_tokens: int,
               max_batch_tokens: int = StepSettings.max_batch_tokens, max_seqs: int = StepSettings.max_seqs,
               roofline: Roofline | None = None, graphs: StageGraphs | None = None) -> RunResult:
    """The single-process Engine on ``lines``; records each step (and its roofline floor).
    ``graphs``: the CUDA graphs its decode steps run through (kept from an earlier run: captured)."""
    from glinthawk.engine import Engine

    engine = Engine(model, tokenizer, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs)
    engine.warm_all()  # outside the timed run, as the figures have always been measured
    engine.graphs = graphs
    requests = parse_requests(lines)
    steps: list[dict] = []
    timeline: list[tuple[float, int, int]] = []
    inner = engine.step
    started = time.perf_counter()

    def traced_step(running):
        rows = running[:max_batch_tokens]
        decode = all(seq.pending == 1 for seq in running) and len(running) <= max_batch_tokens
        context = sum(seq.num_cached + 1 for seq in rows) if decode else None
        t0 = time.perf_counter()
        finished = inner(running)
        t1 = time.perf_counter()
        record = {"seconds": t1 - t0, "batch": len(rows), "decode": decode, "context_tokens": context}
        if decode and roofline is not None:
            record["floor_seconds"] = roofline.floor_seconds(len(rows), context)
        steps.append(record)
        timeline.append((t1 - started, engine.stats.generated_tokens, engine.stats.first_tokens))
        return finished

    engine.step = traced_step
    out: list[dict] = []
    engine.run(requests, out.append)
    seconds = time.perf_counter() - started
    generated = check_results(out, sum(line["max_tokens"] for line in lines))
    outputs = {line["custom_id"]: line["token_ids"] for line in out}
    return RunResult(seconds, generated, len(lines), timeline, {"steps": steps, "outputs": outputs})


def decode_summary(steps: list[dict]) -> dict[str, float | None]:
    """Decode-only steps of a traced Engine run: tok/s measured and at the roofline."""
    decode = [s for s in steps if s["decode"]]
    seconds = sum(s["seconds"] for s in decode)
    tokens = sum(s["batch"] for s in decode)
    floor = sum(s.get("floor_seconds", 0.0) for s in decode)
    return {
        "decode_steps": len(decode), "decode_seconds": seconds,
        "decode_tok_s": tokens / seconds if seconds else None,
        "roofline_tok_s": tokens / floor if floor else None,
        "prefill_seconds": sum(s["seconds"] for s in steps if not s["decode"]),
    }
