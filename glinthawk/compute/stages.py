"""Tier 1's work between two trips to Tier 2, as pure functions.

Stage ``l`` (0 <= l < layers) ends with layer l's q, k, v ready to send: it is the
embedding (l = 0) or layer l-1's post-attention, fused with layer l's pre-attention, so
each layer costs one round trip. The final stage is the last post-attention, the head and
the sampler. A model cut into pipeline stages (``Model.layer_range``) starts a stage from
the hidden states the one before handed on (no post-attention: that stage ran it), and
ends a stage that is not the last with a post-attention alone (``hand_off_stage``).
Every function takes a packed batch, so Tier 1 can run several micro-batches that are
at the same stage as one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from glinthawk.compute.layers import embed, head, head_rows, post_attention, pre_attention
from glinthawk.compute.loader import Model
from glinthawk.compute.logprobs import Sampled, Scores, log_softmax, score
from glinthawk.compute.rope import Rotary
from glinthawk.compute.sampling import SamplingParams, sample
from glinthawk.grammar import apply_masks


def layer_stage(
    model: Model,
    stage: int,
    rot: Rotary,
    token_ids: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    attn_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x, q, k, v) with layer ``stage``'s attention inputs; ``rot``: the batch's
    ``rope.rotary``, computed once per step for all its stages. Without ``attn_out`` (a
    pipeline stage's first layer), ``x`` is the hidden state the stage before handed on."""
    if stage == 0:
        x = embed(model, token_ids)
    elif attn_out is not None:
        x = post_attention(model, model.layer(stage - 1), x, attn_out)
    q, k, v = pre_attention(model, model.layer(stage), x, rot)
    return x, q, k, v


def hand_off_stage(model: Model, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The last post-attention of a pipeline stage that is not the model's last: the hidden
    states the next stage starts from."""
    return post_attention(model, model.layer(model.layer_range.stop - 1), x, attn_out)


Scoring = tuple[torch.Tensor, torch.Tensor, Sequence[int]]  # prompt rows, their next tokens, alternatives wanted
Masking = tuple[torch.Tensor, torch.Tensor]  # constrained sampled rows, their allowed-token bitmasks


def final_stage(model: Model, x: torch.Tensor, attn_out: torch.Tensor, sample_rows: torch.Tensor,
                params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
                scoring: Scoring | None = None, masking: Masking | None = None) -> Sampled:
    """Last layer's post-attention, the head and the sampler, for the rows that are sampled;
    and, apart (the sampled rows' compute stays as it is), for the prompt rows ``scoring`` names."""
    last = model.layer(model.config.num_layers - 1)
    if len(sample_rows):
        h = post_attention(model, last, x.index_select(0, sample_rows), attn_out.index_select(0, sample_rows))
        out = head_and_sample(model, h, params, seeds, steps, masking)
    else:
        out = Sampled.empty()
    if scoring is not None:
        rows, tokens, top = scoring
        h = post_attention(model, last, x.index_select(0, rows), attn_out.index_select(0, rows))
        out.prompt = head_and_score(model, h, tokens, top)
    return out


def head_and_sample(model: Model, x: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
                    steps: Sequence[int], masking: Masking | None = None,
                    head_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Sampled:
    """Next tokens (int64 [rows], on the CPU) of the rows ``x`` [rows, hidden], ``head_rows``
    rows at a time (``sample`` draws per row, so chunks change nothing but memory), and the
    log-probs of those whose params ask for them; the rows ``masking`` names draw only among
    the tokens their bitmask allows (structured output; log-probs stay the raw ones).
    ``head_fn``: what makes a chunk's logits (default ``layers.head``; graphs.py replays a graph)."""
    rows = head_rows(model)
    head_fn = head_fn or (lambda chunk: head(model, chunk))
    tokens, scored = [], []
    for first in range(0, x.shape[0], rows):
        chunk = params[first:first + rows]
        logits = head_fn(x[first:first + rows])
        asked = [i for i, p in enumerate(chunk) if p.logprobs is not None]
        logprobs = log_softmax(logits[asked]) if asked else None  # before sampling: from the raw logits
        if masking is not None:
            _mask_chunk(logits, masking, first)
        tokens.append(sample(logits, chunk, seeds[first:first + rows], steps[first:first + rows]))
        if asked:
            scored.append(score(logprobs, tokens[-1][asked], [chunk[i].logprobs for i in asked]))
    if not tokens:
        return Sampled.empty()
    return Sampled(tokens[0] if len(tokens) == 1 else torch.cat(tokens), Scores.cat(scored))


def _mask_chunk(logits: torch.Tensor, masking: Masking, first: int) -> None:
    """Apply the bitmasks of the masked rows that fall in the chunk starting at row ``first``."""
    mask_rows, masks = masking
    if first == 0 and len(mask_rows) and int(mask_rows.max()) < logits.shape[0]:  # every masked row in this chunk
        apply_masks(logits, mask_rows, masks)
        return
    inside = (mask_rows >= first) & (mask_rows < first + logits.shape[0])
    if bool(inside.any()):
        apply_masks(logits, mask_rows[inside] - first, masks[inside])


def head_and_score(model: Model, x: torch.Tensor, tokens: torch.Tensor, top: Sequence[int]) -> Scores:
    """Log-probs of ``tokens`` at the rows ``x`` (prompt rows), ``head_rows`` rows at a time."""
    rows = head_rows(model)
    return Scores.cat([score(log_softmax(head(model, x[first:first + rows])), tokens[first:first + rows],
                             top[first:first + rows]) for first in range(0, x.shape[0], rows)])
