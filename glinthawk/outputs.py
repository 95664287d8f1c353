"""Output side of a batch run: one JSON line per result, flushed as it arrives, and a progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from glinthawk.requests import is_error


class ResultWriter:
    """Writes result lines, flushing each, and keeps the counts the progress bar shows."""

    def __init__(self, path: str | Path, total: int | None = None, progress: bool | None = None, append: bool = False):
        self._file: TextIO = open(path, "a" if append else "w", encoding="utf-8")
        show = sys.stderr.isatty() if progress is None else progress
        self._bar = tqdm(total=total, unit="req", disable=not show, dynamic_ncols=True)
        self.done = self.failed = self.generated_tokens = 0
        self._started = time.monotonic()

    def write(self, line: dict[str, Any]) -> None:
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()
        if is_error(line):
            self.failed += 1
        else:
            self.done += 1
            self.generated_tokens += _completion_tokens(line)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._bar.set_postfix(failed=self.failed, gen_tok_s=f"{self.generated_tokens / elapsed:.1f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _completion_tokens(line: dict[str, Any]) -> int:
    if "completion_tokens" in line:
        return int(line["completion_tokens"])
    return int(line.get("response", {}).get("body", {}).get("usage", {}).get("completion_tokens", 0))


def count_lines(path: str | Path) -> int | None:
    """Number of lines (for the progress bar's total), read in bounded chunks; None when not a regular file."""
    path = Path(path)
    if not path.is_file():
        return None
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")
