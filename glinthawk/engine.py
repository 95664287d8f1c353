"""The single-process engine: Tier 1's compute and Tier 2's KV store in one process.

It is the oracle the two-tier runtime is tested against and the monolithic baseline the
benchmarks compare with, so it stays plain: continuous batching, chunked prefill under a
token budget, admission by KV capacity. It admits (``scheduling.Intake``), plans, packs
and steps (``step.run_step``) exactly as Tier 1 does, with the attention on its own KV
store in place of the Tier 2 nodes: the same ``KVStore`` and attention a Tier 2 node runs,
keeping K/V as its ``--kv-dtype`` says (``kvcache.storage_dtype``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch

from glinthawk.compute.attention import AttentionPlan, attend_with
from glinthawk.compute.graphs import stage_graphs
from glinthawk.compute.kvcache import KVStore, storage_dtype
from glinthawk.compute.layers import warm_up
from glinthawk.compute.loader import Model
from glinthawk.requests import Request, RequestError
from glinthawk.results import error_line, result_line
from glinthawk.prefix import PrefixCache
from glinthawk.scheduling import FairQueue, Intake, RunStats
from glinthawk.sequence import Sequence, commit_step, pack_step, plan_step
from glinthawk.settings import StepSettings, Tier2Settings
from glinthawk.step import StageWork, compute_stage, run_now, run_step
from glinthawk.tokenizer import Tokenizer

Emit = Callable[[dict], None]


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, kv_tokens: int, model_name: str = "glinthawk",
                 settings: StepSettings | None = None, kv_dtype: str = Tier2Settings.kv_dtype, **overrides):
        """``settings``, or any of its fields as keywords (``max_seqs=8``); ``kv_dtype``: how the KV
        store keeps K/V, as a Tier 2 node's ``--kv-dtype`` (auto: the model's dtype; int8)."""
        settings = dataclasses.replace(settings or StepSettings(), **overrides)
        max_batch_tokens, max_seqs = settings.max_batch_tokens, settings.max_seqs
        cfg = model.config
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_batch_tokens, self.max_seqs = max_batch_tokens, max_seqs
        self.store = KVStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_tokens, model.dtype, model.device,
                             kv_dtype=storage_dtype(kv_dtype, model.dtype))
        self.warmed = (0, 0)  # row counts (matmul, LM head) whose buckets are warmed: see _warm_for
        self.graphs = stage_graphs(model, settings.cuda_graphs, max_batch_tokens)
        self.intake = Intake(tokenizer, cfg.max_position_embeddings, cfg.vocab_size, kv_tokens)
        self.stats = RunStats()
        self.waiting = FairQueue()  # one queue: the engine takes requests in order
        self.prefixes = PrefixCache(enabled=settings.prefix_cache)

    def run(self, items: Iterable[Request | RequestError], emit: Emit) -> RunStats:
        """Generate for every item, calling ``emit`` with each output line as soon as it is ready."""
        source = iter(items)
        running: list[Sequence] = []
        exhausted = False
        while True:
            while not exhausted and len(self.waiting) <= self.max_seqs:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                try:
                    for member in self.intake.members(self.intake.admit(item)):
                        self.waiting.append(0, member)
                except RequestError as error:
                    self.stats.failed += 1
                    emit(error_line(error))
            self._admit(running)
            if not running:
                if exhausted and not self.waiting:
                    self._room_for(self.store.capacity_tokens)  # the run is over: its prefixes go too
                    return self.stats
                continue
            for seq in self.step(running):
                running.remove(seq)
                if seq.holds is not None:  # a prefix is filled: its readers may come in
                    seq.holds.ready = True
                    continue
                self.store.free(seq.id)
                seq.unshare()
                done = seq.completion(self.tokenizer)
                if seq.samples is not None and not seq.samples.finish(seq, done):
                    continue  # the request's other choices are still running
                self.stats.finished += 1
                emit(result_line(seq.request, seq.samples.completions if seq.samples else done, self.model_name))

    def _admit(self, running: list[Sequence]) -> None:
        """Start waiting sequences in order while there is room; a prefix that several of them
        share is filled first (by a holder of its own), then read by each."""
        while self.waiting and len(running) < self.max_seqs:
            seq = next(iter(self.waiting))
            decision = self.prefixes.decide(seq, self.waiting.peers(seq))
            if decision.kind == "wait":
                return
            if decision.kind == "fill":
                if not self._room_for(decision.length):
                    return
                prefix = self.prefixes.add(seq.prompt_ids[:decision.length], seq)
                self.store.reserve(prefix.holder.id, prefix.length)
                running.append(prefix.holder)
                continue
            if decision.kind == "read":
                seq.share(decision.ready[0])
                self.prefixes.touch(seq.prefix)
            if not self._room_for(seq.reserve_tokens):
                seq.unshare()
                return
            self.waiting.take(0, seq)
            tokens, *prefix = seq.room
            self.store.reserve(seq.id, tokens, prefix=prefix[0] if prefix else None)
            running.append(seq)

    def _room_for(self, tokens: int) -> bool:
        """Whether ``tokens`` fit the store, after taking back the room of unread prefixes if need be."""
        idle = self.prefixes.idle()
        while self.store.free_tokens < tokens and idle:
            prefix = idle.pop(0)
            self.prefixes.drop(prefix)
            self.store.free(prefix.holder.id)
        return self.store.free_tokens >= tokens

    def warm_all(self) -> None:
        """Warm every bucket now, as a node does at start-up: for callers that time the steps (benchmarks)."""
        self._warm_for(self.max_batch_tokens, self.max_seqs)

    def _warm_for(self, rows: int, head_rows: int) -> None:
        """Warm (``warm_up``) the row-count buckets up to this step's before it runs: a one-shot run
        warms only the batch sizes it reaches (a node warms all at start-up), largest first."""
        rows, head_rows = min(rows, self.max_batch_tokens), min(head_rows, self.max_seqs)
        done_rows, done_head = self.warmed
        if rows > done_rows or head_rows > done_head:
            warm_up(self.model, rows, head_rows, done_rows, done_head)
            self.warmed = (max(rows, done_rows), max(head_rows, done_head))

    @torch.inference_mode()
    def step(self, running: list[Sequence]) -> list[Sequence]:
        batch = pack_step(plan_step(running, self.max_batch_tokens), self.model.device)
        self._warm_for(sum(batch.counts), len(batch.sampled) + len(batch.scored))
        plan = AttentionPlan.of(self.store, [seq.id for seq in batch.seqs], batch.starts, batch.counts)

        async def compute(work: StageWork):
            return compute_stage(self.model, work, self.graphs)

        async def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attend_with(plan, layer, q, k, v)

        next_tokens = run_now(run_step(self.model, batch, compute, attend))
        self.stats.record_step(batch)
        return commit_step(batch, next_tokens, self.tokenizer)
