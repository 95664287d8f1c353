"""Output side of a batch run: one JSON line per result, written as it arrives, and a progress bar."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from glinthawk.results import completion_tokens, is_error


STDOUT = "-"  # as an output path: standard output
# Without a terminal (a log file, CI) the progress bar gives way to a plain line at most this often.
PROGRESS_EVERY_S = 10.0


class OutputError(Exception):
    """The results file cannot be held or written; the message is one line for the user."""


class Output:
    """A results file held for one run.

    It is opened for appending, so every write lands at the file's current end, even after
    someone else cut the file: never past a hole of NUL bytes. A regular file is locked
    (flock, exclusive) until closed, so a second glinthawk process on this machine cannot
    write it, empty it or cut it under us. Opening changes nothing in the file; ``start``
    does (it empties the file unless resuming). A file that opening created and that was
    never started is removed on close, so a run that never started leaves no trace.
    ``-`` is standard output: written as it is, never locked, emptied or removed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) == STDOUT:
            self._fd = os.dup(sys.stdout.fileno())
            self._regular = self._remove_on_close = False
            return
        created = not self.path.exists()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise OutputError(f"cannot write output file {self.path}: {exc.strerror}") from None
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._remove_on_close = created and self._regular
        if self._regular:
            self._lock()

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return  # a file system without locks (some network mounts): run unlocked, as before
            os.close(self._fd)
            raise OutputError(f"{self.path}: another glinthawk process is writing it; wait for it to finish "
                              "or choose another -o") from None

    def start(self, append: bool) -> None:
        """Begin writing: keep what the file holds (``append``) or empty it."""
        self._remove_on_close = False
        if not append and self._regular:  # a device or pipe (/dev/stdout) has nothing to empty
            os.ftruncate(self._fd, 0)

    def write(self, data: bytes) -> None:
        """Write all of ``data``; an OSError (a full disk) leaves at most a cut-off last line."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._remove_on_close:  # still ours (locked): nobody else wrote it
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_output(path: str | Path) -> None:
    """Fail early (before a model loads or a cluster starts) if ``path`` cannot be written or another
    glinthawk process writes it; leaves the file as it was, and none behind if there was none."""
    Output(path).close()


class ResultWriter:
    """Writes result lines, each in one write as it arrives, and keeps the counts the progress bar shows.

    ``output`` is a path (opened and locked here) or an Output the caller holds; either way the
    writer starts it (emptying the file unless ``append``) and closes it.
    """

    def __init__(self, output: str | Path | Output, total: int | None = None, progress: bool | None = None,
                 append: bool = False):
        self._output = output if isinstance(output, Output) else Output(output)
        try:
            self._output.start(append)
        except OSError as exc:
            self._output.close()
            raise OutputError(f"cannot write output file {self._output.path}: {exc.strerror}") from None
        show = sys.stderr.isatty() if progress is None else progress
        self._bar = tqdm(total=total, unit="req", disable=not show, dynamic_ncols=True)
        self._total = total
        self._lines = progress is None and not show  # a long run still says how far it got
        self.done = self.failed = self.generated_tokens = 0
        self._started = self._reported = time.monotonic()

    def write(self, line: dict[str, Any]) -> None:
        try:
            self._output.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
        except OSError as exc:
            raise OutputError(f"cannot write output file {self._output.path}: {exc.strerror}; "
                              f"{self.done + self.failed} results were written") from None
        if is_error(line):
            self.failed += 1
        else:
            self.done += 1
            self.generated_tokens += completion_tokens(line)
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-9)
        self._bar.set_postfix(failed=self.failed, gen_tok_s=f"{self.generated_tokens / elapsed:.1f}", refresh=False)
        self._bar.update(1)
        if self._lines and now - self._reported >= PROGRESS_EVERY_S:
            self._reported = now
            print(progress_line(self.done + self.failed, self._total, self.failed, self.generated_tokens, elapsed),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self._bar.close()
        self._output.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_line(written: int, total: int | None, failed: int, tokens: int, elapsed_s: float) -> str:
    """One progress line: results so far (of how many), failures, generated tok/s and, with a total, the ETA."""
    done = f"{written}/{total}" if total else f"{written}"
    line = f"progress: {done} results, {failed} failed, {tokens / elapsed_s:.1f} tok/s generated"
    if total and written:
        line += f", ETA {_duration(elapsed_s * max(total - written, 0) / written)}"
    return line


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


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
