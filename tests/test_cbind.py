"""The C kernels' bindings refuse a tensor the kernel would misread, with the kernel and the
argument in the message, where the kernels (which take raw addresses) read past it or
returned garbage. Each case goes through the public wrapper where the wrapper passes the
tensor on as it is; ``cbind`` directly where the wrapper converts it first."""

from __future__ import annotations

import pytest
import torch

from glinthawk.compute import attention_kernels, cbind, elementwise, sampling
from glinthawk.compute.kvcache import KVStore
from glinthawk.compute.sampling import SamplingParams
from glinthawk.grammar import Matcher

pytestmark = pytest.mark.skipif(cbind._elementwise is None or cbind._attention is None or cbind._sampling is None,
                                reason="the C kernels are not built (no C compiler at install time)")


def refused(error: type[Exception], kernel: str, argument: str):
    """The kernel's name and the argument's, as the message starts."""
    return pytest.raises(error, match=rf"^{kernel}: argument '{argument}' must ")


# -- the two checks every entry uses ----------------------------------------------------------

def test_address_names_what_is_wrong():
    x = torch.zeros(4, 8)
    assert cbind.address("k", "x", x, cbind.FLOATS, (4, 8)) == x.data_ptr()
    with refused(TypeError, "k", "x") as wrong_dtype:
        cbind.address("k", "x", x.double(), cbind.FLOATS, (4, 8))
    assert "torch.float32 or torch.bfloat16, got torch.float64" in str(wrong_dtype.value)
    with refused(ValueError, "k", "x") as wrong_shape:
        cbind.address("k", "x", x, cbind.FLOATS, (4, 9))
    assert "shape [4, 9], got [4, 8]" in str(wrong_shape.value)
    with refused(ValueError, "k", "x") as strided:
        cbind.address("k", "x", x.t(), cbind.FLOATS)
    assert "contiguous" in str(strided.value)
    with refused(ValueError, "k", "x") as elsewhere:  # a device's address is not one a CPU loop can read
        cbind.address("k", "x", torch.empty(4, 8, device="meta"), cbind.FLOATS)
    assert "on the CPU, got meta" in str(elsewhere.value)
    with refused(TypeError, "k", "x"):
        cbind.address("k", "x", None, cbind.FLOATS)


def test_rows_address_takes_rows_any_distance_apart_but_each_contiguous():
    buffer = torch.zeros(3, 10, 4)
    view = buffer[:, 2:7]  # [3, 5, 4], heads 40 elements apart
    assert cbind.rows_address("k", "v", view, cbind.FLOATS, (3, 5, 4)) == (view.data_ptr(), 40)
    assert cbind.rows_address("k", "v", view, cbind.FLOATS, (3, 5, 4), stride=40)[1] == 40
    with refused(ValueError, "k", "v"):  # another view's stride, which the kernel would use for this one
        cbind.rows_address("k", "v", view.contiguous(), cbind.FLOATS, (3, 5, 4), stride=40)
    with refused(ValueError, "k", "v"):  # tokens not contiguous within a head
        cbind.rows_address("k", "v", buffer[:, ::2], cbind.FLOATS, (3, 5, 4))
    single = torch.zeros(12).as_strided((1, 3, 4), (999, 4, 1))
    assert cbind.rows_address("k", "v", single, cbind.FLOATS, (1, 3, 4), stride=12)[1] == 999  # one row: any stride


# -- _elementwise -----------------------------------------------------------------------------

def test_rms_norm_refuses_a_weight_it_would_misread():
    x = torch.randn(4, 64)
    weight = torch.arange(128.0)
    with refused(ValueError, "rms_norm", "weight"):  # the kernel read the first 64 floats, not every other one
        elementwise.rms_norm(x, weight[::2], 1e-5)
    with refused(TypeError, "rms_norm", "weight"):
        elementwise.rms_norm(x, weight[:64].double(), 1e-5)
    with refused(ValueError, "rms_norm", "weight"):  # the kernel read 64 floats of a 32-float tensor
        elementwise.rms_norm(x, weight[:32], 1e-5)
    with refused(ValueError, "rms_norm", "x"):
        cbind.rms_norm(torch.zeros(4, 0), weight[:0], 1e-5)


def test_rotary_refuses_tables_of_another_shape_dtype_or_layout():
    x = torch.randn(3, 2, 8)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    with refused(ValueError, "rotary", "cos"):
        elementwise.rotary(x, cos[:, :4], sin)
    with refused(TypeError, "rotary", "sin"):
        elementwise.rotary(x, cos, sin.bfloat16())
    with refused(ValueError, "rotary", "cos"):
        elementwise.rotary(x, torch.randn(8, 3).t(), sin)


def test_argmax_refuses_logits_it_would_misread():
    with refused(ValueError, "argmax", "logits"):
        cbind.argmax(torch.randn(4, 16)[:, ::2])
    with refused(TypeError, "argmax", "logits"):
        cbind.argmax(torch.randn(4, 16).half())
    with refused(ValueError, "argmax", "logits"):
        cbind.argmax(torch.randn(16))


