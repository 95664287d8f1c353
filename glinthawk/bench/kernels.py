"""kernels: the two hot paths against this machine's limits, measured in the same run.

- Tier 2 decode attention (``glinthawk.compute.attention.attend`` on a ``KVStore``): one new
  token for each of ``attn_batch`` sequences whose context is already cached, one layer
  of the benchmark model's geometry; figure of merit = K/V bytes read per second, as a
  fraction of the measured read bandwidth; the same over an int8 store (``--kv-dtype
  int8``: its bytes, scales included) next to it, at each context, against the same
  bandwidth measurement.
- Tier 1 projections + MLP (``glinthawk.compute.stages.layer_stage``, stage 1: layer 0's
  output projection, norm, SwiGLU MLP, then layer 1's norm, QKV projection and RoPE) on the
  benchmark model; figure of merit = FLOP/s as a fraction of the measured matmul peak.
- Tier 1 sampling (``glinthawk.compute.sampling.sample``) of ``sample_rows`` rows of
  logits over the model's vocabulary, per kind of request (greedy, temperature, top-p,
  top-k), against the torch expressions that sample where the C loop is not built (CUDA,
  no C compiler), run on the same logits; figure of merit = that speed-up.
- float32 linear layers on AVX-512F (``_matmul``) at ``matmul_rows`` rows, their weights cold
  in memory (``bench.matmul_cold``), against oneDNN in the same run; figure of merit = that speed-up.
"""

from __future__ import annotations

import torch

from glinthawk.bench import knobs, limits, matmul_cold
from glinthawk.bench.context import BenchContext
from glinthawk.bench.measure import best_of, ratio, target
from glinthawk.compute import sampling
from glinthawk.compute.sampling import SamplingParams

DEFAULTS, QUICK = knobs.KERNELS, knobs.KERNELS_QUICK
SAMPLERS = {"greedy": SamplingParams(temperature=0), "temperature 0.8": SamplingParams(temperature=0.8),
            "top-p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
            "top-k 50": SamplingParams(temperature=0.8, top_k=50)}


def fill_store(store, layer: int, seq_ids: list, length: int) -> None:
    """Write ``length`` tokens of random K/V for every sequence (content is irrelevant to speed)."""
    k = torch.randn(length, store.num_kv_heads, store.head_dim).to(store.dtype)
    v = torch.randn(length, store.num_kv_heads, store.head_dim).to(store.dtype)
    for seq_id in seq_ids:
        if hasattr(store, "rows"):  # write(layer, rows, k, v) with rows from rows(ids, starts, counts)
            store.write(layer, store.rows([seq_id], [0], [length]), k, v)
        else:  # write(layer, seq_id, start, k, v)
            store.write(layer, seq_id, 0, k, v)


def attention_point(model, batch: int, context: int, repeats: int, kv_dtype: torch.dtype | None = None) -> dict:
    from glinthawk.compute.attention import attend
    from glinthawk.compute.kvcache import KVStore

    cfg = model.config
    store = KVStore(1, cfg.num_kv_heads, cfg.head_dim, batch * (context + 1), model.dtype, kv_dtype=kv_dtype)
    ids = list(range(batch))
    for seq_id in ids:
        store.reserve(seq_id, context + 1)
    fill_store(store, 0, ids, context)
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim).to(model.dtype)
    k = torch.randn(batch, cfg.num_kv_heads, cfg.head_dim).to(model.dtype)
    v = torch.randn(batch, cfg.num_kv_heads, cfg.head_dim).to(model.dtype)
    starts, counts = [context] * batch, [1] * batch
    with torch.inference_mode():
        best, samples = best_of(lambda: attend(store, 0, ids, starts, counts, q, k, v), repeats)
    kv_bytes = batch * (context + 1) * store.bytes_per_token  # one layer: K and V (and an int8 store's scales)
    flops = 4 * batch * cfg.num_heads * cfg.head_dim * (context + 1)
    name = "decode attention" + (" (int8 KV)" if store.quantized else "")
    return {"kernel": name, "batch": batch, "context": context, "seconds": best,
            "kv_bytes": kv_bytes, "bytes_per_s": kv_bytes / best, "flops_per_s": flops / best,
            "samples": samples}


