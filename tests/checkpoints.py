"""Tiny random Hugging Face checkpoints, made by transformers itself, for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Glinthawk splits every transformer layer across two tiers of machines.",
    "Tier one holds the weights; tier two holds the key value cache.",
    "Offline batch inference runs millions of prompts through one model.",
    "Once upon a time there was a small language model that liked numbers: 1 2 3 4 5.",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(directory: Path, vocab_size: int = 320) -> int:
    """Byte-level BPE with <s>/</s>, BOS added by its post-processor like Llama's. Returns vocab size."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return tok.get_vocab_size()


VARIANTS = {
    "llama_gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama3_tied_mqa": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )),
    "llama_head_dim": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2_bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    # Qwen3: per-head q/k RMSNorm before RoPE, no q/k/v bias, head_dim 32: twice hidden / heads,
    # as in Qwen3-0.6B (128 vs 64).
    "qwen3": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
}


def build_checkpoint(directory: Path, variant: str = "llama_gqa", *, layers: int = 2, hidden: int = 64,
                     max_shard_size: str | None = None, seed: int = 0) -> Path:
    """Write config.json + safetensors + tokenizer files of a tiny random model to ``directory``."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(directory)
    family, extra = VARIANTS[variant]
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    model_class = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[family]
    config = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=None,
        initializer_range=0.15, rms_norm_eps=1e-5, **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # transformers initialises norm weights to 1 and biases to 0; randomise them too, so a
    # swapped or missing norm weight or a dropped q/k/v bias changes the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def load_reference(directory: Path, dtype: torch.dtype = torch.float32):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.eval()
