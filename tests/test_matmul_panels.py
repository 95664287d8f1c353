"""float32 linear layers on our own kernel (``_matmul``, AVX-512F CPUs): the same products as
F.linear, a row's result independent of its batch, and the weights it does not take left to oneDNN."""

import pytest
import torch
import torch.nn.functional as F

from glinthawk.compute import cbind, matmul

needs_panels = pytest.mark.skipif(not matmul.PANELS, reason="no _matmul here (not built, no AVX-512F, or no libgomp)")


def _weights(rows: int, depth: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, depth, generator=generator), torch.randn(rows, generator=generator)


@needs_panels
@pytest.mark.parametrize(("rows", "depth"), [(32, 5), (96, 64), (960, 576), (64, 1536)])
def test_panel_linear_is_f_linear(rows, depth):
    weight, bias = _weights(rows, depth)
    packed = matmul.pack(weight)
    assert type(packed) is matmul.PanelWeight and packed.shape == weight.shape and packed.numel() == weight.numel()
    assert not matmul.pads_rows(packed)  # no per-shape state to keep flat
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 2, 3, 5, 11, 12, 13, 25, 64, 100, 300):  # every row-block size and their tails
        x = torch.randn(batch, depth, generator=generator)
        for b in (None, bias):
            torch.testing.assert_close(matmul.linear(x, packed, b), F.linear(x, weight, b), atol=1e-4, rtol=1e-4)
    assert matmul.linear(torch.empty(0, depth), packed).shape == (0, rows)


@needs_panels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_rows_product_does_not_depend_on_its_batch(threads):
    """Each output sums over k in order whatever the row blocks and the thread split, so a
    sequence decodes to the same bits alone or among 64 (unlike oneDNN's blocked kernels)."""
    weight, _ = _weights(960, 576)
    packed = matmul.pack(weight)
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = matmul.linear(x, packed)
        for row in (0, 7, 12, 63):
            assert torch.equal(matmul.linear(x[row:row + 1], packed)[0], whole[row])
        assert torch.equal(matmul.linear(x[5:40], packed), whole[5:40])
    finally:
        torch.set_num_threads(before)


@needs_panels
def test_a_strided_input_is_read_as_its_values():
    weight, _ = _weights(64, 48)
    packed = matmul.pack(weight)
    x = torch.randn(48, 10, generator=torch.Generator().manual_seed(3)).t()  # [10, 48], not contiguous
    torch.testing.assert_close(matmul.linear(x, packed), F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_weights_the_kernel_does_not_take_stay_with_onednn():
    """Rows not a multiple of the panel, and bfloat16, go where they went before: oneDNN where it packs them."""
    for weight in (torch.randn(40, 32), torch.randn(64, 32).to(torch.bfloat16)):
        packed = matmul.pack(weight)
        assert type(packed) is not matmul.PanelWeight
        assert packed.is_mkldnn == matmul.packs(weight)
        torch.testing.assert_close(matmul.linear(torch.ones(3, 32, dtype=weight.dtype), packed),
                                   F.linear(torch.ones(3, 32, dtype=weight.dtype), weight), atol=1e-2, rtol=1e-2)


@needs_panels
def test_the_bindings_refuse_what_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="pack_panels: argument 'weight' must have a multiple of 32 rows, got 33"):
        cbind.pack_panels(torch.randn(33, 8))
    with pytest.raises(TypeError, match="pack_panels: argument 'weight' must be torch.float32"):
        cbind.pack_panels(torch.randn(32, 8).to(torch.bfloat16))
    packed = cbind.pack_panels(torch.randn(32, 8))
    with pytest.raises(ValueError, match=r"panel_linear: argument 'panels' must have shape \[32, 9\]"):
        cbind.panel_linear(torch.randn(4, 9), packed, 2)
    with pytest.raises(TypeError, match="panel_linear: argument 'x' must be torch.float32"):
        cbind.panel_linear(torch.randn(4, 8).to(torch.bfloat16), packed, 2)


@needs_panels
def test_float32_models_load_onto_the_kernel(tiny_model):
    model, _ = tiny_model("llama_gqa", "float32")
    layer = model.layers[0]
    assert all(type(w) is matmul.PanelWeight for w in (layer.qkv, layer.gate_up, layer.o_proj, layer.down))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_gives_back_the_plain_weight(dtype):
    for rows in (40, 64):
        weight = torch.randn(rows, 24).to(dtype)
        assert torch.equal(matmul.unpack(matmul.pack(weight)), weight)


@needs_panels
def test_the_kernels_suite_times_both_backends_on_the_same_weights(tiny_model):
    from glinthawk.bench import matmul_cold

    model, _ = tiny_model("llama_gqa", "bfloat16")  # the suite's model in any dtype: its weights go to float32
    row = matmul_cold.cold_matmul_point(model, 8, 1 << 20, repeats=1)
    layer = model.layers[0]
    weights = sum(w.numel() for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    assert row["kernel"] == matmul_cold.KERNEL and row["rows"] == 8
    assert row["copies"] == max(2, (1 << 20) // (4 * weights))
    assert row["seconds"] > 0 and row["onednn_seconds"] > 0
    assert row["speed_ratio_to_onednn"] == pytest.approx(row["onednn_seconds"] / row["seconds"])
    assert row["flops_per_s"] == pytest.approx(2 * 8 * row["copies"] * weights / row["seconds"])
