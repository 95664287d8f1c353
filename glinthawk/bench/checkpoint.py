"""The benchmark checkpoint: a random Llama of a fixed shape and seed, built with transformers
on first use and cached (``GLINTHAWK_BENCH_CACHE``, else ~/.cache/glinthawk-bench). Torch-free
at import: ``glinthawk bench --help`` lists the shapes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import click


@dataclass(frozen=True)
class ModelSpec:
    """A random Llama built with transformers (fixed seed) and cached on disk."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 16384
    seed: int = 0
    tied: bool = False  # the LM head is the embedding table

    def marker(self) -> dict:
        """What the cached checkpoint's bench-spec.json holds; ``tied`` only where set, so checkpoints
        cached before the field existed still match."""
        fields = asdict(self)
        if not self.tied:
            del fields["tied"]
        return fields

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        per_layer = (self.hidden * (self.heads + 2 * self.kv_heads) * head_dim + self.heads * head_dim * self.hidden
                     + 3 * self.hidden * self.intermediate + 2 * self.hidden)
        return self.layers * per_layer + (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden


BENCH_MODEL = ModelSpec("llama-125m", hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000)
# SmolLM2-135M's shape (random weights): a wide vocabulary against a narrow, deep body.
SMOLLM2_MODEL = ModelSpec("smollm2-135m", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                          max_positions=8192, tied=True)
SHAPES = {spec.name: spec for spec in (BENCH_MODEL, SMOLLM2_MODEL)}  # glinthawk bench --shape
QUICK_MODEL = ModelSpec("llama-tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                        max_positions=4096)
BOS_ID, EOS_ID, FIRST_PLAIN_ID = 1, 2, 3


def cache_root() -> Path:
    return Path(os.environ.get("GLINTHAWK_BENCH_CACHE") or Path.home() / ".cache" / "glinthawk-bench")


def bench_checkpoint(spec: ModelSpec, root: Path | None = None) -> Path:
    """The checkpoint directory for ``spec``: built on first use, then reused.

    Built in a temporary directory next to the final one and renamed into place, so a
    concurrent or interrupted build never leaves a half-written checkpoint behind.
    """
    root = Path(root or cache_root())
    directory = root / spec.name
    marker = directory / "bench-spec.json"
    wanted = spec.marker()
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted:
                return directory
        except (OSError, json.JSONDecodeError):
            pass
    try:
        import torch
        import transformers
    except ImportError:
        raise click.ClickException(
            "the benchmark checkpoint is generated with transformers: pip install 'glinthawk[bench]' "
            "(or pass --model DIR)"
        ) from None
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        config = transformers.LlamaConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_positions, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            pad_token_id=None, rms_norm_eps=1e-5, tie_word_embeddings=spec.tied,
        )
        torch.manual_seed(spec.seed)
        transformers.LlamaForCausalLM(config).eval().save_pretrained(staging)
        write_tokenizer(staging, spec.vocab)
        (staging / "bench-spec.json").write_text(json.dumps(wanted, indent=1))
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        try:
            staging.rename(directory)
        except OSError:  # another process won the race; its copy is as good as ours
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer covering every id: ``<unk> <s> </s> t3 t4 ...``.

    Prompts are given as token ids, so it only has to decode what the model generates.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    table = {"<unk>": 0, "<s>": BOS_ID, "</s>": EOS_ID}
    table.update({f"t{i}": i for i in range(FIRST_PLAIN_ID, vocab)})
    tokenizer = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
    }))
