"""An int8 KV store: quantization bounds, attention over it on every path, compaction, bytes."""

from __future__ import annotations

import pytest
import torch

from glinthawk.compute import attention_kernels, kvquant
from glinthawk.compute.attention import AttentionPlan, attend, attend_with
from glinthawk.compute.kvcache import KVStore, bytes_per_token

# Tolerances, stated once. Attention over an int8 store against fp32 math over the very
# values it holds (dequantized): the C kernels round q and the weights to int16 on the
# AVX512_VNNI path (about 1e-4 of the output's scale) and the output to the model's dtype.
# Against fp32 math over the unquantized K/V (standard normal data): int8 rounding, at most
# half a step of max|row| / 127 per element, moves outputs by about 1e-2 here.
TOLERANCE_STORED = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
TOLERANCE_UNQUANTIZED = 6e-2


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """fp32 causal attention: q [n, heads, D] at positions start.., keys/values [start+n, kv_heads, D]."""
    n, heads, dim = q.shape
    group = heads // keys.shape[1]
    k, v = keys.float().repeat_interleave(group, dim=1), values.float().repeat_interleave(group, dim=1)
    out = torch.empty(n, heads, dim)
    for i in range(n):
        scores = torch.einsum("hd,lhd->hl", q[i].float(), k[:start + i + 1]) / dim**0.5
        out[i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[:start + i + 1])
    return out


