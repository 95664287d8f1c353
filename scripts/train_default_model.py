#!/usr/bin/env python3
"""Train glinthawk's bundled default model: a small Llama on Python's own documentation.

The whole recipe, from corpus to the files in ``glinthawk/models/default/``:

1. Corpus (offline, PSF-licensed English shipped with the interpreter):
   * every entry of ``pydoc_data.topics.topics`` (the language reference topics that
     ``help()`` shows), one document per topic;
   * docstrings (module, class, function) of the pure-Python standard library, read with
     ``ast`` from the interpreter's stdlib directory (nothing is imported), one document
     per docstring of at least ``MIN_DOCSTRING_CHARS`` characters and mostly ASCII letters.
     Test suites, ensurepip, encodings (generated codecs), site-packages and pydoc_data
     (already used above) are skipped.
   Documents are grouped by source (a topic, or a module); about 5% of the characters,
   whole groups chosen by SHA-256 of the group name, are held out for validation.
2. Tokenizer: byte-level BPE (``tokenizers``) trained on the training split only, with
   special tokens ``<s> </s> <|user|> <|assistant|> <|system|>`` (ids 0..4); its
   post-processor prepends ``<s>`` to single sequences, like Llama's.
3. Token stream: every document becomes ``<s> text </s>`` and the documents are
   concatenated, so the model learns to stop with ``</s>``.
4. Model: ``transformers.LlamaForCausalLM`` (GQA, tied embeddings), trained in float32
   on CPU with AdamW and a linear-warmup + cosine learning-rate schedule, on random
   windows of the training stream.
5. Saving: weights in bfloat16 (``model.safetensors``), then reloaded as float32 from the
   saved directory and evaluated on the validation stream, so the recorded validation
   loss is what the bundled files give. Windowing of that evaluation: the validation
   stream is cut into consecutive non-overlapping windows of ``eval_window`` tokens
   (the last one may be shorter; windows of one token are dropped); each window is run
   on its own from position 0, and every token after the first of a window is predicted
   from the tokens before it in the same window. Loss = mean negative log-likelihood over
   all predicted tokens; perplexity = exp(loss).

Everything is seeded; with the same interpreter, library versions, ``--steps`` and
``--threads`` the run is repeatable. ``--minutes`` is a hard wall-clock budget: when it
runs out the loop stops early and the model is still saved (``training.json`` records
how many steps ran). Without ``--steps`` the step count is chosen from the budget after
timing a few steps.

Usage::

    nice -n 19 .venv/bin/python scripts/train_default_model.py --minutes 25 --threads 1
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "glinthawk" / "models" / "default"

SPECIAL_TOKENS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
BOS_ID, EOS_ID = 0, 1
MIN_DOCSTRING_CHARS = 100
SKIP_TOP = {"test", "ensurepip", "encodings", "site-packages", "pydoc_data", "__pycache__"}
VALIDATION_IDS_FILE = "validation_ids.npy"
SAMPLE_PROMPT = "The built-in function"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- corpus

def _english_enough(text: str) -> bool:
    letters = sum(c.isascii() and c.isalpha() for c in text)
    return letters >= 0.6 * len(text)


def collect_corpus() -> tuple[list[tuple[str, str]], dict]:
    """Return [(group, text)] in a fixed order, and a description of what was used."""
    from pydoc_data.topics import topics

    docs: list[tuple[str, str]] = []
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            docs.append((f"topic:{key}", text))
    n_topics = len(docs)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in SKIP_TOP or rel.parts[0].startswith("config-") or any(
            part in ("test", "tests", "idle_test") for part in rel.parts
        ):
            continue
        files.append(rel)
    modules = set()
    n_docstrings = 0
    for rel in files:
        try:
            tree = ast.parse((stdlib / rel).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            text = ast.get_docstring(node)
            if not text or len(text) < MIN_DOCSTRING_CHARS or not _english_enough(text):
                continue
            docs.append((f"module:{module}", text.strip()))
            modules.add(module)
            n_docstrings += 1
    info = {
        "source": (f"Python {platform.python_version()} documentation shipped with the interpreter "
                   "(PSF License): pydoc_data.topics.topics and stdlib docstrings"),
        "pydoc_topics": n_topics,
        "docstrings": n_docstrings,
        "docstring_modules": len(modules),
        "docstring_rules": (f"ast.get_docstring of module/class/function nodes in {stdlib}/**/*.py, "
                            f">= {MIN_DOCSTRING_CHARS} chars, >= 60% ASCII letters; skipped top-level "
                            f"{sorted(SKIP_TOP)}, config-*, and any test/tests/idle_test directories"),
    }
    return docs, info


def split_corpus(docs: list[tuple[str, str]], val_fraction: float):
    """Hold out whole groups, taken in SHA-256 order of their names, until val_fraction of the chars."""
    sizes: dict[str, int] = {}
    for group, text in docs:
        sizes[group] = sizes.get(group, 0) + len(text)
    total = sum(sizes.values())
    order = sorted(sizes, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    val_groups, held = set(), 0
    for group in order:
        if held >= val_fraction * total:
            break
        if held + sizes[group] > 2 * val_fraction * total:  # skip a group too big for the budget
            continue
        val_groups.add(group)
        held += sizes[group]
    train = [t for g, t in docs if g not in val_groups]
    val = [t for g, t in docs if g in val_groups]
    return train, val, sorted(val_groups)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(BOS_ID)
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int64)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, ids: np.ndarray, window: int, batch: int = 16) -> tuple[float, int]:
    """Mean NLL over the windows described in the module docstring; returns (loss, tokens)."""
    model.eval()
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        for w in windows[i:i + batch]:  # one by one keeps the math free of padding
            x = torch.from_numpy(np.asarray(w, dtype=np.int64))[None]
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            nll += loss.item()
            count += len(w) - 1
    return nll / count, count


# ----------------------------------------------------------------------------- training

def lr_at(step: int, total: int, peak: float, warmup: int, floor: float, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine from peak to floor*peak.

    The cosine's progress is the larger of the step fraction and the fraction of the wall-clock
    budget spent, so a run cut short by --minutes still ends annealed. When the budget is not
    binding (it never is with a generous --minutes), the schedule depends on steps only.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_frac)
    progress = min(1.0, progress)
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(args, vocab_size: int):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None, initializer_range=0.02,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config)
    return model, config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (HF format)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: as many as --minutes allows)")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget for the training loop")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=640)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-val-tokens", type=int, default=30000)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- data
    docs, corpus_info = collect_corpus()
    train_texts, val_texts, val_groups = split_corpus(docs, args.val_fraction)
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids = encode_stream(tok, train_texts)
    val_ids = encode_stream(tok, val_texts)
    if len(val_ids) > args.max_val_tokens:
        cut = int(np.nonzero(val_ids[: args.max_val_tokens] == EOS_ID)[0][-1]) + 1  # whole documents
        val_ids = val_ids[:cut]
    vocab_size = tok.get_vocab_size()
    print(f"corpus: {len(train_texts)} train docs / {len(val_texts)} val docs; "
          f"{len(train_ids)} train tokens, {len(val_ids)} val tokens; vocab {vocab_size}", flush=True)

    # ---- model
    model, config = build_model(args, vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    train_t = torch.from_numpy(train_ids)
    L = args.seq_len

    def batch():
        starts = torch.randint(0, len(train_t) - L - 1, (args.batch,), generator=gen)
        x = torch.stack([train_t[s:s + L + 1] for s in starts.tolist()])
        return x[:, :-1], x[:, 1:]

    budget_s = args.minutes * 60.0
    total_steps = args.steps
    calibrate = total_steps <= 0
    if calibrate:
        total_steps = 10**9  # replaced after timing the first steps
    t_loop = time.time()
    losses, curve = [], []
    step = 0
    schedule_time_driven = False
    stopped_by_budget = False
    model.train()
    while step < total_steps:
        time_frac = (time.time() - t_loop) / budget_s
        lr = lr_at(step, total_steps, args.lr, args.warmup, args.min_lr_ratio, time_frac)
        if step >= args.warmup and time_frac > (step - args.warmup) / max(1, total_steps - args.warmup):
            schedule_time_driven = True  # the budget, not the step count, is driving the cosine
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        elapsed = time.time() - t_loop
        if calibrate and step in (5, 50):  # time a few steps, then fit the schedule to the budget
            per_step = elapsed / step
            total_steps = max(step + 1, args.warmup + 1, int(budget_s * 0.97 / per_step))
            calibrate = step < 50
            print(f"calibrated: {per_step:.2f} s/step -> {total_steps} steps", flush=True)
        if elapsed >= budget_s * 0.999 and step < total_steps:  # lr has reached its floor: stop
            stopped_by_budget = True
            print(f"budget of {args.minutes} min reached at step {step}", flush=True)
            break
        if step % args.log_every == 0 or step == total_steps:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            curve.append([step, round(recent, 4)])
            print(f"step {step}/{total_steps} lr {lr:.2e} loss {recent:.4f} "
                  f"elapsed {elapsed / 60:.1f} min", flush=True)
    train_wall = time.time() - t_loop
    final_train_loss = sum(losses[-20:]) / len(losses[-20:])

    # ---- save (bfloat16), then evaluate what was saved
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        (out / name).unlink(missing_ok=True)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(Path(tmp) / "config.json", out / "config.json")
        shutil.copyfile(Path(tmp) / "model.safetensors", out / "model.safetensors")
    del model
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": None, "pad_token": None,
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "max_length": 512,
    }, indent=2) + "\n")
    np.save(out / VALIDATION_IDS_FILE, val_ids.astype(np.int16))

    import transformers

    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    val_loss, val_tokens = evaluate(loaded, val_ids, L)
    prompt_ids = tok.encode(SAMPLE_PROMPT).ids  # <s> added by the post-processor
    with torch.no_grad():
        gen_ids = loaded.generate(torch.tensor([prompt_ids]), max_new_tokens=40, do_sample=False,
                                  eos_token_id=EOS_ID, pad_token_id=EOS_ID)[0, len(prompt_ids):].tolist()
    sample = tok.decode(gen_ids, skip_special_tokens=False)
    print(f"val loss {val_loss:.4f} ppl {math.exp(val_loss):.2f} over {val_tokens} tokens", flush=True)
    print(f"sample: {SAMPLE_PROMPT!r} -> {sample!r}", flush=True)

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    record = {
        "corpus": {
            **corpus_info,
            "documents": len(docs),
            "train_documents": len(train_texts),
            "val_documents": len(val_texts),
            "split": (f"by source group (a topic or a module), groups taken in SHA-256 order of the group "
                      f"name until {args.val_fraction:.0%} of the characters; validation stream capped at "
                      f"{args.max_val_tokens} tokens at a document boundary"),
            "val_groups": val_groups,
            "train_chars": sum(len(t) for t in train_texts),
            "val_chars": sum(len(t) for t in val_texts),
            "stream_format": "each document encoded as <s> text </s>, documents concatenated",
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers), trained on the train split",
                      "vocab_size": vocab_size, "special_tokens": SPECIAL_TOKENS},
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "validation_ids_file": VALIDATION_IDS_FILE,
        "model": {"parameters": n_params, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                  "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
                  "intermediate_size": args.mlp, "tie_word_embeddings": True,
                  "saved_dtype": "bfloat16", "trained_dtype": "float32"},
        "training": {
            "steps": step, "planned_steps": total_steps, "stopped_by_budget": stopped_by_budget,
            "batch_size": args.batch, "seq_len": L, "tokens_seen": step * args.batch * L,
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "eps": 1e-8,
                          "weight_decay": args.weight_decay, "grad_clip": 1.0,
                          "no_decay": "norm weights"},
            "lr_schedule": {"type": "linear warmup then cosine decay", "peak_lr": args.lr,
                            "warmup_steps": args.warmup, "min_lr": round(args.lr * args.min_lr_ratio, 10),
                            "planned_steps": total_steps,
                            "cosine_progress": ("max((step - warmup) / (planned_steps - warmup), "
                                                "elapsed / budget), clipped to 1"),
                            "budget_minutes": args.minutes,
                            "time_driven": schedule_time_driven},
            "batching": "random windows of seq_len+1 tokens from the train stream (seeded torch.Generator)",
            "seed": args.seed, "threads": args.threads,
            "wall_time_s": round(train_wall, 1),
            "total_script_time_s": round(time.time() - t_start, 1),
            "final_train_loss": round(final_train_loss, 4),
            "final_train_loss_note": "mean of the last 20 steps' batch losses (float32 model)",
            "loss_curve": curve,
        },
        "validation": {
            "loss": val_loss, "perplexity": math.exp(val_loss), "predicted_tokens": val_tokens,
            "eval_window": L,
            "windowing": ("validation ids cut into consecutive non-overlapping windows of eval_window tokens "
                          "(last may be shorter, 1-token windows dropped); each window run alone from "
                          "position 0; every token after the first of a window predicted; loss = mean NLL "
                          "over predicted tokens; perplexity = exp(loss)"),
            "model_form": "model.safetensors (bfloat16) loaded with LlamaForCausalLM.from_pretrained(dtype=float32)",
        },
        "sample": {"prompt": SAMPLE_PROMPT, "prompt_ids": prompt_ids, "decoding": "greedy",
                   "max_new_tokens": 40, "new_token_ids": gen_ids, "text": sample},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "tokenizers": __import__("tokenizers").__version__, "numpy": np.__version__},
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
