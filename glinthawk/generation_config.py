"""A checkpoint's ``generation_config.json``: its EOS ids and its sampling defaults.

Model authors put the sampling settings their model is meant to run with there (Qwen3:
temperature 0.6, top_k 20, top_p 0.95; Llama 3: temperature 0.6, top_p 0.9). A request
that leaves such a field out gets the checkpoint's value, as vLLM does with
``--generation-config auto`` (its default); a field the request gives always wins, and
null counts as left out. The fields, and what they set:

- ``temperature``, ``top_p``, ``top_k``, ``min_p``: the request fields of the same name;
- ``max_new_tokens``: ``max_tokens``, capped at the room the prompt leaves in the context
  (vLLM caps it the same way), so a large default never fails a request.

Not applied: ``repetition_penalty`` (glinthawk has none; a value other than 1 is logged),
``do_sample`` (vLLM ignores it too: the sampling fields decide, and temperature 0 is
greedy) and ``max_length``. Without the file, or without these fields in it, requests
keep glinthawk's own defaults (temperature 1, max_tokens 16, no filters).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from glinthawk.compute.sampling import SamplingParams

log = logging.getLogger("glinthawk.generation_config")

FILE_NAME = "generation_config.json"
# generation_config.json field -> the request (SamplingParams) field it is the default of.
DEFAULTED_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "max_new_tokens": "max_tokens"}


class GenerationConfigError(ValueError):
    """generation_config.json is not valid JSON, or one of its defaults could never run."""


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: frozenset[int] = frozenset()
    # SamplingParams field -> the checkpoint's value, for the fields a request may leave out.
    sampling_defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_directory(cls, directory: str | Path) -> GenerationConfig:
        """The checkpoint's generation config; an empty one where the file is absent."""
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise GenerationConfigError(f"{path}: not a valid generation config ({exc})") from None
        if not isinstance(raw, dict):
            raise GenerationConfigError(f"{path}: not a valid generation config (expected a JSON object)")
        return cls(_eos_ids(raw.get("eos_token_id")), MappingProxyType(_sampling_defaults(raw, path)))

    def apply(self, params: SamplingParams, unset: frozenset[str], room: int) -> SamplingParams:
        """``params`` with each field in ``unset`` (those the request left out) set to the
        checkpoint's default; a default max_tokens capped at ``room`` (context minus prompt)."""
        values = {name: value for name, value in self.sampling_defaults.items() if name in unset}
        if "max_tokens" in values:
            values["max_tokens"] = max(1, min(values["max_tokens"], room))
        return dataclasses.replace(params, **values) if values else params


def _eos_ids(value: Any) -> frozenset[int]:
    values = value if isinstance(value, list) else [value]
    return frozenset(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def _sampling_defaults(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The defaults the file sets, each checked as a request's value would be."""
    defaults = {name: raw[key] for key, name in DEFAULTED_FIELDS.items() if raw.get(key) is not None}
    for name, value in defaults.items():
        try:
            SamplingParams(**{name: value})
        except ValueError as exc:
            key = next(k for k, n in DEFAULTED_FIELDS.items() if n == name)
            raise GenerationConfigError(f"{path}: '{key}' cannot be a default ({exc})") from None
    penalty = raw.get("repetition_penalty")
    if penalty is not None and penalty != 1:
        log.warning("%s: repetition_penalty %s is not applied (glinthawk has no repetition penalty)", path, penalty)
    return defaults
