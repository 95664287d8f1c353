"""Qwen3 (dense): per-head q/k RMSNorm before RoPE, no q/k/v bias, its own head_dim.

Its logits and the single-process engine's greedy tokens are checked against transformers
with every other variant (test_model_vs_transformers.py, the "qwen3" checkpoint); here:
what the loader makes of it, and the two-tier run against transformers' own generate.
"""

from __future__ import annotations

import pytest
import torch
from cluster_util import PROMPTS, distributed, read_results, single_process, write_requests
from test_model_vs_transformers import hf_greedy

from glinthawk.compute.config import ModelConfig, ModelConfigError

VARIANT = "qwen3"


def test_qwen3_loads_its_qk_norms_and_no_bias(tiny_model):
    model, _ = tiny_model(VARIANT)
    cfg = model.config
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.qk_norm and not cfg.attention_bias
    assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_heads
    for layer in model.layers:
        assert layer.qkv_bias is None
        assert layer.q_norm.shape == layer.k_norm.shape == (cfg.head_dim,)
        assert not torch.equal(layer.q_norm, layer.k_norm)  # randomised apart: a swap would show
    other, _ = tiny_model("llama_head_dim")
    assert not other.config.qk_norm and other.layers[0].q_norm is None


def _qwen3_raw(**extra) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 64, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
            "max_position_embeddings": 40960, **extra}


def test_qwen3_config_fields():
    cfg = ModelConfig.from_dict(_qwen3_raw(sliding_window=None, use_sliding_window=False))
    assert (cfg.head_dim, cfg.qk_norm, cfg.attention_bias, cfg.max_position_embeddings) == (128, True, False, 40960)
    # As in transformers, a sliding window counts only when use_sliding_window says so.
    assert ModelConfig.from_dict(_qwen3_raw(sliding_window=4096)).max_position_embeddings == 40960
    capped = ModelConfig.from_dict(_qwen3_raw(sliding_window=4096, use_sliding_window=True))
    assert capped.max_position_embeddings == 4096
    assert ModelConfig.from_dict(_qwen3_raw(attention_bias=True)).attention_bias


def test_unsupported_architecture_lists_qwen3():
    with pytest.raises(ModelConfigError, match="not supported; glinthawk runs .*Qwen3ForCausalLM"):
        ModelConfig.from_dict(_qwen3_raw(architectures=["Qwen3MoeForCausalLM"]))


async def test_qwen3_two_tier_greedy_equals_transformers(tiny_model, hf_model, tmp_path):
    """Tier 1 runs the q/k norms in its pre-attention: the cluster's tokens are transformers'."""
    model, tok = tiny_model(VARIANT)
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    summary, out = await distributed((model, tok), requests, tmp_path / "out.jsonl", nodes=2, micro_batches=2)
    got = read_results(out)
    assert summary.failed == 0 and summary.done == len(PROMPTS)
    hf = hf_model(VARIANT)
    for custom_id, prompt, max_tokens in PROMPTS:
        expected = hf_greedy(hf, tok.encode(prompt), max_tokens, None)
        assert got[custom_id]["token_ids"] == expected, custom_id


async def test_qwen3_two_tier_seeded_sampling_equals_single_process(tiny_model, tmp_path):
    checkpoint = tiny_model(VARIANT)
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7})
    expected = single_process(checkpoint, requests, max_batch_tokens=16)
    _, out = await distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=2, micro_batches=3)
    got = read_results(out)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in expected.items()}
