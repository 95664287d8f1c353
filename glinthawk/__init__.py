"""Glinthawk: two-tier offline LLM inference.

The Python API (``LLM``, ``SamplingParams``, ...) is loaded on first use, so that the command line's
``--help`` and every node process import no more than they need (the API pulls in torch and the local
cluster supervisor).
"""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"

_LAZY = {
    "LLM": "glinthawk.api",
    "CompletionOutput": "glinthawk.api",
    "GenerationError": "glinthawk.api",
    "RequestOutput": "glinthawk.api",
    "SamplingParams": "glinthawk.compute.sampling",
}

__all__ = ["DEFAULT_MODEL", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'glinthawk' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
