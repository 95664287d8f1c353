"""Tier 1's work between two trips to Tier 2, as pure functions.

Stage ``l`` (0 <= l < layers) ends with layer l's q, k, v ready to send: it is the
embedding (l = 0) or layer l-1's post-attention, fused with layer l's pre-attention, so
each layer costs one round trip. The final stage is the last post-attention and the head.
Every function takes a packed batch, so Tier 1 can run several micro-batches that are
at the same stage as one.
"""

from __future__ import annotations

import torch

from glinthawk.compute.layers import embed, head, post_attention, pre_attention
from glinthawk.compute.loader import Model
from glinthawk.compute.rope import Rotary


def layer_stage(
    model: Model,
    stage: int,
    rot: Rotary,
    token_ids: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    attn_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x, q, k, v) with layer ``stage``'s attention inputs; ``rot``: the batch's
    ``rope.rotary``, computed once per step for all its stages."""
    if stage == 0:
        x = embed(model, token_ids)
    else:
        x = post_attention(model, model.layers[stage - 1], x, attn_out)
    q, k, v = pre_attention(model, model.layers[stage], x, rot)
    return x, q, k, v


def final_stage(model: Model, x: torch.Tensor, attn_out: torch.Tensor, sample_rows: torch.Tensor) -> torch.Tensor:
    """Last layer's post-attention and the head, for the rows that are sampled: float32 logits."""
    x = post_attention(model, model.layers[-1], x.index_select(0, sample_rows), attn_out.index_select(0, sample_rows))
    return head(model, x)
