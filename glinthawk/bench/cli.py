"""The ``glinthawk bench`` command."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import click

from glinthawk.bench import SUITES, knobs
from glinthawk.bench.checkpoint import BENCH_MODEL, SHAPES

# What the [bench] extra installs: matplotlib draws SUITE.png, transformers is the engine suite's baseline.
BENCH_EXTRA = ("matplotlib", "transformers")


def _knob_help() -> str:
    """Every suite's knobs and defaults, from ``knobs`` (torch-free: the suites import torch)."""
    lines = []
    for name in SUITES:
        defaults = ", ".join(f"{k}={_show(v)}" for k, v in knobs.DEFAULTS[name].items())
        lines.append(f"{name}: {defaults}")
    return ("\b\nKnobs: --set SUITE.KEY=VALUE, or --set KEY=VALUE for every suite that has KEY; lists are "
            "comma-separated. Full-size defaults:\n") + \
        "\n".join(lines)


def _show(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


class _BenchCommand(click.Command):
    def format_epilog(self, ctx, formatter) -> None:
        formatter.write_paragraph()
        formatter.write_text(_knob_help())


@click.command("bench", cls=_BenchCommand)
@click.argument("suite", type=click.Choice([*SUITES, "all"]))
@click.option("--quick", is_flag=True, help="Tiny model and sizes: every suite in seconds (for tests and CI).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"),
              show_default=True, help="Where SUITE.json and SUITE.png go.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="auto: bfloat16 on CUDA and where the CPU multiplies it natively (AVX-512 BF16, AMX), "
                   "else float32.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model runs. cuda: the limits and engine suites only (the others measure the CPU "
                   "tiers); `all` runs those two.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Benchmark this checkpoint instead of the generated random Llama-125M.")
@click.option("--shape", type=click.Choice(list(SHAPES)), default=BENCH_MODEL.name, show_default=True,
              help="Shape of the generated random checkpoint: the Llama-125M, or SmolLM2-135M's (hidden 576, "
                   "30 layers, tied embeddings). Ignored with --model or --quick.")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Best-of-N repeats for micro-benchmarks (default 7, 2 with --quick).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads here and in the node processes started (OMP_NUM_THREADS); default: torch's.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Override a suite knob (see below).")
def bench(suite, quick, out_dir, dtype, device, model_dir, shape, repeats, threads, settings) -> None:
    """Run benchmark SUITE (or all of them): print a table, write OUT/SUITE.json and OUT/SUITE.png."""
    _require_bench_extra()
    import torch

    from glinthawk.bench.context import BenchContext
    from glinthawk.bench.report import run_suite
    from glinthawk.compute.loader import auto_dtype
    from glinthawk.threads import use_threads

    names = [name for name in (SUITES if suite == "all" else (suite,)) if device in _devices(name)]
    if not names:
        raise click.UsageError(f"suite {suite} runs on the CPU only; drop --device {device}")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda was asked for but torch sees no CUDA device; drop --device cuda")

    overrides = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {setting!r}", param_hint="--set")
        overrides[key.strip()] = value.strip()
    known = {k for name in SUITES for k in knobs.DEFAULTS[name]}
    known |= {f"{name}.{k}" for name in SUITES for k in knobs.DEFAULTS[name]}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise click.BadParameter(f"unknown knob(s) {', '.join(unknown)}; see glinthawk bench --help",
                                 param_hint="--set")
    if threads is not None:
        use_threads(threads, children=True)  # the node processes it starts too
    if dtype == "auto":
        dtype = auto_dtype(torch.device(device))
    ctx = BenchContext(out_dir=out_dir, quick=quick, dtype=dtype, device=device, repeats=repeats,
                       model_dir=model_dir, shape=shape, overrides=overrides)
    for name in names:
        run_suite(name, ctx)


def _require_bench_extra() -> None:
    """Fail in one line before any suite runs: without the plots' and baselines' packages a suite would end,
    minutes in, in an ImportError traceback."""
    for name in BENCH_EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module stubbed out as None in sys.modules
            found = False
        if not found:
            raise click.ClickException(f"glinthawk bench needs {name}, from the bench extra: "
                                       "pip install 'glinthawk[bench]'")


def _devices(suite: str) -> tuple[str, ...]:
    """Where SUITE can run its model: a suite module's DEVICES, the CPU alone where it names none."""
    return getattr(importlib.import_module(f"glinthawk.bench.{suite}"), "DEVICES", ("cpu",))
