"""glibc malloc settings for a process that allocates the same large activations every layer.

Each layer allocates and frees the same few activation sizes, 0.25 to 32 MiB from batch 64
to 2048 tokens. glibc serves a block above its mmap threshold with a fresh mapping, which
page-faults on first touch; the default threshold starts at 128 KiB and moves with what is
freed, so some of these blocks fault on every layer. With a fixed 32 MiB threshold they
come from the heap and are reused warm. The heap's top goes back to the OS once more than
128 MiB of it is free, so resident memory stays bounded. What it gains and costs:
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed on 64-bit
TRIM_THRESHOLD_BYTES = 128 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Apply the settings above; True if glibc took them. No-op where the C library is not
    glibc, and where the user set glibc's own MALLOC_* variables."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(mmap_set and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