def layer_point(model, tokens: int, repeats: int) -> dict:
    from glinthawk.compute.rope import rotary
    from glinthawk.compute.stages import layer_stage

    cfg = model.config
    stage = 1 if cfg.num_layers > 1 else 0
    rot = rotary(model.inv_freq, torch.arange(tokens), model.dtype)  # once per step in Tier 1, not per stage
    x = torch.randn(tokens, cfg.hidden_size).to(model.dtype) * 0.1
    attn_out = torch.randn(tokens, cfg.num_heads, cfg.head_dim).to(model.dtype) * 0.1
    with torch.inference_mode():
        best, samples = best_of(lambda: layer_stage(model, stage, rot, x=x, attn_out=attn_out), repeats)
    previous, current = model.layers[stage - 1], model.layers[stage]
    weights = current.qkv.numel()
    if stage:
        weights += previous.o_proj.numel() + previous.gate_up.numel() + previous.down.numel()
    flops = 2 * tokens * weights
    return {"kernel": "layer_stage (o_proj+MLP+QKV)", "tokens": tokens, "seconds": best, "flops": flops,
            "flops_per_s": flops / best, "weight_bytes": weights * model.embed_tokens.element_size(),
            "samples": samples}


def sampling_point(model, rows: int, name: str, repeats: int) -> dict:
    """``sample`` on ``rows`` rows of random logits (normal, scale 3) in the model's dtype, as
    built and with the torch expressions instead of the C loop."""
    vocab = model.config.vocab_size
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 3).to(model.dtype)
    params, seeds, steps = [SAMPLERS[name]] * rows, list(range(rows)), [1] * rows
    built = sampling._sampling
    best, samples = best_of(lambda: sampling.sample(logits, params, seeds, steps), repeats)
    try:
        sampling._sampling = None
        torch_best, torch_samples = best_of(lambda: sampling.sample(logits, params, seeds, steps), repeats)
    finally:
        sampling._sampling = built
    return {"kernel": "sampling", "sampler": name, "rows": rows, "vocab": vocab, "seconds": best,
            "torch_seconds": torch_best, "speed_ratio_to_torch": ratio(torch_best, best),
            "c_sampler": built is not None, "samples": samples, "torch_samples": torch_samples}


