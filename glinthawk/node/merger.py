"""Tier 1's compute loop: every micro-batch ready at the same stage runs as one batch.

Micro-batches hand their work to ``StageMerger.run`` and await the result. One thread
does all compute; while it works, more micro-batches come back from Tier 2 and queue up,
and the next job takes those that stand at one stage, up to ``max_rows`` rows (the step
size the linear layers were warmed up for). Later stages go first: that drains the
pipeline and frees KV room soonest.

On the CPU that one thread is the event loop's own (``threads.computes_on_own_thread`` says
why): frames that arrive during a job wait in the socket; the loop reads them, and sends
what the job produced, between jobs. On CUDA the compute runs on a thread of its own, so
the loop keeps moving frames while the GPU works.

Jobs start from a callback, not from a task of their own: at the end of the event-loop
pass in which work came to an idle merger, or (on the compute thread) at once when the job
before finishes. Every loop pass between a frame's arrival and its compute is latency on
each layer's round trip.

The row cap also keeps micro-batches apart. Micro-batches merged into one job go out
together and come back together; without a cap they stay one clump, and Tier 1 waits out
every round trip. Capped jobs leave one after another, so their answers come back spread
over the round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from glinthawk.compute.graphs import StageGraphs
from glinthawk.compute.loader import Model
from glinthawk.compute.rope import Rotary
from glinthawk.step import StageWork, compute_stage
from glinthawk.threads import computes_on_own_thread

__all__ = ["MergerStats", "StageMerger", "StageWork"]


@dataclass
class MergerStats:
    jobs: int = 0
    micro_batches: int = 0
    busy_seconds: float = 0.0


class StageMerger:
    def __init__(self, model: Model, max_rows: int, own_thread: bool | None = None,
                 graphs: StageGraphs | None = None):
        """``own_thread``: compute on a thread of its own rather than the event loop's (by
        default as ``threads.computes_on_own_thread`` decides for the model's device);
        ``graphs``: the CUDA graphs decode-only jobs run through (compute/graphs.py)."""
        self.model, self.max_rows, self.graphs = model, max_rows, graphs
        self.final = model.config.num_layers
        self.stats = MergerStats()
        self._pending: dict[int, list[StageWork]] = defaultdict(list)
        if own_thread is None:
            own_thread = computes_on_own_thread(model.device.type)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier1-compute") if own_thread else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False  # a job is on the compute thread
        self._dispatch_due = False  # a _dispatch is scheduled on the loop
        self._closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def loop_seconds(self) -> float:
        """Seconds the event loop itself has spent computing (none when a thread of its own computes)."""
        return self.stats.busy_seconds if self._executor is None else 0.0

    async def close(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def call(self, fn, *args):
        """``fn(*args)`` on the thread that computes (for the warm-up: one thread touches torch)."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, work: StageWork, alone: bool = False):
        """Queue ``work``; returns (x, q, k, v) for a layer stage, sampled tokens for the final one.

        ``alone``: no other micro-batch is in flight, so none can join this job. Computing on
        the event loop with nothing queued, the work then runs at once, two loop passes sooner.
        """
        if alone and self._executor is None and not self._pending:
            started = time.perf_counter()
            try:
                result = self._compute(work.stage, [work])[0]
            finally:
                self._timed(started)
            self.stats.jobs += 1
            self.stats.micro_batches += 1
            return result
        work.future = asyncio.get_running_loop().create_future()
        self._pending[work.stage].append(work)
        self._schedule()
        return await work.future

    def _schedule(self) -> None:
        """A ``_dispatch`` at the end of this loop pass, so that work queued in the same pass joins the job."""
        if not self._busy and not self._dispatch_due and self._pending:
            self._dispatch_due = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Run the next job here (on the event loop) or start it on the compute thread, if none is running."""
        self._dispatch_due = False
        if self._busy or self._closed or not self._pending:
            return
        works = self._next_job()
        started = time.perf_counter()
        if self._executor is None:
            try:
                results, error = self._compute(works[0].stage, works), None
            except Exception as exc:  # a failed job fails its micro-batches, not the node
                results, error = None, exc
            self._timed(started)
            self._settle(works, results, error)
            # After the micro-batches just settled have run (and sent their frames): they resume first.
            self._schedule()
            return
        self._busy = True
        job = self._executor.submit(self._compute, works[0].stage, works)
        job.add_done_callback(lambda job: self._call_back(self._finished, works, job, started))

    def _call_back(self, callback, *args) -> None:
        """From the compute thread: run ``callback`` on the event loop (unless it has closed)."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed while the job ran
            pass

    def _finished(self, works: list[StageWork], job: Future, started: float) -> None:
        self._busy = False
        self._timed(started)
        self._dispatch()  # work that queued while this job ran goes next, at once
        if not job.cancelled():
            error = job.exception()
            self._settle(works, None if error else job.result(), error)

    def _settle(self, works: list[StageWork], results: list | None, error: BaseException | None) -> None:
        if error is None:
            self.stats.jobs += 1
            self.stats.micro_batches += len(works)
        for work, result in zip(works, results or [None] * len(works)):
            if work.future.done():
                continue
            if error is not None:
                work.future.set_exception(error)
            else:
                work.future.set_result(result)

    def _timed(self, started: float) -> None:
        """Count a job that began at ``started`` (``perf_counter``) and has just ended as busy time."""
        self.stats.busy_seconds += time.perf_counter() - started

    def _next_job(self) -> list[StageWork]:
        """The queued work of the latest stage, oldest first, up to ``max_rows`` rows (at least one)."""
        stage = max(self._pending)
        queue = self._pending[stage]
        count, rows = 0, 0
        while count < len(queue) and (count == 0 or rows + queue[count].rows <= self.max_rows):
            rows += queue[count].rows
            count += 1
        works, rest = queue[:count], queue[count:]
        if rest:
            self._pending[stage] = rest
        else:
            del self._pending[stage]
        return works

    @torch.inference_mode()
    def _compute(self, stage: int, works: list[StageWork]) -> list:
        started = time.perf_counter()
        try:
            return self._outputs(stage, works)
        finally:
            elapsed, rows = time.perf_counter() - started, sum(w.rows for w in works)
            for work in works:  # each micro-batch's share, by rows (what pacing.Pacer weighs)
                work.seconds = elapsed * work.rows / max(rows, 1)

    def _outputs(self, stage: int, works: list[StageWork]) -> list:
        result = compute_stage(self.model, works[0] if len(works) == 1 else _merged(works), self.graphs)
        if stage == self.final:
            if len(works) == 1:
                return [result]
            return result.split([len(w.params) for w in works],
                                [sum(p.logprobs is not None for p in w.params) for w in works],
                                [len(w.score_top) for w in works])
        if stage == self.model.layer_range.stop:  # a pipeline stage's hidden states, to hand on
            return [result] if len(works) == 1 else list(result.split([w.rows for w in works]))
        x, q, k, v = result
        q, k, v = q.cpu(), k.cpu(), v.contiguous().cpu()  # they go on the wire
        if len(works) == 1:  # a micro-batch alone: 10 µs of splits saved on every layer's round trip
            return [(x, q, k, v)]
        sizes = [w.rows for w in works]
        return list(zip(x.split(sizes), q.split(sizes), k.split(sizes), v.split(sizes)))


