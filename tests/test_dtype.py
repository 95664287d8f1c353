"""``--dtype auto`` (the default): bfloat16 where it is fast, float32 or float16 where it is not."""

from __future__ import annotations

import json

import pytest
import torch

from glinthawk.compute import loader
from glinthawk.compute.loader import auto_dtype, load_model, resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, fast):
    monkeypatch.setattr(loader, "fast_bfloat16_cpu", lambda: fast)
    expected = torch.bfloat16 if fast else torch.float32
    assert resolve_dtype("auto", CPU) == expected
    assert resolve_dtype("auto", CPU, "float16") == expected  # a float16 checkpoint too: no float16 on CPU


@pytest.mark.parametrize("bf16_supported", [True, False])
@pytest.mark.parametrize("checkpoint_dtype", [None, "float32", "bfloat16", "float16"])
def test_auto_on_cuda_keeps_float16_checkpoints_and_falls_back_where_bf16_is_missing(
        monkeypatch, bf16_supported, checkpoint_dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    expected = "bfloat16" if bf16_supported and checkpoint_dtype != "float16" else "float16"
    assert auto_dtype(CUDA, checkpoint_dtype) == expected


def test_explicit_dtypes_and_errors():
    assert resolve_dtype("float32", CPU) == torch.float32
    with pytest.raises(ValueError, match="choose auto or one of float32, bfloat16, float16"):
        resolve_dtype("int4", CPU)
    with pytest.raises(ValueError, match="only supported on CUDA"):
        resolve_dtype("float16", CPU)


def test_load_model_auto_reads_the_checkpoint_dtype(tiny_checkpoint, tmp_path, monkeypatch):
    source = tiny_checkpoint("llama_gqa")
    copy = tmp_path / "model"
    copy.mkdir()
    for path in source.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["torch_dtype"] = "float16"
    (copy / "config.json").write_text(json.dumps(config))
    seen = []
    monkeypatch.setattr(loader, "auto_dtype", lambda device, checkpoint_dtype: seen.append(checkpoint_dtype) or "float32")
    model = load_model(copy, dtype="auto", device="cpu")
    assert seen == ["float16"] and model.dtype == torch.float32 and model.config.torch_dtype == "float16"
    monkeypatch.undo()
    model = load_model(copy, dtype="auto", device="cpu")
    assert model.dtype == (torch.bfloat16 if loader.fast_bfloat16_cpu() else torch.float32)
