"""Log-probabilities of chosen tokens under the model's raw distribution, and what a step returns.

Log-probs are those of the logits as the head makes them: before temperature, top-k, top-p
and min-p (vLLM's default, ``logprobs_mode="raw_logprobs"``), so a token's log-prob does not
depend on how it was sampled. They are computed only for the rows that ask: a step whose
requests ask for none pays nothing but an empty check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default max_logprobs)


@dataclass
class Scores:
    """Per scored row: its token's log-prob and rank, and the row's ``k`` most likely tokens
    (k = the largest any row asked for; a row that asked for fewer reads only its first ones)."""

    logprob: torch.Tensor  # [n] float32
    rank: torch.Tensor  # [n] int64: 1 + how many tokens are more likely than the row's token
    top_ids: torch.Tensor  # [n, k] int64, most likely first
    top_logprobs: torch.Tensor  # [n, k] float32

    def __len__(self) -> int:
        return int(self.logprob.shape[0])

    def split(self, sizes: Sequence[int]) -> list[Scores]:
        parts = zip(*(t.split(list(sizes)) for t in (self.logprob, self.rank, self.top_ids, self.top_logprobs)))
        return [Scores(*part) for part in parts]

    def wire(self) -> list:
        """As msgpack takes it (float32 values widen to float64 exactly)."""
        return [self.logprob.tolist(), self.rank.tolist(), self.top_ids.tolist(), self.top_logprobs.tolist()]

    @staticmethod
    def from_wire(value: list) -> Scores:
        logprob, rank, top_ids, top_logprobs = value
        rows = len(logprob)
        return Scores(torch.tensor(logprob, dtype=torch.float32), torch.tensor(rank, dtype=torch.int64),
                      torch.tensor(top_ids, dtype=torch.int64).reshape(rows, -1),
                      torch.tensor(top_logprobs, dtype=torch.float32).reshape(rows, -1))

    @staticmethod
    def cat(parts: Sequence[Scores]) -> Scores | None:
        parts = [p for p in parts if len(p)]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        k = max(p.top_ids.shape[1] for p in parts)
        return Scores(torch.cat([p.logprob for p in parts]), torch.cat([p.rank for p in parts]),
                      torch.cat([_widen(p.top_ids, k, 0) for p in parts]),
                      torch.cat([_widen(p.top_logprobs, k, float("-inf")) for p in parts]))


def _widen(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    return t if t.shape[1] == k else torch.nn.functional.pad(t, (0, k - t.shape[1]), value=fill)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The rows' log-probabilities in float32 (a bf16 model's logits widen exactly)."""
    return torch.log_softmax(logits.float(), dim=-1)


def score(logprobs: torch.Tensor, tokens: torch.Tensor, top: Sequence[int]) -> Scores:
    """``Scores`` of ``tokens`` [n] under ``logprobs`` [n, vocab] (from ``log_softmax``), with
    ``max(top)`` alternatives per row; all on the CPU."""
    tokens = tokens.to(logprobs.device)
    chosen = logprobs.gather(1, tokens[:, None])
    rank = (logprobs > chosen).sum(dim=-1) + 1
    k = min(max(top, default=0), logprobs.shape[1])
    if k:
        best = torch.topk(logprobs, k, dim=-1)
        top_ids, top_logprobs = best.indices, best.values
    else:
        top_ids = torch.empty(len(tokens), 0, dtype=torch.int64, device=logprobs.device)
        top_logprobs = torch.empty(len(tokens), 0, dtype=torch.float32, device=logprobs.device)
    return Scores(chosen[:, 0].cpu(), rank.cpu(), top_ids.cpu(), top_logprobs.cpu())


@dataclass
class Sampled:
    """A step's answer from the head: the sampled tokens and, only where rows asked, log-probs:
    of the sampled tokens of the rows whose params ask (in sampled-row order), and of the scored
    (prompt) rows' given tokens."""

    tokens: torch.Tensor  # int64 [sampled rows], on the CPU
    logprobs: Scores | None = None
    prompt: Scores | None = None

    @staticmethod
    def empty() -> Sampled:
        return Sampled(torch.empty(0, dtype=torch.int64))

    def wire(self) -> dict:
        """The TOKENS frame's fields."""
        out: dict = {"tokens": self.tokens.tolist()}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs.wire()
        if self.prompt is not None:
            out["prompt_logprobs"] = self.prompt.wire()
        return out

    @staticmethod
    def from_wire(header: dict) -> Sampled:
        logprobs, prompt = header.get("logprobs"), header.get("prompt_logprobs")
        return Sampled(torch.tensor(header["tokens"], dtype=torch.int64),
                       None if logprobs is None else Scores.from_wire(logprobs),
                       None if prompt is None else Scores.from_wire(prompt))

    def split(self, sampled: Sequence[int], with_logprobs: Sequence[int], scored: Sequence[int]) -> list[Sampled]:
        """Per micro-batch of a merged job: ``sampled`` rows, of which ``with_logprobs`` asked,
        and ``scored`` prompt rows each."""
        count = len(sampled)
        tokens = self.tokens.split(list(sampled))
        logprobs = self.logprobs.split(with_logprobs) if self.logprobs is not None else [None] * count
        prompt = self.prompt.split(scored) if self.prompt is not None else [None] * count
        return [Sampled(t, lp if lp is not None and len(lp) else None, p if p is not None and len(p) else None)
                for t, lp, p in zip(tokens, logprobs, prompt)]
