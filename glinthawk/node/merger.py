"""Tier 1's compute loop: every micro-batch ready at the same stage runs as one batch.

Micro-batches hand their work to ``StageMerger.run`` and await the result. One thread
does all compute (torch releases the GIL, so the event loop keeps moving frames); while
it works, more micro-batches come back from Tier 2 and queue up, and the next job takes
those that stand at one stage, up to ``max_rows`` rows (the step size the linear layers
were warmed up for). Later stages go first: that drains the pipeline and frees KV room
soonest.

Jobs start from a callback, not from a task of their own: at the end of the event-loop
pass in which work came to an idle thread, or at once when the job before finishes. Every
loop pass between a frame's arrival and its compute is latency on each layer's round trip.

The row cap also keeps micro-batches apart. Micro-batches merged into one job go out
together and come back together; without a cap they stay one clump, and Tier 1 waits out
every round trip. Capped jobs leave one after another, so their answers come back spread
over the round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from glinthawk.compute.loader import Model
from glinthawk.compute.rope import Rotary
from glinthawk.compute.sampling import SamplingParams
from glinthawk.compute.stages import final_stage, layer_stage

# A micro-batch alone in flight computes on the event loop's thread (``StageMerger.run``)
# where the same stage last took less than this, so the event loop stalls about this long
# at most (a stage takes about as long from one step to the next, unless a prefill chunk
# joins); beside a longer stage the thread hops cost nothing.
INLINE_MAX_S = 0.02


@dataclass
class StageWork:
    """One micro-batch's input to one stage. Tensors live on the CPU; results come back there."""

    stage: int
    rot: Rotary  # the step's cos/sin (on the model's device), computed once for all its stages
    token_ids: torch.Tensor | None = None  # stage 0
    x: torch.Tensor | None = None  # on the model's device; stays there between stages
    attn_out: torch.Tensor | None = None
    sample_rows: torch.Tensor | None = None  # final stage
    params: Sequence[SamplingParams] = ()
    seeds: Sequence[int] = ()
    steps: Sequence[int] = ()
    future: asyncio.Future | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return int(self.rot.cos.shape[0])


@dataclass
class MergerStats:
    jobs: int = 0
    micro_batches: int = 0
    busy_seconds: float = 0.0


class StageMerger:
    def __init__(self, model: Model, max_rows: int):
        self.model, self.max_rows = model, max_rows
        self.final = model.config.num_layers
        self.stats = MergerStats()
        self._pending: dict[int, list[StageWork]] = defaultdict(list)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier1-compute")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False  # a job is on the compute thread
        self._seconds: dict[int, float] = {}  # stage -> how long its latest job took
        self._dispatch_due = False  # a _dispatch is scheduled on the loop
        self._closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, work: StageWork, alone: bool = False):
        """Queue ``work``; returns (x, q, k, v) for a layer stage, sampled tokens for the final one.

        ``alone``: no other micro-batch is in flight. Then, with nothing queued and the
        compute thread idle, the work runs here on the event loop's thread: there is nothing
        to overlap it with, and the hops to the thread and back cost about 80 us each, on
        every layer (7-10% at batch 64 with one micro-batch on 2 cores). Only if this stage
        last took under ``INLINE_MAX_S``, though: a longer one would hold up the node's other
        I/O (clients, heartbeats), and beside it the hops cost nothing.
        """
        quick = self._seconds.get(work.stage, INLINE_MAX_S) < INLINE_MAX_S
        if alone and quick and not self._busy and not self._pending:
            started = time.perf_counter()
            try:
                result = self._compute(work.stage, [work])[0]
            finally:
                self._timed(work.stage, started)
            self.stats.jobs += 1
            self.stats.micro_batches += 1
            return result
        work.future = asyncio.get_running_loop().create_future()
        self._pending[work.stage].append(work)
        if not self._busy and not self._dispatch_due:
            # At the end of this event-loop pass, so that work queued in the same pass joins the job.
            self._dispatch_due = True
            self._loop.call_soon(self._dispatch)
        return await work.future

    def _dispatch(self) -> None:
        """Start the next job on the compute thread, if it is idle and there is work."""
        self._dispatch_due = False
        if self._busy or self._closed or not self._pending:
            return
        works = self._next_job()
        self._busy = True
        started = time.perf_counter()
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
        self._timed(works[0].stage, started)
        self._dispatch()  # work that queued while this job ran goes next, at once
        if job.cancelled():
            return
        error = job.exception()
        if error is None:
            self.stats.jobs += 1
            self.stats.micro_batches += len(works)
        for work, result in zip(works, [None] * len(works) if error else job.result()):
            if work.future.done():
                continue
            if error is not None:  # a failed job fails its micro-batches, not the node
                work.future.set_exception(error)
            else:
                work.future.set_result(result)

    def _timed(self, stage: int, started: float) -> None:
        """Record a job of ``stage`` that began at ``started`` (``perf_counter``) and has just ended."""
        self._seconds[stage] = seconds = time.perf_counter() - started
        self.stats.busy_seconds += seconds

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
        device = self.model.device

        def cat(name: str) -> torch.Tensor:
            parts = [getattr(w, name) for w in works]
            return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device, non_blocking=True)

        sizes = [w.rows for w in works]
        if stage == self.final:
            offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
            rows = torch.cat([w.sample_rows + off for w, off in zip(works, offsets.tolist())]).to(device)
            tokens = final_stage(self.model, cat("x"), cat("attn_out"), rows, [p for w in works for p in w.params],
                                 [s for w in works for s in w.seeds], [s for w in works for s in w.steps])
            return list(tokens.split([len(w.params) for w in works]))
        rot = works[0].rot if len(works) == 1 else Rotary(*(torch.cat(parts) for parts in zip(*(w.rot for w in works))))
        if stage == 0:
            x, q, k, v = layer_stage(self.model, 0, rot, token_ids=cat("token_ids"))
        else:
            x, q, k, v = layer_stage(self.model, stage, rot, x=cat("x"), attn_out=cat("attn_out"))
        q, k, v = q.cpu(), k.cpu(), v.contiguous().cpu()
        return list(zip(x.split(sizes), q.split(sizes), k.split(sizes), v.split(sizes)))
