"""engine: the single-process Engine against Hugging Face ``generate`` and the roofline.

Both run the same checkpoint, prompts (token ids), batch, lengths and dtype, greedy, with
exactly ``new_tokens`` generated per request (``ignore_eos`` / ``min_new_tokens``).

- tok/s: generated tokens / wall time of the whole run (prefill included);
- decode tok/s: ours from the decode-only steps of the run; HF's as
  ``batch * (new - 1) / (t(new) - t(1))`` (a second, prefill-only generate call);
- roofline: per decode step, bytes = weights + K/V read, FLOPs = 2 per weight per token
  + attention; the step's floor is max(bytes / read bandwidth, FLOPs / matmul peak), both
  measured in this run; roofline tok/s = decode tokens / sum of floors;
- llama.cpp (optional, knob ``llamacpp``): ``llama-batched-bench`` on the same work, what its
  figures count in ``glinthawk.bench.llamacpp``.
"""

from __future__ import annotations

import time

import torch

from glinthawk.bench import knobs, limits, llamacpp
from glinthawk.bench.checkpoint import EOS_ID
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import Roofline, ratio, target
from glinthawk.bench.runs import decode_summary, run_engine
from glinthawk.bench.workloads import request_lines, token_prompts
from glinthawk.compute.graphs import StageGraphs, stage_graphs

DEVICES = ("cpu", "cuda")  # where the suite can run its model (--device)
DEFAULTS, QUICK = knobs.ENGINE, knobs.ENGINE_QUICK


def _load_hf(ctx: BenchContext):
    try:
        import transformers
    except ImportError:
        return None
    dtype = limits.DTYPES[ctx.dtype]
    return transformers.AutoModelForCausalLM.from_pretrained(ctx.checkpoint(), dtype=dtype).to(ctx.device).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, torch.Tensor]:
    ids = torch.tensor(prompts, dtype=torch.int64, device=model.device)
    started = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=EOS_ID).cpu()
    seconds = time.perf_counter() - started
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    return seconds, out[:, ids.shape[1]:]


def measure_point(ctx: BenchContext, label: str, batch: int, prompt: int, new_tokens: int, roofline: Roofline,
                  hf_model, max_batch_tokens: int, cuda_graphs: bool = False,
                  llama: llamacpp.Baseline | None = None) -> dict:
    model, tokenizer = ctx.load()
    prompts = token_prompts(batch, prompt, model.config.vocab_size, seed=1)
    lines = request_lines(prompts, new_tokens)
    kv_tokens = batch * (prompt + new_tokens)
    graphs, captured = _captured_graphs(model, tokenizer, lines, kv_tokens, max_batch_tokens, batch, cuda_graphs)
    ctx.echo(f"  {label}: glinthawk Engine, batch {batch}, prompt {prompt}, {new_tokens} new tokens"
             + (" (CUDA graphs)" if graphs is not None else ""))
    ours = run_engine(model, tokenizer, lines, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens,
                      max_seqs=batch, roofline=roofline, graphs=graphs)
    decode = decode_summary(ours.extra["steps"])
    row = {
        "point": label, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
        "context": prompt + new_tokens, "seconds": ours.seconds, "tok_s": ours.tokens_per_s,
        "cuda_graphs": graphs is not None, "graph_capture_seconds": captured, **decode,
    }
    row["fraction_of_roofline"] = ratio(row["decode_tok_s"], row["roofline_tok_s"])
    if hf_model is not None:
        ctx.echo(f"  {label}: transformers generate")
        hf_seconds, hf_tokens = hf_generate(hf_model, prompts, new_tokens)
        hf_prefill, _ = hf_generate(hf_model, prompts, 1)
        hf_decode = batch * (new_tokens - 1) / (hf_seconds - hf_prefill) if hf_seconds > hf_prefill else None
        outputs = ours.extra["outputs"]
        same = sum(outputs[f"r{i}"] == hf_tokens[i].tolist() for i in range(batch))
        row.update({
            "hf_seconds": hf_seconds, "hf_tok_s": batch * new_tokens / hf_seconds, "hf_prefill_seconds": hf_prefill,
            "hf_decode_tok_s": hf_decode, "hf_fraction_of_roofline": ratio(hf_decode, row["roofline_tok_s"]),
            "greedy_agreement": same / batch,
        })
        row["ratio_ours_to_hf"] = ratio(row["tok_s"], row["hf_tok_s"])
        row["decode_ratio_ours_to_hf"] = ratio(row["decode_tok_s"], hf_decode)
    if llama is not None:
        ctx.echo(f"  {label}: llama.cpp {llamacpp.BINARY}, {len(llama.variants)} option set(s)")
        row.update(llama.measure(batch, prompt, new_tokens))
        if "llamacpp_error" in row:
            ctx.echo(f"  {label}: llama.cpp failed, no ratio to it: {row['llamacpp_error']}")
        row["ratio_ours_to_llamacpp"] = ratio(row["tok_s"], row.get("llamacpp_tok_s"))
        row["decode_ratio_ours_to_llamacpp"] = ratio(row["decode_tok_s"], row.get("llamacpp_decode_tok_s"))
    return row