def test_mask_logits_refuses_masks_that_do_not_match_the_rows():
    logits = torch.zeros(4, 64)
    with refused(ValueError, "mask_logits", "masks"):  # two rows, one row of masks: the kernel read past it
        elementwise.mask_logits(logits, torch.tensor([0, 1]), torch.zeros(1, 2, dtype=torch.int32))
    with refused(ValueError, "mask_logits", "masks"):
        cbind.mask_logits(logits, torch.tensor([0]), torch.zeros(1, 4, dtype=torch.int32)[:, ::2])
    with refused(TypeError, "mask_logits", "rows"):
        cbind.mask_logits(logits, torch.tensor([0], dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32))
    assert torch.equal(logits, torch.zeros(4, 64))  # nothing written


def test_compute_mask_refuses_a_row_of_another_size_or_layout():
    class Recorder:
        def unsafe_compute_mask_ptr(self, address, size):
            self.calls = (address, size)

    matcher = Matcher(Recorder(), 2)
    row = torch.zeros(2, dtype=torch.int32)
    matcher.fill(row)
    assert matcher._m.calls == (row.data_ptr(), 8)
    with refused(ValueError, "compute_mask", "row"):
        matcher.fill(torch.zeros(3, dtype=torch.int32))
    with refused(ValueError, "compute_mask", "row"):
        matcher.fill(torch.zeros(4, dtype=torch.int32)[::2])
    with refused(TypeError, "compute_mask", "row"):
        matcher.fill(torch.zeros(2, dtype=torch.int64))


# -- _sampling --------------------------------------------------------------------------------

def test_sampler_refuses_logits_draws_and_tokens_it_would_misread():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0)] * 3
    draws = torch.full((3,), 0.5, dtype=torch.float64)
    tokens = torch.zeros(3, dtype=torch.int64)
    with refused(ValueError, "sample", "logits"):
        sampling._sample_in_c(torch.randn(3, 100)[:, ::2], [0, 1, 2], params, draws, tokens)
    with refused(TypeError, "sample", "draws"):  # float32 draws read as float64: past the end
        sampling._sample_in_c(logits, [0, 1, 2], params, draws.float(), tokens)
    with refused(TypeError, "sample", "out"):  # int64 tokens written into int32: past the end
        sampling._sample_in_c(logits, [0, 1, 2], params, draws, tokens.int())
    with refused(ValueError, "sample", "out"):
        sampling._sample_in_c(logits, [0, 1, 2], params, draws, tokens[:2])
    with refused(ValueError, "sample", "draws"):
        sampling._sample_in_c(logits, [0, 1, 2], params, draws[:2], tokens)
    assert torch.equal(tokens, torch.zeros(3, dtype=torch.int64))


# -- _attention -------------------------------------------------------------------------------

def decode_setup(dtype=torch.float32, kv_dtype=None, batch=2, kv_heads=2, dim=16):
    store = KVStore(1, kv_heads, dim, 32, dtype, kv_dtype=kv_dtype)
    for i in range(batch):
        store.reserve(i, 8)
    plan = attention_kernels.fused_decodes(store, None, [0, 8][:batch], [3] * batch, range(batch))
    new = torch.randn(batch, kv_heads, dim).to(dtype)
    return store, plan, new


def test_decode_refuses_q_and_new_rows_of_another_shape():
    store, plan, new = decode_setup()
    q = torch.randn(2, 4, 16)
    attention_kernels.decode_fused(store, 0, plan, q, 0.25, (new, new))  # as it is used
    with pytest.raises(ValueError, match="^decode_attention: q .* needs keys"):  # head_dim 8 read as 16
        attention_kernels.decode_fused(store, 0, plan, q[..., :8], 0.25)
    with pytest.raises(ValueError, match="^decode_attention: q .* DecodeRows of 3 sequences"):  # 2 planned
        attention_kernels.decode_fused(store, 0, plan, torch.randn(3, 4, 16), 0.25)
    with refused(ValueError, "decode_attention", "new_keys"):  # 3 KV heads' rows for 2
        attention_kernels.decode_fused(store, 0, plan, q, 0.25, (torch.randn(2, 3, 16), new))


def test_decode_over_int8_refuses_new_rows_not_in_q_dtype():
    """An int8 cache quantizes the new rows from q's dtype: bf16 rows read as float32 went past them."""
    store, plan, new = decode_setup(torch.bfloat16, torch.int8)
    with refused(TypeError, "decode_attention", "new_keys"):
        attention_kernels.decode_fused(store, 0, plan, torch.randn(2, 4, 16), 0.25, (new, new))


