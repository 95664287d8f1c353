"""How close decoding over an int8 KV cache stays to the unquantized one, on the test checkpoints.

    python scripts/kv_int8_quality.py [--new-tokens 32] [--work DIR]

For each tiny checkpoint the tests build (tests/checkpoints.py: Llama GQA, Llama 3 tied
MQA, explicit head_dim, Mistral, Qwen2 with biases) and the bundled trained model, in
float32 and bfloat16: greedy tokens after each prompt over an int8 cache against the
model's dtype (``glinthawk.bench.kvquality.compare``: teacher-forced, so "agree" is the
number of steps before the first differing argmax) and the mean and largest |delta logit|
over every step and vocabulary entry, with the mean |logit| for scale. Prints a Markdown
table (the one in docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ["Once", "The quick brown fox", "Tier one holds the weights; tier two holds the key value cache.",
           "The built-in function", "A class definition", "When an exception is raised", "The import statement",
           "String literals can be enclosed in"]


def checkpoints(work: Path) -> dict[str, Path]:
    from checkpoints import VARIANTS, build_checkpoint

    from glinthawk import DEFAULT_MODEL

    found = {}
    for seed, variant in enumerate(VARIANTS):  # the seeds the test fixtures use
        directory = work / variant
        if not (directory / "config.json").exists():
            build_checkpoint(directory, variant, seed=seed)
        found[variant] = directory
    found["bundled (trained)"] = Path(DEFAULT_MODEL)
    return found


def main() -> None:
    from glinthawk.bench.kvquality import compare
    from glinthawk.compute.loader import load_model
    from glinthawk.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="where to build the test checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="glinthawk-kv-int8-"))
    print(f"| checkpoint | dtype | head_dim | prompts fully agreeing ({args.new_tokens} greedy tokens) | "
          "first disagreement: step (top-logit margin there) | mean abs d-logit | max abs d-logit | "
          "mean abs logit |")
    print("|---|---|---|---|---|---|---|---|")
    for name, directory in checkpoints(work).items():
        for dtype in ("float32", "bfloat16"):
            model = load_model(directory, dtype=dtype, device="cpu")
            tokenizer = Tokenizer(directory, extra_eos_ids=model.config.eos_token_ids)
            runs = [compare(model, tokenizer.encode(p), args.new_tokens) for p in PROMPTS]
            agree = [r["agree"] for r in runs]
            flips = ", ".join(f"{r['agree']} ({r['flip_margin']:.3f})" for r in runs if r["flip_margin"] is not None)
            print(f"| {name} | {dtype} | {model.config.head_dim} | "
                  f"{sum(a == args.new_tokens for a in agree)}/{len(runs)} | "
                  f"{flips or '-'} | "
                  f"{sum(r['mean_abs_dlogit'] for r in runs) / len(runs):.4f} | "
                  f"{max(r['max_abs_dlogit'] for r in runs):.3f} | "
                  f"{sum(r['mean_abs_logit'] for r in runs) / len(runs):.2f} |", flush=True)


if __name__ == "__main__":
    main()
