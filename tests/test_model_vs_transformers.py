"""glinthawk's compute core and engine against transformers, on every supported variant.

The checkpoints are tiny random models written by transformers itself (tests/checkpoints.py):
Llama with GQA, Llama 3 rope scaling + tied embeddings + MQA, an explicit head_dim,
Mistral stored as sharded safetensors, Qwen2 with q/k/v biases, and Qwen3 with its per-head
q/k norms and a head_dim twice hidden / heads.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from checkpoints import VARIANTS
from engine_util import PROMPTS, SHARDED_VARIANT, prompt_logits, request, run_engine

from glinthawk.compute import matmul

VARIANT_NAMES = list(VARIANTS)

# float32: our logits and transformers' agree to this fraction of the largest |logit|.
FP32_REL_TOL = 1e-4
# bfloat16: both sides round every intermediate to 8 mantissa bits, in different orders
# (fused QKV, our attention kernel, ...). On these models transformers' own bf16 logits are
# 2-3 % of max|logit| away from its float32 ones and ours are at most ~2 % away from its bf16
# ones, so: worst element within 3 %, mean within 0.5 %, and our distance to the float32
# reference (worst over the prompts) no more than 1.5x transformers' own bf16 distance to it. Greedy tokens must agree
# wherever the reference's top-2 margin is wider than the noise both sides may add (2x the
# tolerance); inside that margin the two candidates are a tie at bf16 precision.
BF16_MAX_REL_TOL = 3e-2
BF16_MEAN_REL_TOL = 5e-3


@torch.inference_mode()
def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([token_ids], device=hf.device)).logits[0].float()


@torch.inference_mode()
def hf_greedy(hf, token_ids: list[int], max_new_tokens: int, eos_ids: list[int] | None) -> list[int]:
    """transformers' greedy generate for one unpadded prompt; eos_ids None disables stopping."""
    config = copy.deepcopy(hf.generation_config)
    # eos_token_id=None would fall back to the checkpoint's EOS; an id outside the
    # vocabulary is one greedy decoding can never produce.
    never = [hf.config.vocab_size + 1000]
    config.do_sample, config.max_new_tokens, config.eos_token_id = False, max_new_tokens, eos_ids or never
    config.pad_token_id = (eos_ids or [0])[0]
    ids = torch.tensor([token_ids], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(token_ids):].tolist()


def test_variants_exercise_what_they_claim(tiny_checkpoint, tiny_model):
    sharded = tiny_checkpoint(SHARDED_VARIANT)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()

    cfg = tiny_model("llama3_tied_mqa")[0].config
    assert (cfg.rope.type, cfg.num_kv_heads, cfg.tie_word_embeddings) == ("llama3", 1, True)
    model = tiny_model("llama3_tied_mqa")[0]
    head = matmul.unpack(model.lm_head)  # packed on the CPU
    assert torch.equal(head, model.embed_tokens)
    assert tiny_model("llama_head_dim")[0].config.head_dim == 32 != 64 // 4
    assert tiny_model("qwen2_bias")[0].layers[0].qkv_bias is not None
    qwen3 = tiny_model("qwen3")[0]
    assert qwen3.layers[0].q_norm is not None and qwen3.layers[0].qkv_bias is None
    assert qwen3.config.head_dim == 2 * qwen3.config.hidden_size // qwen3.config.num_heads
    assert tiny_model("llama_gqa")[0].config.queries_per_kv == 2


def test_tokenizer_matches_transformers(tiny_checkpoint, tiny_model):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama_gqa"))
    tok = tiny_model("llama_gqa")[1]
    for prompt in PROMPTS + ["numbers: 1 2 3 ünïcödé ✓"]:
        assert tok.encode(prompt) == hf_tok(prompt).input_ids
    ids = tok.encode(PROMPTS[2])
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(messages) == rendered
    assert tok.encode_chat(messages) == hf_tok(rendered, add_special_tokens=False).input_ids


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_prompt_logits_float32(variant, tiny_model, hf_model):
    model, tok = tiny_model(variant)
    check_float32_logits(model, tok, hf_model(variant))


