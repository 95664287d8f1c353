"""Shared fixtures: tiny random checkpoints built once per session, and what loads from them.

Everything here is lazy and cached for the session: a checkpoint is written the first
time a test asks for it, a model is loaded once per (variant, dtype).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The test models are tiny: one thread is as fast as several on an idle machine, and on a
# busy one (CI, a training job beside us) a multi-threaded pool spins and slows tests 3-10x.
torch.set_num_threads(1)

from checkpoints import VARIANTS, build_checkpoint, load_reference  # noqa: E402
from engine_util import SHARD_SIZE, SHARDED_VARIANT  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(variant) -> Path``: a checkpoint directory, built on first use.

    Each variant gets its own weight seed, so no two variants share weights.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(variant: str = "llama_gqa") -> Path:
        if variant not in built:
            seed = list(VARIANTS).index(variant)
            shard = SHARD_SIZE if variant == SHARDED_VARIANT else None
            built[variant] = build_checkpoint(root / variant, variant, max_shard_size=shard, seed=seed)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """``tiny_model(variant, dtype) -> (Model, Tokenizer)`` loaded by glinthawk, on CPU."""
    from glinthawk.compute.loader import load_model
    from glinthawk.tokenizer import Tokenizer

    loaded: dict[tuple[str, str], tuple] = {}

    def get(variant: str = "llama_gqa", dtype: str = "float32"):
        key = (variant, dtype)
        if key not in loaded:
            directory = tiny_checkpoint(variant)
            model = load_model(directory, dtype=dtype, device="cpu")
            loaded[key] = (model, Tokenizer(directory, extra_eos_ids=model.config.eos_token_ids))
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    """``hf_model(variant, torch_dtype)``: the transformers reference model, in eval mode."""
    loaded: dict = {}

    def get(variant: str = "llama_gqa", dtype=None):
        dtype = dtype or torch.float32
        if (variant, dtype) not in loaded:
            loaded[(variant, dtype)] = load_reference(tiny_checkpoint(variant), dtype)
        return loaded[(variant, dtype)]

    return get


@pytest.fixture(scope="session")
def model_dir(tiny_checkpoint) -> Path:
    """The checkpoint the two-tier tests run (Llama with GQA)."""
    return tiny_checkpoint("llama_gqa")


@pytest.fixture(scope="session")
def checkpoint(tiny_model):
    """(Model, Tokenizer) of ``model_dir``, loaded once."""
    return tiny_model("llama_gqa")


@pytest.fixture(params=["fused", "fused-avx512", "fused-portable", "torch", "torch-batched"])
def attention_path(request, monkeypatch):
    """Each way decode rows can be attended: the C kernel at each instruction-set level it
    may pick (this CPU permitting; 2 is AVX512_VNNI for int8), torch per sequence, torch as one
    padded batch."""
    from glinthawk.compute import attention, attention_kernels

    if request.param.startswith("fused"):
        if attention_kernels._attention is None:
            pytest.skip("the C decode-attention kernel is not built (no C compiler at install time)")
        kernel = attention_kernels._attention
        widest = {"fused": kernel.LEVEL_AVX512_BF16, "fused-avx512": kernel.LEVEL_AVX512F,
                  "fused-portable": kernel.LEVEL_PORTABLE}[request.param]
        monkeypatch.setattr(attention_kernels, "KERNEL_WIDEST", widest)
    else:
        monkeypatch.setattr(attention_kernels, "_attention", None)
        # With a low limit some decodes take the padded-batch path and some the per-sequence one.
        monkeypatch.setattr(attention, "BATCHED_DECODE_MAX_CONTEXT", 8 if request.param == "torch-batched" else 0)
    return request.param


@pytest.fixture(scope="session")
def four_layers(tmp_path_factory):
    """``four_layers(variant) -> Path``: a 4-layer checkpoint (enough layers for 3 pipeline stages)."""
    built = {}

    def get(variant: str = "llama_gqa"):
        if variant not in built:
            built[variant] = build_checkpoint(tmp_path_factory.mktemp(variant), variant, layers=4, seed=5)
        return built[variant]

    return get
