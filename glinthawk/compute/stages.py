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

from collections.abc import Sequence

import torch

from glinthawk.compute.layers import embed, head, head_rows, post_attention, pre_attention
from glinthawk.compute.loader import Model
from glinthawk.compute.rope import Rotary
from glinthawk.compute.sampling import SamplingParams, sample


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


def final_stage(model: Model, x: torch.Tensor, attn_out: torch.Tensor, sample_rows: torch.Tensor,
                params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """Last layer's post-attention, the head and the sampler, for the rows that are sampled."""
    last = model.layer(model.config.num_layers - 1)
    x = post_attention(model, last, x.index_select(0, sample_rows), attn_out.index_select(0, sample_rows))
    return head_and_sample(model, x, params, seeds, steps)


def head_and_sample(model: Model, x: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
                    steps: Sequence[int]) -> torch.Tensor:
    """Next tokens (int64 [rows], on the CPU) of the rows ``x`` [rows, hidden], ``head_rows``
    rows at a time (``sample`` draws per row, so chunks change nothing but memory)."""
    rows = head_rows(model)
    chunks = [sample(head(model, x[first:first + rows]), params[first:first + rows], seeds[first:first + rows],
                     steps[first:first + rows]) for first in range(0, x.shape[0], rows)]
    if len(chunks) == 1:
        return chunks[0]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
