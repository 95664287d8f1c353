"""A request's life as a sequence of tokens, and the packing of sequences into a step.

Shared by the single-process engine and Tier 1: both plan a step the same way (decode
tokens first, then prefill chunks up to a token budget), pack it the same way, and
finish sequences with the same stop rules.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from glinthawk.compute.logprobs import Sampled, Scores
from glinthawk.compute.sampling import SamplingParams
from glinthawk.grammar import GrammarError, Matcher, compiler_for, fill_masks
from glinthawk.logprobs import Scored, render
from glinthawk.requests import Request, RequestError
from glinthawk.results import Completion
from glinthawk.stops import StopState
from glinthawk.tokenizer import Tokenizer, TokenizerError, TooManyTokens

if TYPE_CHECKING:
    from glinthawk.prefix import Prefix
    from glinthawk.samples import Samples

log = logging.getLogger("glinthawk.sequence")

_ids = itertools.count()


def next_id() -> int:
    """A sequence id no other sequence of this process has (ids name sequences on the KV stores)."""
    return next(_ids)


@dataclass(eq=False)  # identity: a sequence is itself, however its fields compare
class Sequence:
    request: Request
    prompt_ids: list[int]
    seed: int
    id: int = field(default_factory=next_id)
    generated: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    stop_text: str | None = None  # generated text cut before a stop string, once one is hit
    stops: StopState | None = field(default=None, repr=False)  # built at the first generated token
    # Asked-for log-probs, as they come: one per generated token; one per prompt token (the
    # first stays None), written by position so that a rebuilt sequence rewrites the same ones.
    logprobs: list[Scored] | None = field(default=None, repr=False)
    prompt_logprobs: list[Scored | None] | None = field(default=None, repr=False)
    # Structured output: where the generated tokens stand in the request's grammar (advanced
    # only as tokens are committed, so it always matches ``generated``).
    matcher: Matcher | None = field(default=None, repr=False)
    # Shared prefixes (prefix.py): the one this sequence reads its first tokens' KV from, or
    # the one it fills (a holder, which generates nothing).
    prefix: Prefix | None = field(default=None, repr=False)
    holds: Prefix | None = field(default=None, repr=False)
    # n samples (samples.py): the request's choices, and which of them this sequence is.
    samples: Samples | None = field(default=None, repr=False)
    sample_index: int = 0

    def __post_init__(self) -> None:
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def reserve_tokens(self) -> int:
        """KV room of its own the whole life of the sequence needs (the last sampled token is
        never cached; a prompt only scored, max_tokens 0, is cached whole; a prefix it reads is not its own)."""
        return len(self.prompt_ids) + max(self.params.max_tokens, 1) - 1 - self.prefix_tokens

    @property
    def prefix_tokens(self) -> int:
        return self.prefix.length if self.prefix is not None else 0

    @property
    def room(self) -> list[int]:
        """What a KV store reserves for it: [tokens], or [tokens, the id of the prefix's holder]."""
        return [self.reserve_tokens] if self.prefix is None else [self.reserve_tokens, self.prefix.holder.id]

    def share(self, prefix: Prefix) -> None:
        """Read ``prefix``'s KV: its tokens count as cached, and prefill starts after them."""
        self.prefix, self.num_cached = prefix, prefix.length
        prefix.readers += 1

    def unshare(self) -> None:
        """Stop reading a prefix (the sequence ended, or its KV is lost and is to be rebuilt whole)."""
        if self.prefix is not None:
            self.prefix.readers -= 1
            self.prefix, self.num_cached = None, 0

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def pending(self) -> int:
        """Tokens that still have to go through the model before the next sample."""
        return self.total_tokens - self.num_cached

    def token_slice(self, start: int, count: int) -> list[int]:
        """Tokens start..start+count of prompt + generated, without joining the two lists (a hot path)."""
        prompt = len(self.prompt_ids)
        tokens = self.prompt_ids[start:start + count]
        if start + count > prompt:
            tokens += self.generated[max(0, start - prompt):start + count - prompt]
        return tokens

    def append(self, token: int, tokenizer: Tokenizer) -> bool:
        """Record a sampled token; returns True when the sequence has finished."""
        self.generated.append(token)
        params = self.params
        if self.stops is None:
            self.stops = StopState(params.stop, params.stop_token_ids)
        if self.matcher is not None and self._grammar_ends(token, tokenizer):
            self.finish_reason = "stop"
        elif (token in tokenizer.eos_token_ids and not params.ignore_eos) or token in self.stops.token_ids:
            self.finish_reason = "stop"
        elif params.stop and self._hit_stop_string(tokenizer):
            self.finish_reason = "stop"
        elif len(self.generated) >= params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def _grammar_ends(self, token: int, tokenizer: Tokenizer) -> bool:
        """Advance the grammar; True once it is complete (EOS is masked out until it is)."""
        if token in tokenizer.eos_token_ids:
            return True
        if not self.matcher.advance(token):  # the mask allowed it, so this is a bug: end, do not loop
            log.error("line %d: token %d left the grammar (%s)", self.request.line, token, self.matcher.error)
            return True
        return self.matcher.done

    def _hit_stop_string(self, tokenizer: Tokenizer) -> bool:
        at = self.stops.find(tokenizer, self.generated)
        if at is not None:  # once per sequence: the whole text, to cut it
            self.stop_text = tokenizer.decode(self.generated)[:at]
        return at is not None

    @property
    def only_scored(self) -> bool:
        """A prompt to score, nothing to generate (max_tokens 0), or a shared prefix to fill: its
        last row is never sampled."""
        return self.params.max_tokens == 0 or self.holds is not None

    def completion(self, tokenizer: Tokenizer) -> Completion:
        text = self.stop_text if self.stop_text is not None else tokenizer.decode(self.generated)
        done = Completion(text, list(self.generated), self.finish_reason or "length", len(self.prompt_ids))
        if self.logprobs is not None:
            done.logprobs = render(tokenizer, self.generated, self.logprobs)
        if self.prompt_logprobs is not None:
            done.prompt_logprobs = render(tokenizer, self.prompt_ids, self.prompt_logprobs)
        if self.request.echo:
            done.prompt_text = self.request.prompt if isinstance(self.request.prompt, str) \
                else tokenizer.decode(self.prompt_ids)
        return done


def new_sequence(request: Request, tokenizer: Tokenizer, max_context: int, vocab_size: int) -> Sequence:
    """Tokenize and check a request against the model; raises RequestError.

    Its cost is bounded by the context, not by the line: a prompt that cannot fit fails
    before it is tokenized whole (or, as token ids, before they are looked at).
    """
    def fail(message: str) -> RequestError:
        return RequestError(f"line {request.line}: {message}", request.line, request.custom_id, request.form)

    generation = tokenizer.generation
    # A max_tokens the checkpoint supplies is capped at what the prompt leaves (below), so
    # any prompt that leaves room for one token fits.
    default_max = "max_tokens" in request.unset and "max_tokens" in generation.sampling_defaults
    max_tokens = 1 if default_max else request.params.max_tokens
    room = max_context - max_tokens  # prompt tokens the context leaves

    def over(count: int, exact: bool = True) -> RequestError:
        tokens, total = (f"{count} tokens", f" = {count + max_tokens}") if exact else (f"at least {count} tokens", "")
        return fail(f"prompt ({tokens}) + max_tokens ({max_tokens}){total} exceeds the model's context of "
                    f"{max_context} tokens; shorten the prompt or lower max_tokens")

    _check_stop_token_ids(request.params.stop_token_ids, vocab_size, fail)
    try:
        if request.messages is not None:
            prompt_ids = tokenizer.encode_chat(request.messages, limit=room, template_kwargs=request.template_kwargs)
        elif isinstance(request.prompt, str):
            prompt_ids = tokenizer.encode_within(request.prompt, room)
        else:
            prompt_ids = request.prompt or []
    except TooManyTokens as exc:
        raise over(exc.at_least, exact=False) from None
    except TokenizerError as exc:
        raise fail(str(exc)) from None
    if not prompt_ids:
        raise fail("the prompt encodes to no tokens")
    if len(prompt_ids) > room:  # before the ids are looked at: a line may hold millions
        raise over(len(prompt_ids))
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise fail(f"prompt token ids must lie in [0, {vocab_size})")
    if request.unset:  # the fields the line left out take generation_config.json's defaults
        request.params = generation.apply(request.params, request.unset, max_context - len(prompt_ids))
    seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
    matcher = None
    if request.structured is not None:
        try:
            matcher = compiler_for(tokenizer, vocab_size).matcher(request.structured)
        except GrammarError as exc:
            raise fail(str(exc)) from None
    return Sequence(request, list(prompt_ids), seed, matcher=matcher)


def _check_stop_token_ids(ids: Seq[int], vocab_size: int, fail: Callable[[str], RequestError]) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise fail(f"'stop_token_ids' holds {bad}, outside this model's vocabulary [0, {vocab_size}); "
                   "give ids below the vocabulary size")


def plan_step(running: Seq[Sequence], budget: int) -> list[tuple[Sequence, int]]:
    """Choose how many tokens each sequence feeds this step: decodes first, then prefill chunks."""
    plan: list[tuple[Sequence, int]] = []
    for seq in running:
        if budget == 0:
            break
        if seq.pending == 1:
            plan.append((seq, 1))
            budget -= 1
    for seq in running:
        if budget == 0:
            break
        if seq.pending > 1:
            count = min(seq.pending, budget)
            plan.append((seq, count))
            budget -= count
    return plan


@dataclass
class StepBatch:
    """One step's packed inputs: the tokens of all planned sequences, concatenated."""

    seqs: list[Sequence]
    starts: list[int]
    counts: list[int]
    token_ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor  # [tokens] int64
    sample_rows: torch.Tensor  # rows of the packed batch whose logits are sampled
    sampled: list[Sequence]  # the sequences those rows belong to
    # Prompt rows scored for prompt_logprobs: each row, the prompt token after it, how many
    # alternatives, and (sequence, position of that token) to file the answer under.
    score_rows: torch.Tensor | None = None
    score_tokens: torch.Tensor | None = None
    score_top: list[int] = field(default_factory=list)
    scored: list[tuple[Sequence, int]] = field(default_factory=list)
    # Structured output: the sampled rows (indices into ``sampled``) that are constrained,
    # and their allowed-token bitmasks (int32 [rows, words], grammar.fill_masks).
    mask_rows: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def sampling(self) -> tuple[list[SamplingParams], list[int], list[int]]:
        """What the sampler draws with: each sampled sequence's parameters, seed and step."""
        seqs = self.sampled
        return [s.params for s in seqs], [s.seed for s in seqs], [len(s.generated) for s in seqs]

    @property
    def first_tokens(self) -> int:
        """How many sequences get their first generated token this step (read before commit_step)."""
        return sum(1 for seq in self.sampled if not seq.generated)


def pack_step(plan: list[tuple[Sequence, int]], device: torch.device | str = "cpu") -> StepBatch:
    tokens: list[int] = []
    positions: list[int] = []
    sample_rows: list[int] = []
    sampled: list[Sequence] = []
    scored: list[tuple[Sequence, int]] = []
    score_rows: list[int] = []
    for seq, count in plan:
        start = seq.num_cached
        if seq.prompt_logprobs is not None:  # rows before the prompt's last predict a prompt token
            first_row = len(tokens)
            for position in range(start, min(start + count, len(seq.prompt_ids) - 1)):
                score_rows.append(first_row + position - start)
                scored.append((seq, position + 1))
        tokens += seq.token_slice(start, count)
        positions += range(start, start + count)
        if start + count == seq.total_tokens and not seq.only_scored:
            sample_rows.append(len(tokens) - 1)
            sampled.append(seq)
    batch = StepBatch(
        seqs=[seq for seq, _ in plan],
        starts=[seq.num_cached for seq, _ in plan],
        counts=[count for _, count in plan],
        token_ids=torch.tensor(tokens, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=device),
        sampled=sampled,
    )
    if scored:
        batch.score_rows = torch.tensor(score_rows, dtype=torch.int64, device=device)
        batch.score_tokens = torch.tensor([seq.prompt_ids[at] for seq, at in scored], dtype=torch.int64)
        batch.score_top = [seq.params.prompt_logprobs for seq, _ in scored]
        batch.scored = scored
    constrained = [i for i, seq in enumerate(sampled) if seq.matcher is not None]
    if constrained:  # before the step, from the tokens committed so far
        batch.mask_rows = torch.tensor(constrained, dtype=torch.int64)
        batch.masks = fill_masks([sampled[i].matcher for i in constrained])
    return batch


def commit_step(batch: StepBatch, out: Sampled, tokenizer: Tokenizer) -> list[Sequence]:
    """Advance every sequence of a finished step; returns the sequences that finished."""
    finished = []
    for seq, count in zip(batch.seqs, batch.counts):
        seq.num_cached += count
        if seq.only_scored and seq.num_cached >= len(seq.prompt_ids):
            seq.finish_reason = "length"
            finished.append(seq)
    if out.prompt is not None:
        for (seq, at), entry in zip(batch.scored, _entries(out.prompt, batch.score_top)):
            seq.prompt_logprobs[at] = entry
    asked = [seq for seq in batch.sampled if seq.logprobs is not None]
    if asked:
        for seq, entry in zip(asked, _entries(out.logprobs, [seq.params.logprobs for seq in asked])):
            seq.logprobs.append(entry)
    for seq, token in zip(batch.sampled, out.tokens.tolist()):
        if seq.append(token, tokenizer):
            finished.append(seq)
    return finished


def _entries(scores: Scores, top: Seq[int]) -> list[Scored]:
    """Each row's (log-prob, rank, [(token, log-prob)] of its ``top[row]`` alternatives)."""
    logprob, rank = scores.logprob.tolist(), scores.rank.tolist()
    ids, values = scores.top_ids.tolist(), scores.top_logprobs.tolist()
    return [Scored(lp, r, list(zip(i[:k], v[:k]))) for lp, r, i, v, k in zip(logprob, rank, ids, values, top)]
