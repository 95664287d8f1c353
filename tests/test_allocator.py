"""glibc malloc tuning: applied on glibc Linux, left alone where the user set glibc's own variables."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest

from glinthawk import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="needs glibc")
def test_applies_on_glibc():
    assert allocator.tune_malloc() is True


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *args: calls.append(args))
    assert allocator.tune_malloc() is False and calls == []


@pytest.mark.skipif(not GLIBC, reason="needs glibc")
def test_large_blocks_come_from_the_heap_after_tuning():
    """A 4 MiB block (above glibc's default threshold, below ours) is served from the heap,
    which mallinfo2 counts in ``uordblks``; untuned, it would be an mmap (``hblkhd``)."""
    script = """
import ctypes, sys
from glinthawk.allocator import tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    assert tune_malloc()
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2()
block = libc.malloc(4 << 20)
after = libc.mallinfo2()
print("heap" if after.uordblks - before.uordblks >= 4 << 20 else "mmap" if after.hblkhd > before.hblkhd else "?")
"""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    where = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                                  env=env).stdout.strip() for mode in ("plain", "tuned")}
    assert where == {"plain": "mmap", "tuned": "heap"}
