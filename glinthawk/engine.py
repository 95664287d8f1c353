"""The single-process engine: Tier 1's compute and Tier 2's KV store in one process.

It is the oracle the two-tier runtime is tested against and the monolithic baseline the
benchmarks compare with, so it stays plain: continuous batching, chunked prefill under a
token budget, admission by KV capacity. It admits (``scheduling.Intake``), plans, packs
and steps (``step.run_step``) exactly as Tier 1 does, with the attention on its own KV
store in place of the Tier 2 nodes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable

import torch

from glinthawk.compute.attention import AttentionPlan, attend_with
from glinthawk.compute.kvcache import KVStore
from glinthawk.compute.layers import warm_up
from glinthawk.compute.loader import Model
from glinthawk.requests import Request, RequestError, error_line, result_line
from glinthawk.scheduling import Intake, RunStats
from glinthawk.sequence import Sequence, commit_step, pack_step, plan_step
from glinthawk.settings import StepSettings
from glinthawk.step import StageWork, compute_stage, run_now, run_step
from glinthawk.tokenizer import Tokenizer

Emit = Callable[[dict], None]


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, kv_tokens: int, model_name: str = "glinthawk",
                 settings: StepSettings | None = None, **overrides):
        """``settings``, or any of its fields as keywords (``max_seqs=8``)."""
        settings = dataclasses.replace(settings or StepSettings(), **overrides)
        max_batch_tokens, max_seqs = settings.max_batch_tokens, settings.max_seqs
        cfg = model.config
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_batch_tokens, self.max_seqs = max_batch_tokens, max_seqs
        self.store = KVStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_tokens, model.dtype, model.device)
        warm_up(model, max_batch_tokens, max_seqs)
        self.intake = Intake(tokenizer, cfg.max_position_embeddings, cfg.vocab_size, kv_tokens)
        self.stats = RunStats()

    def run(self, items: Iterable[Request | RequestError], emit: Emit) -> RunStats:
        """Generate for every item, calling ``emit`` with each output line as soon as it is ready."""
        source = iter(items)
        waiting: deque[Sequence] = deque()
        running: list[Sequence] = []
        exhausted = False
        while True:
            while not exhausted and len(waiting) <= self.max_seqs:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                try:
                    waiting.append(self.intake.admit(item))
                except RequestError as error:
                    self.stats.failed += 1
                    emit(error_line(error))
            while waiting and len(running) < self.max_seqs and waiting[0].reserve_tokens <= self.store.free_tokens:
                seq = waiting.popleft()
                self.store.reserve(seq.id, seq.reserve_tokens)
                running.append(seq)
            if not running:
                if exhausted and not waiting:
                    return self.stats
                continue
            for seq in self.step(running):
                running.remove(seq)
                self.store.free(seq.id)
                self.stats.finished += 1
                emit(result_line(seq.request, seq.completion(self.tokenizer), self.model_name))

    @torch.inference_mode()
    def step(self, running: list[Sequence]) -> list[Sequence]:
        batch = pack_step(plan_step(running, self.max_batch_tokens), self.model.device)
        plan = AttentionPlan.of(self.store, [seq.id for seq in batch.seqs], batch.starts, batch.counts)

        async def compute(work: StageWork):
            return compute_stage(self.model, work)

        async def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attend_with(plan, layer, q, k, v)

        next_tokens = run_now(run_step(self.model, batch, compute, attend))
        self.stats.record_step(batch)
        return commit_step(batch, next_tokens, self.tokenizer)