def run(ctx: BenchContext) -> dict:
    knobs = ctx.knobs("kernels", DEFAULTS, QUICK)
    model, _ = ctx.load()
    rows = _points(ctx, knobs, model, ctx.best_of)
    attn = [r for r in rows if r["kernel"] == "decode attention"]
    attn_int8 = [r for r in rows if r["kernel"] == "decode attention (int8 KV)"]
    layer = [r for r in rows if "tokens" in r]
    long_attn = [r["fraction_of_read_bandwidth"] for r in attn if r["context"] >= 1024]
    int8_vs_base = [r["fraction_ratio_to_base"] for r in attn_int8 if r["context"] >= 1024]
    big_layer = [r["fraction_of_matmul_peak"] for r in layer if r["tokens"] >= 64]
    return {
        "config": {**knobs, "repeats": ctx.best_of, "layer_stage": "stage 1 of the benchmark model"},
        "model": ctx.model_info(),
        "baseline": {"attention": "read bandwidth (limits.read_bandwidth), mean of one run just before and one "
                                  "just after each point",
                     "layer_stage": f"matmul peak in {ctx.dtype} (limits.matmul_peak), likewise around each point",
                     "sampling": "the torch expressions of sampling.py on the same logits (the path where the C "
                                 "sampler is not built), same run",
                     "float32 matmul": "oneDNN's packed matmul on the same weights and rows, alternated in the same "
                                       "run (absent where _matmul does not run)"},
        "results": rows,
        "summary": {"read_bandwidth": _mean(r["read_bandwidth_around"] for r in attn),
                    "matmul_peak": _mean(r["matmul_peak_around"] for r in layer),
                    "attention_min_fraction_ctx_ge_1024": min(long_attn) if long_attn else None,
                    "attention_int8_min_fraction_ctx_ge_1024": min((r["fraction_of_read_bandwidth"] for r in attn_int8
                                                                    if r["context"] >= 1024), default=None),
                    "attention_int8_speed_ratios": [r["speed_ratio_to_base"] for r in attn_int8],
                    "layer_min_fraction_tokens_ge_64": min(big_layer) if big_layer else None},
        "targets": {
            "attention": target("decode attention >= 60% of read bandwidth for context >= 1024",
                                min(long_attn) if long_attn else None, 0.6),
            "attention_int8": target("int8 KV decode attention: its bytes/s as a fraction of read bandwidth at "
                                     "least the model dtype's, context >= 1024 (ratio of fractions >= 1)",
                                     min(int8_vs_base) if int8_vs_base else None, 1.0),
            "linear": target("projections + MLP >= 70% of matmul peak at batch >= 64",
                             min(big_layer) if big_layer else None, 0.7),
        },
        "notes": ["attention bytes = K and V of every cached token read once per decode step (one layer)",
                  "layer_stage FLOPs = 2 x tokens x weights of o_proj, gate_up, down and the next qkv",
                  "sampling logits: normal, scale 3, in the model's dtype; greedy rows take the same argmax "
                  "either way"],
        "table": ([("kernel", "kernel"), ("size", "size"), ("ms", "ms (best)"), ("rate", "rate"), ("unit", "unit"),
                   ("fraction", "of limit")], _table(rows)),
    }


def _points(ctx: BenchContext, knobs: dict, model, repeats: int) -> list[dict]:
    """Decode attention (the model's dtype and int8) per context, layer_stage per token count,
    and each sampler, each against the limit measured around it."""
    # This machine's bandwidth and peak drift by up to 2x over minutes (shared hosts), so
    # each point is divided by its own limit: the mean of one measured just before and one
    # just after it.
    rows = []
    for context in knobs["contexts"]:
        ctx.echo(f"  decode attention, batch {knobs['attn_batch']}, context {context}")
        before = limits.read_limit(ctx)
        row = attention_point(model, knobs["attn_batch"], context, repeats)
        int8 = attention_point(model, knobs["attn_batch"], context, repeats, torch.int8)
        bandwidth = (before + limits.read_limit(ctx)) / 2
        for point in (row, int8):
            point["read_bandwidth_around"] = bandwidth
            point["fraction_of_read_bandwidth"] = ratio(point["bytes_per_s"], bandwidth)
        int8["speed_ratio_to_base"] = ratio(row["seconds"], int8["seconds"])
        int8["fraction_ratio_to_base"] = ratio(int8["fraction_of_read_bandwidth"], row["fraction_of_read_bandwidth"])
        rows += [row, int8]
    for tokens in knobs["tokens"]:
        ctx.echo(f"  layer_stage, {tokens} tokens")
        before = limits.matmul_limit(ctx)
        row = layer_point(model, tokens, repeats)
        row["matmul_peak_around"] = (before + limits.matmul_limit(ctx)) / 2
        row["fraction_of_matmul_peak"] = ratio(row["flops_per_s"], row["matmul_peak_around"])
        rows.append(row)
    for name in SAMPLERS:
        ctx.echo(f"  sampling, {knobs['sample_rows']} rows, {name}")
        rows.append(sampling_point(model, knobs["sample_rows"], name, repeats))
    for count in knobs["matmul_rows"] if matmul_cold.available() else []:
        ctx.echo(f"  float32 matmul, {count} rows, weights cold: ours and oneDNN")
        rows.append(matmul_cold.cold_matmul_point(model, count, knobs["matmul_cycle_mib"] << 20, repeats))
    return rows