def test_decode_refuses_a_cache_without_its_scales_or_of_another_layout():
    store, plan, _ = decode_setup(torch.bfloat16, torch.int8)
    q = torch.randn(2, 4, 16).bfloat16()
    keys, values = store.keys[0], store.values[0]
    scales = (store.key_scales[0], store.value_scales[0])
    with pytest.raises(TypeError, match="^decode_attention: argument 'scales'"):
        cbind.decode_attention(q, None, keys, values, None, plan.sequences, 0.25, 0)
    with refused(ValueError, "decode_attention", "key_scales"):
        cbind.decode_attention(q, None, keys, values, (scales[0][:, :16], scales[1]), plan.sequences, 0.25, 0)
    with refused(ValueError, "decode_attention", "values"):
        cbind.decode_attention(q, None, keys, values[:, :16], scales, plan.sequences, 0.25, 0)
    with refused(ValueError, "decode_attention", "keys"):
        cbind.decode_attention(q, None, keys[:, :16], values[:, :16], scales, plan.sequences, 0.25, 0)


def test_decode_rows_are_checked_when_made():
    bases, lengths = torch.tensor([0, 8]), torch.tensor([4, 4])
    slices = torch.tensor([[0, 4]])
    assert cbind.DecodeRows(bases, lengths, slices).batch == 2
    with refused(TypeError, "decode_attention", "lengths"):
        cbind.DecodeRows(bases, lengths.int(), slices)
    with refused(ValueError, "decode_attention", "lengths"):
        cbind.DecodeRows(bases, lengths[:1], slices)
    with refused(ValueError, "decode_attention", "slices"):
        cbind.DecodeRows(bases, lengths, torch.tensor([[0, 2, 4]]))


def prefill_inputs(dtype=torch.bfloat16, kv_heads=2, n=20, capacity=40, dim=32):
    g = torch.Generator().manual_seed(0)
    slab_keys = torch.randn(kv_heads, capacity, dim, generator=g).to(dtype)
    slab_values = torch.randn(kv_heads, capacity, dim, generator=g).to(dtype)
    q = torch.randn(n, 2 * kv_heads, dim, generator=g).to(dtype)
    return q, slab_keys[:, :n], slab_values[:, :n]  # views of a slab, as KVStore.stored gives them


needs_prefill = pytest.mark.skipif(cbind._attention is None or not cbind._attention.prefill_supported(),
                                   reason="this CPU has no AVX512_BF16 (the prefill kernel)")


@needs_prefill
def test_prefill_refuses_keys_and_values_it_would_misread():
    q, keys, values = prefill_inputs()
    attention_kernels.prefill_fused(q, keys, values, 0, 0.2)  # as it is used
    with refused(ValueError, "pack_kv", "values"):  # its heads are 20 rows apart, the keys' 40
        attention_kernels.prefill_fused(q, keys, values.contiguous(), 0, 0.2)
    with refused(TypeError, "pack_kv", "keys"):  # float32 read as bfloat16
        attention_kernels.prefill_fused(q, keys.float(), values.float(), 0, 0.2)
    with refused(ValueError, "prefill_attention", "packed_keys"):  # 80 keys packed for 20 positions
        attention_kernels.prefill_fused(q, *prefill_inputs(n=80, capacity=100)[1:], 0, 0.2)
    with refused(TypeError, "prefill_attention", "q"):
        attention_kernels.prefill_fused(q.float(), keys, values, 0, 0.2)


@needs_prefill
def test_prefill_over_int8_needs_its_scales_alike():
    q, keys, values = prefill_inputs()
    int8_keys, int8_values = keys.to(torch.int8), values.to(torch.int8)
    scales = torch.ones(2, 40, dtype=torch.bfloat16)[:, :20]
    attention_kernels.prefill_fused(q, int8_keys, int8_values, 0, 0.2, scales, scales)
    with pytest.raises(TypeError, match="^pack_kv: argument 'scales'"):
        attention_kernels.prefill_fused(q, int8_keys, int8_values, 0, 0.2)
    with refused(TypeError, "pack_kv", "key_scales"):
        attention_kernels.prefill_fused(q, int8_keys, int8_values, 0, 0.2, scales.float(), scales)
    with refused(ValueError, "pack_kv", "value_scales"):
        attention_kernels.prefill_fused(q, int8_keys, int8_values, 0, 0.2, scales, scales.contiguous())


def test_only_the_bindings_hand_addresses_to_native_code():
    """No module but cbind takes a tensor's address, or calls a kernel entry itself."""
    from pathlib import Path

    import glinthawk

    root = Path(glinthawk.__file__).parent
    entries = ("rms_norm(", "rotary(", "argmax(", "mask_logits(", "sample(", "decode_attention(", "pack_kv(",
               "prefill_attention(")
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cbind.py":
            continue
        text = path.read_text()
        if "data_ptr(" in text:
            offenders.append(f"{path.relative_to(root)}: data_ptr")
        for module in ("_elementwise.", "_sampling.", "_attention."):
            offenders += [f"{path.relative_to(root)}: {module}{entry}" for entry in entries if module + entry in text]
    assert offenders == []
