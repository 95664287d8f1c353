"""Rotary position embedding (RoPE), computed exactly as Hugging Face does in float32."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from glinthawk.compute import elementwise
from glinthawk.compute.config import RopeConfig


class Rotary(NamedTuple):
    """cos/sin for each token of a packed batch: [tokens, head_dim], in the model dtype."""

    cos: torch.Tensor
    sin: torch.Tensor


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths are divided by ``factor``, short
    ones kept, and the band between them interpolated smoothly."""
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotary(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> Rotary:
    """cos/sin for ``positions`` ([tokens] int64), shared by every layer of one step."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return Rotary(angles.cos().to(dtype), angles.sin().to(dtype))


def apply_rotary(x: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] (half-split layout, as in HF Llama)."""
    if elementwise.fits(x, rot.cos, rot.sin):
        return elementwise.rotary(x, rot.cos, rot.sin)
    cos, sin = rot.cos[:, None, :], rot.sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
