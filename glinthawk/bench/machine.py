"""Facts about the machine and the software a benchmark ran on, recorded with every result."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from glinthawk.compute import matmul, unbuilt_kernels
from glinthawk.compute.loader import cpu_info
from glinthawk.threads import THREAD_VARIABLES


def machine_facts() -> dict[str, Any]:
    cpu_model, flags = cpu_info()
    mem_total = _meminfo("MemTotal")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_features": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "thread_environment": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "ram_bytes": mem_total,
        "ram_available_bytes": _meminfo("MemAvailable"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "c_kernels_unbuilt": list(unbuilt_kernels()),  # non-empty: attention and sampling ran on torch's slower paths
        "float32_cpu_matmul": "glinthawk _matmul" if matmul.PANELS else "oneDNN",
        "cuda": torch.cuda.is_available(),
        "gpu_model": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "numpy", "transformers", "glinthawk", "matplotlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["torch"] = torch.__version__
    try:
        repo = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a live process (VmRSS), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
