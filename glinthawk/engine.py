"""The single-process engine: Tier 1's compute and Tier 2's KV store in one process.

It is the oracle the two-tier runtime is tested against and the monolithic baseline the
benchmarks compare with, so it stays plain: continuous batching, chunked prefill under a
token budget, admission by KV capacity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from glinthawk.compute.attention import AttentionPlan, attend_with
from glinthawk.compute.kvcache import KVStore
from glinthawk.compute.layers import forward, warm_up
from glinthawk.compute.loader import Model
from glinthawk.compute.stages import head_and_sample
from glinthawk.requests import Request, RequestError, error_line, internal_error, result_line
from glinthawk.sequence import Sequence, commit_step, new_sequence, pack_step, plan_step
from glinthawk.tokenizer import Tokenizer

Emit = Callable[[dict], None]


@dataclass
class EngineStats:
    requests_done: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_tokens: int = 0  # sequences through prefill: each counts once, at its first sampled token
    steps: int = 0


class Intake:
    """Turns parsed lines into sequences: tokenizes, checks limits and duplicate ids.

    Shared by every engine that takes requests, so a bad line is judged the same way
    single-process and distributed.
    """

    def __init__(self, tokenizer: Tokenizer, max_context: int, vocab_size: int, capacity_tokens: int | None,
                 seen: Iterable[str] = ()):
        self.tokenizer, self.max_context, self.vocab_size = tokenizer, max_context, vocab_size
        self.capacity_tokens = capacity_tokens
        self._seen: set[str] = set(seen)  # custom_ids taken (``seen``: by requests admitted before)

    def admit(self, item: Request | RequestError) -> Sequence:
        """The request's sequence, or RequestError (whatever goes wrong: one line never stops the others)."""
        if isinstance(item, RequestError):
            raise item
        try:
            return self._admit(item)
        except RequestError:
            raise
        except Exception as exc:
            raise internal_error(exc, item.line, item.custom_id, item.form) from None

    def _admit(self, item: Request) -> Sequence:
        if item.custom_id in self._seen:
            raise RequestError(
                f"line {item.line}: duplicate custom_id '{item.custom_id}'", item.line, item.custom_id, item.form
            )
        self._seen.add(item.custom_id)
        seq = new_sequence(item, self.tokenizer, self.max_context, self.vocab_size)
        if self.capacity_tokens is not None and seq.reserve_tokens > self.capacity_tokens:
            raise RequestError(
                f"line {item.line}: needs {seq.reserve_tokens} KV tokens but the cache holds only "
                f"{self.capacity_tokens}; raise the KV capacity or lower max_tokens",
                item.line, item.custom_id, item.form,
            )
        return seq


class Engine:
    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        kv_tokens: int,
        max_batch_tokens: int = 2048,
        max_seqs: int = 256,
        model_name: str = "glinthawk",
    ):
        if max_batch_tokens <= 0 or max_seqs <= 0:
            raise ValueError("max_batch_tokens and max_seqs must be positive")
        cfg = model.config
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_batch_tokens, self.max_seqs = max_batch_tokens, max_seqs
        self.store = KVStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_tokens, model.dtype, model.device)
        warm_up(model, max_batch_tokens, max_seqs)
        self.intake = Intake(tokenizer, cfg.max_position_embeddings, cfg.vocab_size, kv_tokens)
        self.stats = EngineStats()

    def run(self, items: Iterable[Request | RequestError], emit: Emit) -> EngineStats:
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
                    self.stats.requests_failed += 1
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
                self.stats.requests_done += 1
                emit(result_line(seq.request, seq.completion(self.tokenizer), self.model_name))

    @torch.inference_mode()
    def step(self, running: list[Sequence]) -> list[Sequence]:
        batch = pack_step(plan_step(running, self.max_batch_tokens), self.model.device)

        plan = AttentionPlan.of(self.store, [seq.id for seq in batch.seqs], batch.starts, batch.counts)

        def local_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attend_with(plan, layer, q, k, v)

        x = forward(self.model, batch.token_ids, batch.positions, local_attention)
        next_tokens = torch.empty(0, dtype=torch.int64)
        if batch.sampled:
            seqs = batch.sampled
            next_tokens = head_and_sample(self.model, x.index_select(0, batch.sample_rows), [s.params for s in seqs],
                                          [s.seed for s in seqs], [len(s.generated) for s in seqs])
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(c for s, c in zip(batch.seqs, batch.counts) if s.num_cached < len(s.prompt_ids))
        self.stats.generated_tokens += len(batch.sampled)
        self.stats.first_tokens += batch.first_tokens
        return commit_step(batch, next_tokens, self.tokenizer)
