"""The prompts and results files of the ``glinthawk`` commands (generate, run, submit):
which file, whether it can be read or written, stdin and stdout as '-'."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

OUTPUT_HELP = "Results JSONL ('-' for stdout)."


def pick_input(input_path: str | None, legacy_input: str | None) -> str:
    """The prompts file of ``generate``: the argument, as for run and submit, or the deprecated ``-i``.
    Without either it reads a piped stdin, but refuses a terminal rather than wait there in silence."""
    if input_path is not None and legacy_input is not None:
        raise click.UsageError("give the prompts file once: as an argument (-i is its old spelling)")
    if legacy_input is not None:
        click.echo("glinthawk: -i/--input is deprecated; give the prompts file as an argument", err=True)
        return legacy_input
    if input_path is None and sys.stdin.isatty():
        raise click.UsageError("no prompts file: give one (PROMPTS.jsonl), or '-' and pipe it to stdin")
    return input_path or "-"


def check_output(path: str) -> None:
    """Fail before anything loads or starts when the results file cannot be opened (say, its directory is
    missing) or another glinthawk process writes it. A file to --resume is left as it is, and none is left behind.
    """
    from glinthawk.outputs import OutputError, probe_output

    try:
        probe_output(path)
    except OutputError as exc:
        raise click.ClickException(str(exc)) from None


def open_input(path: str) -> BinaryIO:
    """The prompts file of ``generate`` opened for reading ('-': stdin)."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise click.ClickException(f"cannot read input file {path}: {exc.strerror}") from None


def where(output_path: str) -> str:
    """How a summary line names the results file."""
    return "stdout" if output_path == "-" else output_path


def check_resume(output_path: str, resume: bool, input_path: str | None = None) -> None:
    if resume and output_path == "-":
        raise click.UsageError("--resume reads back the results file; give -o a file, not '-'")
    if resume and input_path == "-":
        raise click.UsageError("--resume finds a run by its prompts file; give the file, not '-'")


@contextlib.contextmanager
def input_file(input_path: str) -> Iterator[str]:
    """The prompts file of ``run`` and ``submit``, '-' being stdin (as for ``generate``). Stdin is copied to
    a temporary file first, removed afterwards: the client sends the file from the event loop that also
    takes the results, where a read blocked on a slow pipe would stall both; the copy also gives the progress
    bar its total. On a terminal '-' is refused rather than waiting there in silence."""
    if input_path != "-":
        yield input_path
        return
    if sys.stdin.isatty():
        raise click.UsageError("'-' reads the prompts from stdin: pipe them in, or give the file")
    with tempfile.TemporaryDirectory(prefix="glinthawk-stdin-") as directory:
        copy = Path(directory) / "stdin.jsonl"
        with open(copy, "wb") as out:
            shutil.copyfileobj(sys.stdin.buffer, out)
        yield str(copy)
