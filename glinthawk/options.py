"""Command-line options both CLIs (``glinthawk`` and ``glinthawk-node``) share, and the
checks behind them: a settings object's fields as options, the model, the secret, an
address, the emulated network.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import click

from glinthawk import DEFAULT_MODEL
from glinthawk.net.auth import SECRET_ENV, SecretError, load_secret
from glinthawk.net.netem import NetEm, parse_bandwidth
from glinthawk.compute.config import DTYPE_NAMES
from glinthawk.settings import NetemSettings, flag_of

DTYPE_CHOICES = ["auto", *DTYPE_NAMES]


def setting_options(cls: type, *, names: tuple[str, ...] | None = None, role: str | None = None):
    """click options for the fields of the settings dataclass ``cls`` (all, or ``names``),
    with the field's default, least value and help; ``role`` prefixes the help ("tier1: ...")."""
    hints = typing.get_type_hints(cls)

    def decorate(f):
        for item in reversed(dataclasses.fields(cls)):
            if names is not None and item.name not in names:
                continue
            meta = item.metadata
            flag = flag_of(item)
            kind = typing.get_args(hints[item.name])[0] if typing.get_args(hints[item.name]) else hints[item.name]
            if meta.get("choices"):
                kind = click.Choice(meta["choices"])
            elif kind is int:
                kind = click.IntRange(min=meta.get("minimum"))
            elif kind is float:
                kind = click.FloatRange(min=meta.get("minimum"))
            text = f"{role}: {meta['help']}" if role else meta["help"]
            if kind is bool:  # a switch: --name / --no-name
                f = click.option(f"{flag}/--no-{flag[2:]}", item.name, default=item.default, show_default=True,
                                 help=text)(f)
                continue
            f = click.option(flag, item.name, type=kind, default=item.default,
                             show_default=item.default is not None, help=text)(f)
        return f

    return decorate


def model_option(f):
    return click.option(
        "--model", "model_dir", type=click.Path(path_type=Path), default=DEFAULT_MODEL, show_default="bundled model",
        help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).",
    )(f)


def dtype_option(f):
    return click.option(
        "--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
        help="auto: bfloat16 on CUDA (a float16 checkpoint keeps float16) and on CPUs that multiply bf16 natively "
             "(AVX-512 BF16, AMX); float32 on other CPUs.",
    )(f)


def device_option(f):
    return click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(f)


def load_checkpoint(model_dir: Path, dtype: str, device: str, layers: range | None = None):
    """Model (or the pipeline stage of its ``layers``) + tokenizer, with every loading problem
    turned into a clean CLI error."""
    from glinthawk.compute.config import ModelConfigError
    from glinthawk.compute.loader import CheckpointError, load_model
    from glinthawk.tokenizer import Tokenizer, TokenizerError

    try:
        model = load_model(model_dir, dtype=dtype, device=device, layers=layers)
        tokenizer = Tokenizer(model_dir, extra_eos_ids=model.config.eos_token_ids)
    except (CheckpointError, ModelConfigError, TokenizerError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    return model, tokenizer


def parse_address(value: str, param: str = "--listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint=param)
    return host or "127.0.0.1", int(port)


def secret_option(f):
    return click.option(
        "--secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help=f"Shared secret for the HMAC handshake (default: ${SECRET_ENV} if set).",
    )(f)


def read_secret(secret_file: Path | None) -> bytes | None:
    try:
        return load_secret(secret_file)
    except SecretError as exc:
        raise click.BadParameter(str(exc), param_hint="--secret-file") from None


def netem_from(settings: NetemSettings) -> NetEm | None:
    try:
        netem = NetEm(settings.delay_ms, settings.jitter_ms,
                      parse_bandwidth(settings.bandwidth) if settings.bandwidth else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--inject-*") from None
    return netem if netem.active else None
