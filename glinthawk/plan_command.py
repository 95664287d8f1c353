"""The ``glinthawk plan`` command: the inputs of ``plan.plan`` from the command line, its answer as a table.

The machine defaults are the original work's layout (an NVIDIA T4 as Tier 1, CPU VMs as Tier 2,
8 Gbit/s links; ../shared/PAPER.md): a T4's 65 TFLOP/s of float16 and 320 GB/s, and 20 GB/s of
memory bandwidth for a CPU VM. Measure yours with ``glinthawk bench limits`` on each kind and give
its output (--tier1-limits, --tier2-limits); --input takes the lengths from a requests file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import click

from glinthawk.net.netem import parse_bandwidth, parse_size
from glinthawk.options import DEFAULT_MODEL

_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kKMGTP]?)\s*(?:FLOP/?S)?\s*", re.IGNORECASE)
_RATE_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_flops(text: str) -> float:
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"cannot parse FLOP/s {text!r}: expected a number and a prefix, like '65T'")
    return float(match[1]) * _RATE_SCALE[match[2].lower()]


def _parsed(parse, text: str, option: str, scale: float = 1.0):
    try:
        return parse(text) * scale
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _config(path: Path):
    from glinthawk.compute.config import ModelConfig, ModelConfigError

    try:
        return ModelConfig.from_file(path / "config.json" if path.is_dir() else path)
    except ModelConfigError as exc:
        raise click.ClickException(str(exc)) from None


PRICE = click.FloatRange(min=0, min_open=True)
LIMITS_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("plan")
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path), default=DEFAULT_MODEL,
              show_default="bundled model", help="Checkpoint directory, or its config.json.")
@click.option("--dtype", type=click.Choice(sorted(ITEMSIZE)), default="bfloat16", show_default=True)
@click.option("--tier1-memory", required=True, help="The accelerator's memory, e.g. 16GiB.")
@click.option("--tier1-price", type=PRICE, required=True, help="Tier 1 machine, per hour.")
@click.option("--tier1-limits", type=LIMITS_FILE, help="limits.json of `glinthawk bench limits` run on the Tier 1 "
              "kind (--device cuda on a GPU): its matmul peak in --dtype and its read bandwidth.")
@click.option("--tier1-flops", help="Tier 1's peak FLOP/s in --dtype (wins over --tier1-limits).  [default: 65T]")
@click.option("--tier1-bandwidth", help="Tier 1's memory bandwidth (wins over --tier1-limits).  [default: 320GB/s]")
@click.option("--tier2-memory", help="A Tier 2 machine's memory, e.g. 110GiB.  [required unless --tier2-limits "
              "records the machine's RAM]")
@click.option("--tier2-price", type=PRICE, required=True, help="A Tier 2 machine, per hour.")
@click.option("--tier2-limits", type=LIMITS_FILE, help="limits.json of `glinthawk bench limits` run on the Tier 2 "
              "kind: its read bandwidth, and its RAM.")
@click.option("--tier2-bandwidth", help="A Tier 2 machine's memory bandwidth (wins over --tier2-limits).  "
              "[default: 20GB/s]")
@click.option("--input", "input_path", type=LIMITS_FILE, help="A requests file (JSONL, as `glinthawk run` takes): "
              "the prompt and output lengths (their means) and the request count come from it, prompts tokenized "
              "with --model's tokenizer (characters / 4 without one), outputs at their max_tokens.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), help="Tokens per prompt (mean).  [required without "
              "--input]")
@click.option("--output-tokens", type=click.IntRange(min=1), help="Tokens generated per request (mean).  [required "
              "without --input]")
@click.option("--requests", type=click.IntRange(min=1), help="[default: --input's count, else 100000]")
@click.option("--latency-ms", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="One-way latency between the tiers.")
@click.option("--link", default="8Gbit", show_default=True, help="Tier 1's network bandwidth each way.")
def plan_command(model_path, dtype, tier1_memory, tier1_price, tier1_limits, tier1_flops, tier1_bandwidth,
                 tier2_memory, tier2_price, tier2_limits, tier2_bandwidth, input_path, prompt_tokens, output_tokens,
                 requests, latency_ms, link) -> None:
    """How many Tier 2 nodes to buy for a model and a workload: batch, micro-batches, KV per node,
    tokens/s and cost per million generated tokens, against a single-tier layout (KV on the accelerator).
    A roofline model (docs/DEPLOYMENT.md, "Sizing a cluster")."""
    from glinthawk.plan import GiB, Machine, Model, PlanError, Workload, plan

    config = _config(model_path)
    model = Model.of(config, ITEMSIZE[dtype])
    limits1 = _limits(tier1_limits, dtype)
    limits2 = _limits(tier2_limits, dtype)
    if tier1_flops is None and limits1 is not None and limits1.flops is None:
        raise click.ClickException(
            f"{tier1_limits} has no {dtype} matmul peak (it measured {', '.join(limits1.measured) or 'none'}): run "
            f"`glinthawk bench limits --set dtypes={dtype}` on the Tier 1 kind, or give --tier1-flops")
    tier1 = Machine(_parsed(parse_size, tier1_memory, "--tier1-memory"), tier1_price,
                    _figure(parse_bandwidth, tier1_bandwidth, "--tier1-bandwidth", limits1 and limits1.bandwidth,
                            "320GB/s", 1 / 8),
                    _figure(parse_flops, tier1_flops, "--tier1-flops", limits1 and limits1.flops, "65T"))
    if tier2_memory is None and (limits2 is None or limits2.memory is None):
        raise click.UsageError("give --tier2-memory (or a --tier2-limits file that records the machine's RAM)")
    tier2 = Machine(_parsed(parse_size, tier2_memory, "--tier2-memory") if tier2_memory else limits2.memory,
                    tier2_price, _figure(parse_bandwidth, tier2_bandwidth, "--tier2-bandwidth",
                                         limits2 and limits2.bandwidth, "20GB/s", 1 / 8))
    prompt_tokens, output_tokens, requests = _lengths(input_path, model_path, prompt_tokens, output_tokens, requests)
    work = Workload(prompt_tokens, output_tokens, requests, latency_ms / 1e3,
                    _parsed(parse_bandwidth, link, "--link", 1 / 8))
    try:
        two, one = plan(model, tier1, tier2, work)
    except PlanError as exc:
        raise click.ClickException(str(exc)) from None
    seq = prompt_tokens + output_tokens
    click.echo(f"model {model_path.name}: {config.num_layers} layers, {dtype}, weights {model.weights / GiB:.2f} GiB; "
               f"KV {_size(model.kv_per_token)} per token, {_size(seq * model.kv_per_token)} per sequence "
               f"({seq} tokens)")
    _table(two, one, requests, output_tokens)


def _limits(path: Path | None, dtype: str):
    from glinthawk.plan_inputs import PlanInputError, read_limits

    if path is None:
        return None
    try:
        return read_limits(path, dtype)
    except PlanInputError as exc:
        raise click.ClickException(str(exc)) from None


def _figure(parse, text: str | None, option: str, measured: float | None, default: str, scale: float = 1.0) -> float:
    """An option given, else the limits file's figure, else the default (the original work's machines)."""
    if text is None and measured is not None:
        return measured
    return _parsed(parse, text if text is not None else default, option, scale)


def _lengths(path: Path | None, model_path: Path, prompt_tokens: int | None, output_tokens: int | None,
             requests: int | None) -> tuple[int, int, int]:
    """Mean prompt and output tokens and the request count: from --input, where the options leave them out."""
    if path is None:
        if prompt_tokens is None or output_tokens is None:
            raise click.UsageError("give --prompt-tokens and --output-tokens, or --input with a requests file")
        return prompt_tokens, output_tokens, requests or 100_000
    from glinthawk.plan_inputs import CHARS_PER_TOKEN, PlanInputError, percentile, read_lengths

    try:
        lengths = read_lengths(path, model_path if model_path.is_dir() else model_path.parent)
    except PlanInputError as exc:
        raise click.ClickException(str(exc)) from None

    def spread(values: list[int]) -> str:
        return (f"mean {sum(values) / len(values):,.1f}, p50 {percentile(values, 0.5):,}, p90 "
                f"{percentile(values, 0.9):,}, max {max(values):,}")

    how = (f"characters / {CHARS_PER_TOKEN}: no tokenizer.json beside the model" if lengths.estimated
           else "the model's tokenizer")
    skipped = f", {lengths.skipped} line(s) that are not requests left out" if lengths.skipped else ""
    click.echo(f"input {path.name}: {lengths.requests:,} requests{skipped}; prompt tokens ({how}) "
               f"{spread(lengths.prompts)}; max_tokens {spread(lengths.outputs)}")
    # means: throughput and KV in use follow the total tokens; a run's batch mixes the long and the short
    mean_prompt = math.ceil(sum(lengths.prompts) / lengths.requests)
    mean_output = math.ceil(sum(lengths.outputs) / lengths.requests)
    return prompt_tokens or mean_prompt, output_tokens or mean_output, requests or lengths.requests


def _table(two, one, requests: int, output_tokens: int) -> None:
    rows = [
        ("Tier 2 nodes", lambda x: str(x.tier2_nodes) if x.tier2_nodes else "-"),
        ("KV per Tier 2 node", lambda x: _size(x.kv_per_node) if x.tier2_nodes else "-"),
        ("sequences at once (batch)", lambda x: str(x.batch)),
        ("micro-batches in flight", lambda x: str(x.micro_batches)),
        ("Tier 1 computing", lambda x: f"{x.busy:.0%}"),
        ("generated tokens/s", lambda x: f"{x.tokens_per_s:,.0f}"),
        ("cost per hour", lambda x: f"${x.cost_per_hour:,.2f}"),
        ("cost per 1M tokens", lambda x: f"${x.cost_per_million:,.3f}"),
        (f"{requests} requests take", lambda x: f"{requests * output_tokens / x.tokens_per_s / 3600:,.2f} h"),
        ("limited by", lambda x: x.bound),
    ]
    layouts = [two] + ([one] if one else [])
    click.echo(f"{'':<26}" + "".join(f"{x.name:>22}" for x in layouts))
    for label, cell in rows:
        click.echo(f"{label:<26}" + "".join(f"{cell(x):>22}" for x in layouts))
    if one is None:
        click.echo("single-tier: the accelerator holds no sequence beside the weights")
    elif (ratio := one.cost_per_million / two.cost_per_million) >= 1:
        click.echo(f"two-tier: {ratio:.2f}x lower cost per token than single-tier")
    else:
        click.echo(f"single-tier: {1 / ratio:.2f}x lower cost per token than two-tier for this workload")


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