def stored(s: KVStore, layer: int, seq_id, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the store holds for a sequence, dequantized, as [length, kv_heads, D]."""
    keys, values = s.view(layer, seq_id, length)
    return keys.transpose(0, 1), values.transpose(0, 1)


def test_quantize_round_trip_is_within_half_a_step_of_each_rows_scale():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 3, 32, generator=g) * torch.logspace(-6, 4, 64)[:, None, None]
    rows[0, 0] = 0  # an all-zero row
    rows[1, 1, 5] = 1e4  # one outlier
    q, scales = kvquant.quantize(rows)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == rows.shape[:-1]
    assert int(q.abs().max()) <= 127
    amax = rows.abs().amax(-1)
    step = scales.float()
    assert torch.all(step >= amax / 127) and torch.all(step[amax > 0] <= amax[amax > 0] / 127 * (1 + 2**-7))
    error = (kvquant.dequantize(q, scales, torch.float32) - rows).abs()
    assert torch.all(error <= step.unsqueeze(-1) / 2 * (1 + 1e-6))
    assert torch.equal(kvquant.dequantize(q[0, 0], scales[0, 0], torch.float32), torch.zeros(32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_the_decode_kernel_appends_equal_what_torch_writes(dtype):
    """The C kernel quantizes the rows it appends itself; they must be the very bytes torch writes."""
    if attention_kernels._attention is None:
        pytest.skip("the C kernels are not built")
    heads, kv_heads, dim = 4, 2, 64
    s = KVStore(1, kv_heads, dim, 64, dtype, kv_dtype=torch.int8)
    g = torch.Generator().manual_seed(1)
    names = ["a", "b", "c"]
    for name in names:
        s.reserve(name, 8)
    for step in range(3):
        q, k, v = (torch.randn(3, h, dim, generator=g).to(dtype) * 4 for h in (heads, kv_heads, kv_heads))
        plan = AttentionPlan.of(s, names, [step] * 3, [1] * 3)
        assert plan.write_rows is None  # the kernel appends
        attend_with(plan, 0, q, k, v)
        for row, name in enumerate(names):
            keys, values, key_scales, value_scales = (t[:, step] for t in s.stored(0, name, step + 1))
            for x, data, scales in ((k, keys, key_scales), (v, values, value_scales)):
                want, want_scales = kvquant.quantize(x[row])
                assert torch.equal(data, want) and torch.equal(scales, want_scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,heads,kv_heads", [(32, 8, 2), (48, 6, 2), (64, 12, 4), (128, 4, 1), (16, 4, 4)])
def test_decode_over_int8_matches_the_reference(dtype, dim, heads, kv_heads, attention_path):
    """Ragged decodes (1 to 1100 cached tokens; GQA, MQA, MHA): the output within a stated
    tolerance of fp32 math over what the store holds, and of fp32 math over the unquantized
    K/V; then further steps, where the kernel appends."""
    lengths = [1, 17, 70, 1100]  # 1100: the kernel's int16 weights outgrow its K tile
    s = KVStore(2, kv_heads, dim, 1300, dtype, kv_dtype=torch.int8)
    g = torch.Generator().manual_seed(dim + heads)
    names = [f"s{i}" for i in range(len(lengths))]
    full = {}
    for name, length in zip(names, lengths):
        s.reserve(name, length + 2)
        full[name] = [torch.randn(length + 2, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]
        if length > 1:
            for layer in range(2):
                attend(s, layer, [name], [0], [length - 1], *(t[:length - 1] for t in full[name]))
    for step in range(2):
        starts = [length - 1 + step for length in lengths]
        q, k, v = (torch.cat([full[n][i][p:p + 1] for n, p in zip(names, starts)]) for i in range(3))
        for layer in range(2):
            out = attend(s, layer, names, starts, [1] * len(names), q, k, v)
            assert out.dtype == dtype
            for row, (name, start) in enumerate(zip(names, starts)):
                keys, values = stored(s, layer, name, start + 1)
                fq, fk, fv = (t[:start + 1] for t in full[name])
                got = out[row:row + 1].float()
                torch.testing.assert_close(got, reference(fq[start:], keys, values, start),
                                           atol=TOLERANCE_STORED[dtype], rtol=0)
                torch.testing.assert_close(got, reference(fq[start:], fk, fv, start), atol=TOLERANCE_UNQUANTIZED,
                                           rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,heads,kv_heads", [(32, 8, 2), (64, 12, 4), (128, 4, 1), (48, 6, 2)])
def test_prefill_chunks_over_int8_match_the_reference(dtype, dim, heads, kv_heads, monkeypatch):
    """Prompts in chunks, first and later, next to decodes in the same batch: the bf16 prefill
    kernel packs straight from int8 where the CPU has AVX512_BF16, else the rows are dequantized
    for SDPA; both within tolerance of fp32 math over what the store holds."""
    kernel_calls = []
    real = attention_kernels.prefill_fused
    monkeypatch.setattr(attention_kernels, "prefill_fused", lambda *args: kernel_calls.append(len(args)) or real(*args))
    s = KVStore(1, kv_heads, dim, 1024, dtype, kv_dtype=torch.int8)
    g = torch.Generator().manual_seed(dim)
    chunks = {"one": [1, 2, 1], "blocks": [16, 33, 64, 5], "long": [130, 70]}
    full = {}
    for name, sizes in chunks.items():
        s.reserve(name, sum(sizes))
        full[name] = [torch.randn(sum(sizes), h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]
    for step in range(max(len(sizes) for sizes in chunks.values())):
        names = [name for name, sizes in chunks.items() if step < len(sizes)]
        starts = [sum(chunks[name][:step]) for name in names]
        counts = [chunks[name][step] for name in names]
        q, k, v = (torch.cat([full[n][i][p:p + c] for n, p, c in zip(names, starts, counts)]) for i in range(3))
        out = attend(s, 0, names, starts, counts, q, k, v)
        offset = 0
        for name, start, count in zip(names, starts, counts):
            keys, values = stored(s, 0, name, start + count)
            expected = reference(full[name][0][start:start + count], keys, values, start)
            torch.testing.assert_close(out[offset:offset + count].float(), expected, atol=TOLERANCE_STORED[dtype],
                                       rtol=0)
            offset += count
    kernel = (dtype == torch.bfloat16 and dim % 32 == 0 and attention_kernels._attention is not None
              and attention_kernels._attention.prefill_supported())
    assert bool(kernel_calls) == kernel and all(n == 7 for n in kernel_calls)  # with the int8 scales


def test_compaction_moves_int8_rows_with_their_scales():
    s = KVStore(2, 2, 32, 24, torch.bfloat16, kv_dtype=torch.int8)
    g = torch.Generator().manual_seed(3)
    written = {}
    for name, tokens in (("a", 8), ("b", 8), ("c", 8)):
        s.reserve(name, tokens)
        for layer in range(2):
            k, v = (torch.randn(tokens, 2, 32, generator=g).bfloat16() for _ in range(2))
            s.write(layer, s.rows([name], [0], [tokens]), k, v)
        written[name] = [tuple(t.clone() for t in s.stored(layer, name, tokens)) for layer in range(2)]
    s.free("a")
    s.free("c")  # 16 free tokens, in two runs of 8: 12 need a compaction, which moves b
    s.reserve("d", 12)
    assert s.compactions == 1 and s.start_of("b") == 0
    for layer in range(2):
        for before, after in zip(written["b"][layer], s.stored(layer, "b", 8)):
            assert torch.equal(before, after)


@pytest.mark.parametrize("dim,model_dtype,ratio", [(32, torch.bfloat16, 64 / 34), (64, torch.bfloat16, 128 / 66),
                                                   (128, torch.float32, 512 / 130)])
def test_int8_bytes_per_token_count_the_scales(dim, model_dtype, ratio):
    """About half of bf16 (a quarter of fp32), plus 2 bytes of scale per row."""
    plain = KVStore(3, 2, dim, 4, model_dtype)
    int8 = KVStore(3, 2, dim, 4, model_dtype, kv_dtype=torch.int8)
    assert int8.bytes_per_token == 2 * 3 * 2 * (dim + 2) == bytes_per_token(3, 2, dim, torch.int8)
    assert plain.bytes_per_token / int8.bytes_per_token == pytest.approx(ratio)
    assert int8.keys.dtype == torch.int8 and int8.key_scales.shape == (3, 2, 4)


def test_a_store_refuses_a_kv_dtype_it_cannot_keep():
    with pytest.raises(ValueError, match="as torch.bfloat16 or int8"):
        KVStore(1, 1, 8, 4, torch.bfloat16, kv_dtype=torch.float16)
