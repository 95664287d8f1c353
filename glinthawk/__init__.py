"""Glinthawk: two-tier offline LLM inference."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "default"

from glinthawk.api import LLM, CompletionOutput, GenerationError, RequestOutput  # noqa: E402  (api imports DEFAULT_MODEL)
from glinthawk.compute.sampling import SamplingParams  # noqa: E402

__all__ = ["DEFAULT_MODEL", "LLM", "CompletionOutput", "GenerationError", "RequestOutput", "SamplingParams"]
