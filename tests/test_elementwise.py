"""RMSNorm, RoPE and argmax in C (one thread) against the torch expressions they replace."""

from __future__ import annotations

import pytest
import torch

from glinthawk.compute import elementwise, layers, rope

pytestmark = pytest.mark.skipif(elementwise._elementwise is None,
                                reason="the C elementwise kernels are not built (no C compiler at install time)")


def torch_rms_norm(x, weight, eps):
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return weight * (x.to(torch.float32) * torch.rsqrt(variance + eps)).to(x.dtype)


def torch_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos[:, None, :] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim,heads", [(1, 64, 1), (7, 96, 3), (64, 768, 12), (200, 256, 4)])
def test_same_results_as_torch(dtype, rows, dim, heads):
    g = torch.Generator().manual_seed(rows + dim)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    weight = torch.randn(dim, generator=g).to(dtype)
    assert elementwise.fits(x, weight)
    ours, reference = layers.rms_norm(x, weight, 1e-5), torch_rms_norm(x, weight, 1e-5)
    if dtype == torch.bfloat16:  # the same roundings: bit for bit
        assert torch.equal(ours, reference)
    else:  # only the order of the float32 sum of squares differs
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    head_dim = dim // heads
    qkv = torch.randn(rows, dim + 2 * head_dim, generator=g).to(dtype)
    q = qkv[:, :dim].view(rows, heads, head_dim)  # a column slice, as pre_attention passes it
    angles = torch.randn(rows, head_dim, generator=g)
    rot = rope.Rotary(angles.cos().to(dtype), angles.sin().to(dtype))
    rotated = rope.apply_rotary(q, rot)
    assert rotated.is_contiguous() and torch.equal(rotated, torch_rotary(q, rot.cos, rot.sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batches_stay_in_c(dtype):
    """A prefill-sized chunk: RMSNorm and RoPE in C, the same results as torch."""
    tokens = 4096
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(tokens, 64, generator=g).to(dtype), torch.randn(64, generator=g).to(dtype)
    q = torch.randn(tokens, 3, 64, generator=g).to(dtype)
    rot = rope.rotary(torch.rand(32, generator=g), torch.arange(tokens), dtype)
    assert elementwise.fits(x, weight) and elementwise.fits(q, rot.cos, rot.sin)
    normed = layers.rms_norm(x, weight, 1e-6)
    if dtype == torch.bfloat16:
        assert torch.equal(normed, torch_rms_norm(x, weight, 1e-6))
    else:
        torch.testing.assert_close(normed, torch_rms_norm(x, weight, 1e-6), atol=2e-6, rtol=2e-6)
    assert torch.equal(rope.apply_rotary(q, rot), torch_rotary(q, rot.cos, rot.sin))


def test_torch_handles_what_does_not_fit():
    assert not elementwise.fits(torch.randn(4, 64).half(), torch.ones(64).half())
    assert not elementwise.fits(torch.randn(4, 64), torch.ones(128)[::2])  # a strided weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 100, 32000])
def test_argmax_is_torch_argmax(cols, dtype):
    """The first maximum (ties included), the first NaN where a row has one, all -inf rows."""
    g = torch.Generator().manual_seed(cols)
    rows = torch.randint(-3, 4, (40, cols), generator=g).to(dtype)  # few values: many ties
    rows[1] = float("-inf")
    rows[2, cols // 2] = float("nan")
    rows[3, -1] = float("nan")
    rows[4, -1] = 100.0
    rows[5] = torch.randn(cols, generator=g)
    rows[6] = torch.randn(cols, generator=g) * 1e-3 + 1  # values bf16 tells apart only in its last bits
    assert elementwise.fits(rows)  # the C loop, not torch's fallback
    assert torch.equal(elementwise.argmax(rows), torch.argmax(rows, dim=-1))
    assert torch.equal(elementwise.argmax(rows[:, : cols // 2 + 1]), torch.argmax(rows[:, : cols // 2 + 1], dim=-1))


def test_dtype_codes_come_from_the_extensions():
    """Python reads the kernels' dtype codes from the modules (one header), not from a copy."""
    from glinthawk.compute import attention_kernels, sampling

    modules = [m for m in (elementwise._elementwise, attention_kernels._attention, sampling._sampling) if m]
    assert {(m.FLOAT32, m.BFLOAT16, m.INT8) for m in modules} == {(0, 1, 2)}
    assert elementwise.C_DTYPE_CODES == {torch.float32: 0, torch.bfloat16: 1}


def test_prefill_packing_sizes_come_from_the_kernel():
    """pack_kv's buffer sizes: 16-key tiles, a multiple of 4 of them, for keys; key pairs for values."""
    from glinthawk.compute import attention_kernels

    if attention_kernels._attention is None:
        pytest.skip("the C attention kernels are not built")
    for length in (0, 1, 63, 64, 65, 1000):
        tiles = -(-length // 64) * 4
        assert attention_kernels._attention.packed_kv_words(length, 128) == (tiles * 16 * 64, (length + 1) // 2 * 128)