def _table(rows: list[dict]) -> list[dict]:
    attn_int8 = [r for r in rows if r["kernel"] == "decode attention (int8 KV)"]
    layer = [r for r in rows if "tokens" in r]
    table = [{"kernel": "attention" + (" int8" if r in attn_int8 else ""), "size": f"batch {r['batch']} ctx {r['context']}",
              "rate": r["bytes_per_s"] / 1e9, "unit": "GB/s", "fraction": r["fraction_of_read_bandwidth"],
              "ms": r["seconds"] * 1e3} for r in rows if r["kernel"].startswith("decode attention")]
    table += [{"kernel": "layer_stage", "size": f"{r['tokens']} tokens", "rate": r["flops_per_s"] / 1e9,
               "unit": "GFLOP/s", "fraction": r["fraction_of_matmul_peak"], "ms": r["seconds"] * 1e3}
              for r in layer]
    sampled = [r for r in rows if r["kernel"] == "sampling"]
    table += [{"kernel": "sampling", "size": f"{r['rows']} rows, {r['sampler']}", "rate": r["speed_ratio_to_torch"],
               "unit": "x torch's", "ms": r["seconds"] * 1e3} for r in sampled]
    table += [{"kernel": "fp32 matmul", "size": f"{r['rows']} rows, cold", "rate": r["speed_ratio_to_onednn"],
               "unit": "x oneDNN's", "ms": r["seconds"] * 1e3} for r in rows if r["kernel"] == matmul_cold.KERNEL]
    return table


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _against_limit(ax, xs: list, rates: list[float], ceilings: list[float], share: float, rate_label: str,
                   limit_label: str) -> None:
    """One panel: the measured rate, the limit measured around each point, and the target share of it."""
    ax.plot(xs, rates, marker="o", label=rate_label)
    ax.plot(xs, ceilings, color="tab:gray", linestyle="--", label=f"{limit_label} (around each point)")
    ax.plot(xs, [share * limit for limit in ceilings], color="tab:red", linestyle=":", label=f"{share:.0%} target")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)


def plot(result: dict, figure) -> None:
    left, right, third = figure.subplots(1, 3)
    attn = [r for r in result["results"] if r["kernel"] == "decode attention"]
    _against_limit(left, [r["context"] for r in attn], [r["bytes_per_s"] / 1e9 for r in attn],
                   [r["read_bandwidth_around"] / 1e9 for r in attn], 0.6, "attend()", "read bandwidth")
    attn_int8 = [r for r in result["results"] if r["kernel"] == "decode attention (int8 KV)"]
    if attn_int8:
        left.plot([r["context"] for r in attn_int8], [r["bytes_per_s"] / 1e9 for r in attn_int8], marker="s",
                  label="attend(), int8 KV")
        left.legend(fontsize=8)
    left.set_xlabel("context (tokens)")
    left.set_ylabel("K/V GB/s")
    left.set_title(f"Tier 2 decode attention, batch {attn[0]['batch'] if attn else '?'}")
    layer = [r for r in result["results"] if "tokens" in r]
    _against_limit(right, [r["tokens"] for r in layer], [r["flops_per_s"] / 1e9 for r in layer],
                   [r["matmul_peak_around"] / 1e9 for r in layer], 0.7, "layer_stage", "matmul peak")
    right.set_xlabel("tokens in batch")
    right.set_ylabel("GFLOP/s")
    right.set_title("Tier 1 projections + MLP")
    sampled = [r for r in result["results"] if r["kernel"] == "sampling"]
    names = [r["sampler"] for r in sampled]
    positions = range(len(sampled))
    third.bar([p - 0.2 for p in positions], [r["seconds"] * 1e3 for r in sampled], width=0.4, label="sample()")
    third.bar([p + 0.2 for p in positions], [r["torch_seconds"] * 1e3 for r in sampled], width=0.4,
              label="torch expressions", color="tab:gray")
    third.set_xticks(list(positions), names, rotation=20, fontsize=8)
    third.set_yscale("log")
    third.set_ylabel("ms per call")
    third.set_title(f"Tier 1 sampling, {sampled[0]['rows'] if sampled else '?'} rows")
    third.legend(fontsize=8)
