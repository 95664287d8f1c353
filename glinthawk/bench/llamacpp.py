"""llama.cpp's ``llama-batched-bench`` as an optional baseline of the engine suite: a baseline only,
never imported by glinthawk outside the bench and never a dependency. ``scripts/build_llamacpp.sh``
builds it (CPU only) from the llama.cpp sources vendored in the llama-cpp-python sdist.

One point runs the suite's checkpoint, converted to GGUF by llama.cpp's own converter, on the same
batch, prompt length, new tokens, threads and dtype (weights and KV cache) as glinthawk's run:

    llama-batched-bench -m M.gguf -c B*(P+N) -b MAX_BATCH_TOKENS -npp P -ntg N-1 -npl B -t T -tb T
                        -ctk KV -ctv KV [one of the variants of knob llamacpp_args: -fa on; -fa off]

``-ntg N-1``: its prefill computes the logits of each sequence's first new token, as glinthawk's does,
so both runs make N logit rows per sequence in 1 prefill + N-1 decode steps. Its table's ``T s`` is
the prefill plus the decode steps (model load and its 16-token warm-up excluded); ``S t/s`` divides
prompt *and* generated tokens by it, so the whole-run figure compared is B*N / ``T s`` instead.
It samples nothing (glinthawk samples greedily) and feeds random token ids.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

ENV_DIR = "GLINTHAWK_LLAMACPP_DIR"  # where scripts/build_llamacpp.sh builds (default ~/.cache/glinthawk/llama.cpp)
BINARY = "llama-batched-bench"
CONVERTER = "convert_hf_to_gguf.py"
# GGUF weight and KV-cache types for the suite's dtype: the same width as glinthawk's weights and cache.
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}
COLUMNS = ("pp", "tg", "b", "n_kv", "t_pp", "s_pp", "t_tg", "s_tg", "t", "s")  # its table, left to right
RUN_TIMEOUT_S = 3600


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "glinthawk" / "llama.cpp")


def find_binary(setting: str) -> Path | None:
    """The ``llama-batched-bench`` that knob ``llamacpp`` names: ``off`` none, ``auto`` the build
    script's (None if not built), else a path, which must exist."""
    if setting == "off":
        return None
    if setting != "auto":
        path = Path(setting).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise click.ClickException(f"--set llamacpp={setting}: no executable there; give the path of "
                                       f"{BINARY} (scripts/build_llamacpp.sh builds one) or auto/off")
        return path
    path = cache_dir() / "build" / "bin" / BINARY
    return path if path.is_file() and os.access(path, os.X_OK) else None


def skip_message() -> str:
    return (f"  llama.cpp baseline skipped: no {BINARY} in {cache_dir() / 'build' / 'bin'}; build it with "
            f"scripts/build_llamacpp.sh (or --set llamacpp=PATH)")


def source_dir(binary: Path) -> Path | None:
    """llama.cpp's sources (its converter and gguf-py) for ``binary``: the build script's layout
    (DIR/build/bin, DIR/llama.cpp), or a build folder inside the sources (llama.cpp/build/bin)."""
    root = binary.resolve().parents[2]
    for candidate in (root / "llama.cpp", root):
        if (candidate / CONVERTER).is_file() and (candidate / "gguf-py").is_dir():
            return candidate
    return None


def gguf_path(checkpoint: Path, dtype: str) -> Path:
    """Where the GGUF of ``checkpoint`` in ``dtype`` is cached: named by the checkpoint's files, so a
    rebuilt checkpoint gets a new conversion."""
    files = sorted(p for p in checkpoint.iterdir() if p.suffix in (".json", ".safetensors"))
    digest = hashlib.sha256(str(checkpoint.resolve()).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "gguf" / f"{checkpoint.name}-{digest.hexdigest()[:12]}-{GGUF_TYPES[dtype]}.gguf"


def convert(source: Path, checkpoint: Path, dtype: str) -> Path:
    """``checkpoint`` as a GGUF of the dtype's type, converted once and cached (``gguf_path``)."""
    out = gguf_path(checkpoint, dtype)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.part")
    script = Path(__file__).with_name("llamacpp_convert.py")
    done = subprocess.run([sys.executable, str(script), str(source), str(checkpoint), str(partial), GGUF_TYPES[dtype]],
                          check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"converting {checkpoint} to GGUF failed: {_last_line(done.stderr)}")
    partial.rename(out)  # whole or absent: an interrupted conversion is never taken for a finished one
    return out


def parse(output: str) -> tuple[dict[str, int], list[dict[str, float]]]:
    """``llama-batched-bench``'s settings line (``n_kv_max = 2048, n_batch = ...``) and its table rows,
    keyed by ``COLUMNS``."""
    settings = {key: int(value) for key, value in re.findall(r"\b(n_\w+|flash_attn|is_\w+) = (-?\d+)", output)}
    rows = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) and all(_is_number(cell) for cell in cells):
            rows.append(dict(zip(COLUMNS, (float(cell) for cell in cells))))
    return settings, rows


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


