"""Glinthawk: two-tier offline LLM inference."""

from pathlib import Path

from glinthawk.omp import shorten_spin_wait

shorten_spin_wait()  # before anything below imports torch

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"

from glinthawk.api import LLM, CompletionOutput, GenerationError, RequestOutput  # noqa: E402
from glinthawk.compute.sampling import SamplingParams  # noqa: E402

__all__ = ["DEFAULT_MODEL", "LLM", "CompletionOutput", "GenerationError", "RequestOutput", "SamplingParams"]
