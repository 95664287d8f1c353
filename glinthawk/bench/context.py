"""What one ``glinthawk bench`` invocation gives every suite it runs: its options, the
model (loaded once), and each suite's knobs after ``--set``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from glinthawk.bench.checkpoint import BENCH_MODEL, QUICK_MODEL, SHAPES, ModelSpec, bench_checkpoint


@dataclass
class BenchContext:
    """Options of one ``glinthawk bench`` invocation, shared by the suites it runs."""

    out_dir: Path
    quick: bool = False
    dtype: str = "float32"
    device: str = "cpu"  # where the model runs: "cpu" or "cuda" (suites that support it)
    repeats: int | None = None
    model_dir: Path | None = None  # None: the generated benchmark checkpoint
    shape: str = BENCH_MODEL.name  # that checkpoint's shape, a key of SHAPES (--quick: the tiny one)
    overrides: dict[str, str] = field(default_factory=dict)  # "key" or "suite.key" -> raw value
    echo: Callable[[str], None] = field(default=lambda message: click.echo(message, err=True))
    _loaded: dict = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> ModelSpec:
        return QUICK_MODEL if self.quick else SHAPES[self.shape]

    @property
    def best_of(self) -> int:
        return self.repeats or (2 if self.quick else 7)

    def checkpoint(self) -> Path:
        if self.model_dir is not None:
            return self.model_dir
        if "checkpoint" not in self._loaded:
            started = time.perf_counter()
            self._loaded["checkpoint"] = bench_checkpoint(self.spec)
            took = time.perf_counter() - started
            if took > 1:
                self.echo(f"built benchmark checkpoint {self._loaded['checkpoint']} in {took:.1f} s")
        return self._loaded["checkpoint"]

    def load(self):
        """(Model, Tokenizer) on ``self.device`` in ``self.dtype``, loaded once per invocation."""
        if "model" not in self._loaded:
            from glinthawk.compute.loader import load_model
            from glinthawk.tokenizer import Tokenizer

            directory = self.checkpoint()
            model = load_model(directory, dtype=self.dtype, device=self.device)
            self._loaded["model"] = (model, Tokenizer(directory, extra_eos_ids=model.config.eos_token_ids))
        return self._loaded["model"]

    def knobs(self, suite: str, defaults: dict[str, Any], quick: dict[str, Any]) -> dict[str, Any]:
        """The suite's knobs: defaults (or quick sizes), then ``--set`` overrides."""
        values = dict(defaults)
        if self.quick:
            values.update(quick)
        for key in values:
            for name in (key, f"{suite}.{key}"):
                if name in self.overrides:
                    values[key] = parse_knob(self.overrides[name], defaults[key], name)
        return values

    def model_info(self) -> dict[str, Any]:
        model, _ = self.load()
        cfg = model.config
        return {
            "checkpoint": str(self.checkpoint()),
            "spec": asdict(self.spec) if self.model_dir is None else None,
            "architecture": cfg.architecture, "hidden": cfg.hidden_size, "layers": cfg.num_layers,
            "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "parameters": model.parameter_count(),
            "weight_bytes": model.weight_bytes(), "dtype": self.dtype,
            "kv_bytes_per_token": cfg.kv_bytes_per_token(model.embed_tokens.element_size()),
        }


def parse_knob(raw: str, default: Any, name: str) -> Any:
    """Parse ``raw`` as the type of ``default`` (bool, int, float, str, or a list of ints/floats, where
    "auto" may stand for a micro-batch count that Tier 1 measures)."""
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, tuple)):
            kind = float if any(isinstance(v, float) for v in default) else int
            return [v.strip() if v.strip() == "auto" else kind(v) for v in raw.split(",") if v.strip()]
        return raw
    except ValueError:
        raise click.BadParameter(f"{name}={raw!r}: expected {type(default).__name__} like {default!r}",
                                 param_hint="--set") from None