@dataclass(frozen=True)
class Baseline:
    """``llama-batched-bench`` on one GGUF, with the suite's dtype, threads and batch-token budget."""

    binary: Path
    gguf: Path
    dtype: str
    threads: int
    max_batch_tokens: int
    # Knob llamacpp_args: option sets tried one after another, the fastest kept. Its best flash-attention
    # setting depends on the cache type and the CPU (figures in docs/PERFORMANCE.md).
    variants: tuple[tuple[str, ...], ...] = ((),)

    def command(self, batch: int, prompt: int, new_tokens: int, extra: tuple[str, ...] = ()) -> list[str]:
        kv = GGUF_TYPES[self.dtype]
        return [str(self.binary), "-m", str(self.gguf), "-c", str(batch * (prompt + new_tokens)),
                "-b", str(self.max_batch_tokens), "-npp", str(prompt), "-ntg", str(new_tokens - 1),
                "-npl", str(batch), "-t", str(self.threads), "-tb", str(self.threads), "-ctk", kv, "-ctv", kv, *extra]

    def measure(self, batch: int, prompt: int, new_tokens: int) -> dict:
        """A run per variant; the row fields ``llamacpp_*`` of the fastest (see the module's docstring for
        what each counts) and every variant's in ``llamacpp_variants``, or ``llamacpp_error`` where none
        ran (the suite's own figures stand without it)."""
        runs = [self.run_once(batch, prompt, new_tokens, extra) for extra in self.variants]
        done = [run for run in runs if "llamacpp_error" not in run]
        if not done:
            return runs[0]
        best = max(done, key=lambda run: run["llamacpp_tok_s"] or 0.0)
        keep = ("llamacpp_args", "llamacpp_tok_s", "llamacpp_decode_tok_s", "llamacpp_seconds", "llamacpp_error")
        return {**best, "llamacpp_variants": [{k: run[k] for k in keep if k in run} for run in runs]}

    def run_once(self, batch: int, prompt: int, new_tokens: int, extra: tuple[str, ...] = ()) -> dict:
        command = self.command(batch, prompt, new_tokens, extra)
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"llamacpp_args": " ".join(extra), "llamacpp_error": f"{BINARY} ran over {RUN_TIMEOUT_S} s"}
        settings, rows = parse(done.stdout)  # the table goes to stdout, warnings and errors to stderr
        if done.returncode != 0 or len(rows) != 1:
            return {"llamacpp_args": " ".join(extra),
                    "llamacpp_error": f"{BINARY} exited {done.returncode} with {len(rows)} result rows: "
                                      f"{_last_line(done.stderr or done.stdout)}"}
        row = rows[0]
        return {
            "llamacpp_args": " ".join(extra), "llamacpp_seconds": row["t"], "llamacpp_prefill_seconds": row["t_pp"],
            "llamacpp_tok_s": batch * new_tokens / row["t"] if row["t"] > 0 else None,
            "llamacpp_decode_tok_s": row["s_tg"], "llamacpp_reported_tok_s": row["s"],
            "llamacpp_settings": settings, "llamacpp_command": " ".join(command),
        }


def variants(setting: str) -> tuple[tuple[str, ...], ...]:
    """Knob ``llamacpp_args``: option sets separated by ``;`` (``"-fa on;-fa off"``); "" is one run of
    llama.cpp's defaults."""
    return tuple(tuple(shlex.split(part)) for part in setting.split(";"))


def prepare(setting: str, checkpoint: Path, dtype: str, device: str, threads: int, max_batch_tokens: int,
            echo: Callable[[str], None], args: str = "") -> Baseline | None:
    """The baseline for this suite run, or None after one line saying why not (knob ``llamacpp``)."""
    binary = find_binary(setting)
    if binary is None:
        if setting == "auto":
            echo(skip_message())
        return None
    if device != "cpu":
        echo(f"  llama.cpp baseline skipped: its build is CPU-only; run without --device {device} to compare")
        return None
    source = source_dir(binary)
    if source is None:
        echo(f"  llama.cpp baseline skipped: no {CONVERTER} and gguf-py near {binary}; "
             "build with scripts/build_llamacpp.sh, which keeps them beside the binary")
        return None
    started = time.perf_counter()
    try:
        gguf = convert(source, checkpoint, dtype)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        echo(f"  llama.cpp baseline skipped: {exc}")
        return None
    if time.perf_counter() - started > 1:
        echo(f"  converted the checkpoint to {gguf} in {time.perf_counter() - started:.0f} s")
    return Baseline(binary, gguf, dtype, threads, max_batch_tokens, variants(args))
