"""The transformer layer split into the pieces that Tier 1 runs.

Attention over the cache is the only part missing here: it lives in ``attention.py``
and runs on Tier 2 (or in-process for the single-process engine). Every function takes a
packed batch: the tokens of all sequences concatenated, ``[tokens, hidden]``, no padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from glinthawk.compute import elementwise
from glinthawk.compute.loader import LayerWeights, Model
from glinthawk.compute.matmul import linear, padded_rows, pads_rows
from glinthawk.compute.rope import Rotary, apply_rotary, rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if elementwise.fits(x, weight):
        return elementwise.rms_norm(x, weight, eps)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return weight * (x.to(torch.float32) * torch.rsqrt(variance + eps)).to(x.dtype)


def warm_up(model: Model, max_rows: int, max_sampled_rows: int, warmed_rows: int = 0,
            warmed_sampled_rows: int = 0) -> None:
    """Run every linear layer once at each padded row count up to ``max_rows`` (the LM head
    up to ``max_sampled_rows``), where ``linear`` pads: the memory those shapes keep is then
    taken at start-up, and resident memory stays flat while the node serves. Counts up to
    ``warmed_rows`` / ``warmed_sampled_rows`` (buckets already run) are skipped."""
    cfg, layer = model.config, model.layers[0]
    if not pads_rows(layer.qkv):
        return
    # Largest first: the heap grows once and later shapes reuse it (half the page faults and
    # 40-60% less resident memory than smallest first, measured in docs/PERFORMANCE.md).
    rows = _buckets(warmed_rows, max_rows)
    head = _buckets(warmed_sampled_rows, min(max_sampled_rows, head_rows(model))) if model.lm_head is not None else []
    if not rows and not head:
        return
    widest = max(cfg.hidden_size, layer.o_proj.shape[1], layer.down.shape[1])
    zeros = torch.zeros(max(rows + head) * widest, dtype=model.dtype)  # one buffer, viewed at each shape

    def x(n: int, width: int) -> torch.Tensor:
        return zeros[:n * width].view(n, width)

    with torch.inference_mode():
        for n in rows:
            linear(x(n, cfg.hidden_size), layer.qkv, layer.qkv_bias)
            linear(x(n, cfg.hidden_size), layer.gate_up)
            linear(x(n, layer.o_proj.shape[1]), layer.o_proj)
            linear(x(n, layer.down.shape[1]), layer.down)
        for n in head:
            linear(x(n, cfg.hidden_size), model.lm_head)


def _buckets(above: int, up_to: int) -> list[int]:
    """The padded row counts of ``above + 1 .. up_to`` that ``above`` did not reach, largest first."""
    covered = padded_rows(above) if above else 0
    return sorted({padded_rows(n) for n in range(above + 1, up_to + 1)} - {covered}, reverse=True)


def embed(model: Model, token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids [tokens] -> residual stream [tokens, hidden]."""
    return F.embedding(token_ids, model.embed_tokens)


def pre_attention(
    model: Model, layer: LayerWeights, x: torch.Tensor, rot: Rotary
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused QKV projection, per-head q/k norm (Qwen3) and RoPE: q [T, heads, D], k and v
    [T, kv_heads, D]."""
    cfg = model.config
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    qkv = linear(h, layer.qkv, layer.qkv_bias)
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    tokens = x.shape[0]
    q, k = q.view(tokens, cfg.num_heads, cfg.head_dim), k.view(tokens, cfg.num_kv_heads, cfg.head_dim)
    if layer.q_norm is not None:  # Qwen3 only: other models pay just this test
        q, k = rms_norm(q, layer.q_norm, cfg.rms_norm_eps), rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
    return apply_rotary(q, rot), apply_rotary(k, rot), v.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)


def post_attention(model: Model, layer: LayerWeights, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Output projection + residual, then norm, SwiGLU MLP + residual. attn_out: [T, heads, D] or [T, heads*D]."""
    h = x + linear(attn_out.reshape(x.shape[0], -1), layer.o_proj)
    gate, up = linear(rms_norm(h, layer.post_norm, model.config.rms_norm_eps), layer.gate_up).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, layer.down)


def head(model: Model, x: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: [rows, hidden] -> logits [rows, vocab] in the model's dtype."""
    return linear(rms_norm(x, model.norm, model.config.rms_norm_eps), model.lm_head)


# The head makes and samples the logits of a large batch a few rows at a time: at most
# this many bytes of float32 logits at once. Whole, those of 2048 rows would take 250 MiB
# (1 GiB with a 128k vocabulary), in fresh pages faulted in on every step; chunks this
# size stay under glibc's largest mmap threshold and reuse warm heap memory.
HEAD_CHUNK_BYTES = 32 << 20


def head_rows(model: Model) -> int:
    """Rows per chunk of the head: a power of two, at most ``HEAD_CHUNK_BYTES`` of float32 logits."""
    return 1 << max(0, (HEAD_CHUNK_BYTES // (4 * model.config.vocab_size)).bit_length() - 1)


def forward(
    model: Model,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """All layers in one go with ``attend(layer, q, k, v)`` in place of Tier 2; returns the final residual stream."""
    rot = rotary(model.inv_freq, positions, model.dtype)
    x = embed(model, token_ids)
    for index, layer in enumerate(model.layers):
        q, k, v = pre_attention(model, layer, x, rot)
        x = post_attention(model, layer, x, attend(index, q, k, v))
    return x
