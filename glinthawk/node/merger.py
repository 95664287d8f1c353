"""Tier 1's compute loop: every micro-batch ready at the same stage runs as one batch.

Micro-batches hand their work to ``StageMerger.run`` and await the result. One thread
does all compute (torch releases the GIL, so the event loop keeps moving frames); while
it works, more micro-batches come back from Tier 2 and queue up, and the next job takes
those that stand at one stage, up to ``max_rows`` rows (the step size the linear layers
were warmed up for). Later stages go first: that drains the pipeline and frees KV room
soonest.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from glinthawk.compute.loader import Model
from glinthawk.compute.rope import Rotary
from glinthawk.compute.sampling import SamplingParams
from glinthawk.compute.stages import final_stage, layer_stage


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
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier1-compute")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="stage-merger")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, work: StageWork):
        """Queue ``work``; returns (x, q, k, v) for a layer stage, sampled tokens for the final one."""
        work.future = asyncio.get_running_loop().create_future()
        self._pending[work.stage].append(work)
        self._wakeup.set()
        return await work.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                works = self._next_job()
                stage = works[0].stage
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self._compute, stage, works)
                except Exception as exc:  # a failed job fails its micro-batches, not the node
                    for work in works:
                        if not work.future.done():
                            work.future.set_exception(exc)
                    continue
                finally:
                    self.stats.busy_seconds += time.perf_counter() - started
                self.stats.jobs += 1
                self.stats.micro_batches += len(works)
                for work, result in zip(works, results):
                    if not work.future.done():
                        work.future.set_result(result)

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