def _captured_graphs(model, tokenizer, lines: list[dict], kv_tokens: int, max_batch_tokens: int, batch: int,
                     enabled: bool) -> tuple[StageGraphs | None, float | None]:
    """CUDA graphs for the point (None off CUDA or unless ``enabled``), captured by a short run of
    the same batch (2 new tokens), so the timed run replays them; and that run's seconds."""
    graphs = stage_graphs(model, enabled, max_batch_tokens)
    if graphs is None:
        return None, None
    short = [{**line, "max_tokens": 2} for line in lines]
    return graphs, run_engine(model, tokenizer, short, kv_tokens=kv_tokens, max_batch_tokens=max_batch_tokens,
                              max_seqs=batch, graphs=graphs).seconds


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("engine", DEFAULTS, QUICK)
    model, tokenizer = ctx.load()
    llama = llamacpp.prepare(knobs["llamacpp"], ctx.checkpoint(), ctx.dtype, ctx.device, torch.get_num_threads(),
                             knobs["max_batch_tokens"], ctx.echo, knobs["llamacpp_args"])
    ctx.echo("  calibrating read bandwidth and matmul peak")
    calib = limits.calibrate(ctx)
    roofline = Roofline.of(model, calib["read_bandwidth"], calib["matmul_peak"])
    hf_model = _load_hf(ctx) if knobs["hf"] else None
    warm = request_lines(token_prompts(2, 4, model.config.vocab_size), 2)
    run_engine(model, tokenizer, warm, kv_tokens=64)
    if hf_model is not None:
        hf_generate(hf_model, [w["prompt"] for w in warm], 2)
    points = [("throughput", knobs["batch"], knobs["prompt"], knobs["new_tokens"])]
    if knobs["long_batch"] > 0:
        points.append(("long-context", knobs["long_batch"], knobs["long_prompt"], knobs["long_new_tokens"]))
    rows = [measure_point(ctx, label, batch, prompt, new, roofline, hf_model, knobs["max_batch_tokens"],
                          knobs["cuda_graphs"], llama) for label, batch, prompt, new in points]
    main = rows[0]
    long_run = rows[1] if len(rows) > 1 else {}
    growth = ratio(long_run.get("ratio_ours_to_hf"), main.get("ratio_ours_to_hf"))
    return {
        "config": {**knobs, "kv_tokens": "batch * (prompt + new_tokens)", "device": ctx.device,
                   "llamacpp_run": _llamacpp_config(llama)},
        "model": ctx.model_info(),
        "calibration": calib,
        "roofline_model": {"weight_bytes_per_step": roofline.weight_bytes, "linear_params": roofline.linear_params,
                           "kv_bytes_per_token": roofline.kv_bytes_per_token},
        "baseline": {"speed": "Hugging Face transformers generate, same run; roofline from this run's limits",
                     "llamacpp": f"llama.cpp {llamacpp.BINARY} on the same work, same run (knob llamacpp)"},
        "results": [{k: v for k, v in row.items()} for row in rows],
        "summary": {"tok_s": main["tok_s"], "decode_tok_s": main["decode_tok_s"],
                    "fraction_of_roofline": main["fraction_of_roofline"],
                    "ratio_ours_to_hf": main.get("ratio_ours_to_hf"), "long_context_ratio_growth": growth,
                    "ratio_ours_to_llamacpp": main.get("ratio_ours_to_llamacpp")},
        "targets": _targets(knobs, main, growth),
        "notes": _notes(ctx.device, hf_model is not None, llama),
        "table": (TABLE, rows),
    }


TABLE = [("point", "point"), ("batch", "batch"), ("prompt", "prompt"), ("new_tokens", "new"),
         ("tok_s", "ours tok/s"), ("decode_tok_s", "ours decode tok/s"),
         ("roofline_tok_s", "roofline tok/s"), ("fraction_of_roofline", "of roofline"),
         ("hf_tok_s", "HF tok/s"), ("hf_decode_tok_s", "HF decode tok/s"),
         ("ratio_ours_to_hf", "ours/HF"), ("greedy_agreement", "same tokens"),
         ("llamacpp_tok_s", "llama.cpp tok/s"), ("llamacpp_args", "llama.cpp options"),
         ("ratio_ours_to_llamacpp", "ours/llama.cpp")]