def check_float32_logits(model, tok, hf) -> None:
    """Our prompt logits, whole and in chunks through the KV store, within FP32_REL_TOL of transformers'."""
    for prompt in (PROMPTS[1], PROMPTS[3]):
        ids = tok.encode(prompt)
        ref = hf_logits(hf, ids)
        scale = ref.abs().max()
        whole = prompt_logits(model, ids)
        assert whole.device == ref.device and whole.shape == ref.shape
        assert (whole - ref).abs().max() <= FP32_REL_TOL * scale
        # Chunked prefill through the KV store, ending in single-token decode steps.
        chunked = prompt_logits(model, ids, chunk=5)
        assert (chunked - ref).abs().max() <= FP32_REL_TOL * scale
        stepwise = prompt_logits(model, ids[:12], chunk=1)
        assert (stepwise - ref[:12]).abs().max() <= FP32_REL_TOL * scale


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_engine_greedy_matches_generate(variant, tiny_checkpoint, tiny_model, hf_model):
    from glinthawk.tokenizer import Tokenizer

    model, tok = tiny_model(variant)
    hf = hf_model(variant)
    max_tokens = 12
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS)
    streams = [hf_greedy(hf, ids, max_tokens, None) for ids in prompt_ids]

    # Small token budget: every prompt but the first is prefilled in chunks, decodes and
    # prefill chunks share steps; max_seqs=2 makes the later requests join mid-run.
    engine_kwargs = dict(max_batch_tokens=7, max_seqs=2)
    requests = [request(str(i), p, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    lines, engine = run_engine(model, tok, requests, **engine_kwargs)
    for i, expected in enumerate(streams):
        line = lines[str(i)]
        assert line["token_ids"] == expected, f"prompt {i}"
        assert line["finish_reason"] == "length"
        assert line["prompt_tokens"] == len(prompt_ids[i])
    assert engine.stats.generated_tokens == len(PROMPTS) * max_tokens

    # With EOS stopping: make a token that greedy decoding emits mid-stream an EOS, for
    # transformers and for us, and compare up to and including it.
    eos = streams[0][4]
    eos_tok = Tokenizer(tiny_checkpoint(variant), extra_eos_ids=(eos,))
    stopped = [hf_greedy(hf, ids, max_tokens, sorted(eos_tok.eos_token_ids)) for ids in prompt_ids]
    assert stopped[0][-1] == eos and len(stopped[0]) <= 5
    requests = [request(str(i), p, max_tokens=max_tokens, temperature=0) for i, p in enumerate(PROMPTS)]
    lines, _ = run_engine(model, eos_tok, requests, **engine_kwargs)
    for i, expected in enumerate(stopped):
        line = lines[str(i)]
        assert line["token_ids"] == expected, f"prompt {i}"
        assert line["finish_reason"] == ("stop" if expected[-1] in eos_tok.eos_token_ids else "length")


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_prompt_logits_bfloat16(variant, tiny_model, hf_model):
    model, tok = tiny_model(variant, "bfloat16")
    assert model.dtype == torch.bfloat16
    check_reduced_precision_logits(model, tok, hf_model(variant, torch.bfloat16), hf_model(variant))


def check_reduced_precision_logits(model, tok, hf16, hf32, against_float32: bool = True) -> None:
    """Our bf16 (or fp16) prompt logits against transformers' in the same dtype, within the BF16 tolerances.

    ``against_float32``: also require our distance to the float32 reference to stay within
    1.5x transformers' own (the bf16 rule; see the tolerances at the top).
    """
    clear_margins, ours_error32, hf_error32 = 0, 0.0, 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ref16, ref32 = hf_logits(hf16, ids), hf_logits(hf32, ids)
        ours = prompt_logits(model, ids)
        scale = ref16.abs().max()
        diff = (ours - ref16).abs()
        assert diff.max() <= BF16_MAX_REL_TOL * scale
        assert diff.mean() <= BF16_MEAN_REL_TOL * scale
        ours_error32 = max(ours_error32, float((ours - ref32).abs().max() / scale))
        hf_error32 = max(hf_error32, float((ref16 - ref32).abs().max() / scale))
        assert (ours.argmax(-1) == ref16.argmax(-1)).float().mean() >= 0.9
        # The greedy first token (from the last prompt position).
        noise = 2 * BF16_MAX_REL_TOL * scale
        first, reference = ours[-1].argmax(), ref16[-1]
        top2 = reference.topk(2).values
        if top2[0] - top2[1] > noise:
            clear_margins += 1
            assert first == reference.argmax()
        else:
            assert reference[first] >= top2[0] - noise
    assert clear_margins >= 1
    if against_float32:
        assert ours_error32 <= 1.5 * hf_error32


ROPE_SETTINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    # original_max_position_embeddings 64 puts one frequency in the smoothed middle band
    # (wavelength 32.4 between 64/4 and 64/1), which the llama3 test checkpoint has none of.
    "llama3_smoothed": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64},
    "llama3_wide": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                    "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("setting", list(ROPE_SETTINGS))
def test_rope_matches_transformers(setting, head_dim):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from glinthawk.compute.config import ModelConfig
    from glinthawk.compute.rope import inverse_frequencies, rotary

    hf_config = transformers.LlamaConfig(
        vocab_size=10, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512, rope_theta=500000.0,
        rope_scaling=copy.deepcopy(ROPE_SETTINGS[setting]), architectures=["LlamaForCausalLM"],
    )
    hf_rope = LlamaRotaryEmbedding(hf_config)
    assert hf_rope.attention_scaling == 1.0
    config = ModelConfig.from_dict(json.loads(hf_config.to_json_string()))
    inv_freq = inverse_frequencies(config.rope, config.head_dim)
    torch.testing.assert_close(inv_freq, hf_rope.inv_freq.float(), rtol=1e-6, atol=0)
    positions = torch.tensor([0, 1, 5, 31, 32, 100, 300, 511])
    cos, sin = hf_rope(torch.zeros(1, len(positions), head_dim), positions[None])
    ours = rotary(inv_freq, positions, torch.float32)
    torch.testing.assert_close(ours.cos, cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin, sin[0], rtol=0, atol=1e-6)


def test_old_style_rope_scaling_keys():
    """Checkpoints written before transformers 5 carry rope_theta and rope_scaling {"type": ...}."""
    from glinthawk.compute.config import ModelConfig

    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64,
           "rope_theta": 1234.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    rope = ModelConfig.from_dict(raw).rope
    assert (rope.theta, rope.type, rope.factor) == (1234.0, "linear", 2.0)