def _merged(works: list[StageWork]) -> StageWork:
    """The works of one stage as one batch: their rows one after another."""
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(w, name) for w in works]
        return None if parts[0] is None else torch.cat(parts)

    def rows(name: str) -> torch.Tensor | None:
        """Row indices of every work, each shifted past the rows of the works before it."""
        parts = [getattr(w, name) + offset for w, offset in zip(works, offsets) if getattr(w, name) is not None]
        return torch.cat(parts) if parts else None

    first = works[0]
    offsets = torch.tensor([0] + [w.rows for w in works[:-1]]).cumsum(0).tolist()
    scored = [w for w in works if w.score_rows is not None]
    masked = _masked(works)
    return StageWork(
        first.stage, Rotary(*(torch.cat(parts) for parts in zip(*(w.rot for w in works)))),
        token_ids=cat("token_ids"), x=cat("x"), attn_out=cat("attn_out"), sample_rows=rows("sample_rows"),
        params=[p for w in works for p in w.params], seeds=[s for w in works for s in w.seeds],
        steps=[s for w in works for s in w.steps], score_rows=rows("score_rows"),
        score_tokens=torch.cat([w.score_tokens for w in scored]) if scored else None,
        score_top=[k for w in scored for k in w.score_top],
        mask_rows=torch.cat([w.mask_rows + offset for w, offset in masked]) if masked else None,
        masks=torch.cat([w.masks for w, _ in masked]) if masked else None,
        decode=all(w.decode for w in works),
    )


def _masked(works: list[StageWork]) -> list[tuple[StageWork, int]]:
    """The works with structured-output masks, each with the sampled rows of the works before it."""
    masked, before = [], 0
    for work in works:
        if work.mask_rows is not None:
            masked.append((work, before))
        before += len(work.params)
    return masked
