"""The bundled default model (glinthawk/models/default) is a trained Hugging Face Llama.

Made by scripts/train_default_model.py. These checks load it with transformers and recompute
the validation perplexity recorded in training.json from the bundled validation token ids,
with the same windowing the script used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(__file__).resolve().parent.parent / "glinthawk" / "models" / "default"


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((MODEL_DIR / "training.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_files_and_size():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "training.json"):
        assert (MODEL_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert total < 12 * 1024 * 1024, f"bundled model is {total / 1e6:.1f} MB"


def test_config():
    config = transformers.AutoConfig.from_pretrained(MODEL_DIR)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.tie_word_embeddings
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.bos_token_id == 0 and config.eos_token_id == 1
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["architectures"] == ["LlamaForCausalLM"]


def test_weight_names():
    from safetensors import safe_open

    config = json.loads((MODEL_DIR / "config.json").read_text())
    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    assert names == expected  # tied embeddings: no lm_head.weight


def test_tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]) == [0, 1, 2, 3, 4]
    ids = tok("The built-in function")["input_ids"]
    assert ids[0] == 0 and 0 not in ids[1:]  # BOS added once by the post-processor
    assert tok.decode(ids, skip_special_tokens=True) == "The built-in function"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert "<|system|>" in text and "<|user|>" in text and "What is a list?" in text
    assert text.rstrip().endswith("<|assistant|>")
    # glinthawk's own tokenizer wrapper reads the same files
    from glinthawk.tokenizer import Tokenizer

    ours = Tokenizer(MODEL_DIR)
    assert ours.encode("The built-in function") == ids
    assert 1 in ours.eos_token_ids


def test_validation_perplexity_matches_record(model, record):
    val = record["validation"]
    ids = np.load(MODEL_DIR / record["validation_ids_file"]).astype(np.int64)
    assert len(ids) == record["val_tokens"] <= 30_000
    window = val["eval_window"]
    # Same windowing as scripts/train_default_model.py: consecutive non-overlapping windows,
    # each run alone from position 0, every token after a window's first one predicted.
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    with torch.no_grad():
        full = [w for w in windows if len(w) == window]
        rest = [w for w in windows if len(w) != window]
        for i in range(0, len(full), 16):  # full windows batched: same math, no padding
            x = torch.from_numpy(np.stack(full[i:i + 16]))
            logits = model(input_ids=x).logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
        for w in rest:
            x = torch.from_numpy(w)[None]
            logits = model(input_ids=x).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += len(w) - 1
    assert count == val["predicted_tokens"]
    loss = nll / count
    assert loss == pytest.approx(val["loss"], rel=0.01)
    assert math.exp(loss) == pytest.approx(val["perplexity"], rel=0.01)
    assert val["perplexity"] < 200, "the bundled model should be trained, not random"


def test_greedy_sample_is_recorded(model, record):
    sample = record["sample"]
    prompt = torch.tensor([sample["prompt_ids"]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=1)
    # the first greedy tokens are robust to float noise; the whole recorded continuation may not be
    assert out[0, prompt.size(1):].tolist()[:4] == sample["new_token_ids"][:4]