def _targets(knobs: dict, main: dict, growth: float | None) -> dict:
    return {
        "roofline": target(">= 80% of roofline (decode, batch 128/prompt 16/128 new)",
                           main["fraction_of_roofline"], 0.8),
        "vs_hf": target(">= 1.5x HF generate (batch 128/prompt 16/128 new)", main.get("ratio_ours_to_hf"), 1.5),
        "long_context": target(
            f"ours/HF grows at context >= 2048: ratio at prompt {knobs['long_prompt']} over ratio at prompt "
            f"{knobs['prompt']} (whole runs) >= 1", growth, 1.0),
        "vs_llamacpp": target(f">= 1.25x llama.cpp {llamacpp.BINARY} (whole runs, same batch/prompt/new tokens, "
                              "threads and dtype; batch 64-128)", main.get("ratio_ours_to_llamacpp"), 1.25),
    }


def _notes(device: str, hf: bool, llama: llamacpp.Baseline | None) -> list[str]:
    notes = [
        "tok_s counts generated tokens over the whole run (prefill included); decode_tok_s only decode steps",
        (f"roofline uses the {device} read bandwidth and matmul peak measured at the start of this run "
         "(see calibration)"),
        "HF decode tok/s = batch*(new-1) / (t(generate new) - t(generate 1))",
        ("greedy_agreement: the fraction of requests whose whole output equals HF's; in 16-bit dtypes the random "
         "benchmark model's near-tied logits let one rounding difference change the rest of a sequence, so it is "
         "low there; float32 outputs agree (tests/test_model_vs_transformers.py)"),
    ]
    if not hf:
        notes.append("transformers not installed or hf=false: no Hugging Face comparison")
    if llama is None:
        notes.append("no llama.cpp comparison (llamacpp=off, not built: scripts/build_llamacpp.sh, or skipped)")
    else:
        notes.append(
            f"llamacpp_tok_s = batch*new / llama-batched-bench's 'T s' (its prefill + new-1 decode steps, "
            f"-ntg new-1: its prefill yields the first token's logits; model load and warm-up excluded, no sampling); "
            f"llamacpp_reported_tok_s is its 'S t/s' column, which counts prompt tokens too; "
            f"llamacpp_decode_tok_s its 'S_TG t/s'; weights and KV cache {llamacpp.GGUF_TYPES[llama.dtype]}; "
            f"the fastest of its option sets {' / '.join(' '.join(v) or 'defaults' for v in llama.variants)} "
            f"(llamacpp_args; each in llamacpp_variants)")
    return notes


def _llamacpp_config(llama: llamacpp.Baseline | None) -> dict | None:
    if llama is None:
        return None
    return {"binary": str(llama.binary), "gguf": str(llama.gguf), "type": llamacpp.GGUF_TYPES[llama.dtype],
            "threads": llama.threads, "variants": [" ".join(v) for v in llama.variants],
            "sources": str(llamacpp.source_dir(llama.binary))}


def plot(result: dict, figure) -> None:
    rows = result["results"]
    axes = figure.subplots(1, len(rows))
    axes = list(axes) if len(rows) > 1 else [axes]
    for ax, row in zip(axes, rows):
        names = ["glinthawk", "glinthawk\ndecode", "roofline\ndecode", "HF", "HF\ndecode", "llama.cpp",
                 "llama.cpp\ndecode"]
        values = [row.get("tok_s"), row.get("decode_tok_s"), row.get("roofline_tok_s"), row.get("hf_tok_s"),
                  row.get("hf_decode_tok_s"), row.get("llamacpp_tok_s"), row.get("llamacpp_decode_tok_s")]
        colors = ["tab:blue", "tab:blue", "tab:gray", "tab:orange", "tab:orange", "tab:green", "tab:green"]
        bars = ax.bar(names, [v or 0 for v in values], color=colors)
        for bar, value in zip(bars, values):
            if value:
                ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=8)
        ax.set_ylabel("generated tok/s")
        frac = row.get("fraction_of_roofline")
        vs = row.get("ratio_ours_to_hf")
        ax.set_title(f"{row['point']}: batch {row['batch']}, prompt {row['prompt']}, new {row['new_tokens']}\n"
                     f"{(frac or 0):.0%} of roofline, {(vs or 0):.2f}x HF"
                     + (f", {row['ratio_ours_to_llamacpp']:.2f}x llama.cpp" if row.get("ratio_ours_to_llamacpp") else ""),
                     fontsize=9)
