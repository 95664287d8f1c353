"""What ``glinthawk plan`` reads from files: a machine kind's figures from ``glinthawk bench limits``
output, and the prompt/output lengths of a requests file (the JSONL that ``glinthawk run`` takes).

Every problem is a ``PlanInputError`` whose message names the file, what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glinthawk.requests import Request

CHARS_PER_TOKEN = 4  # without a tokenizer: the usual rule of thumb for English text with BPE vocabularies
LIMITS_HINT = "give the limits.json that `glinthawk bench limits --out DIR` writes on a machine of that kind"


class PlanInputError(ValueError):
    """A file given to ``glinthawk plan`` cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    flops: float | None  # peak FLOP/s in the dtype asked for (None: the file did not measure it)
    bandwidth: float  # read, bytes/s
    memory: int | None  # the machine's RAM, bytes (None: not recorded)
    measured: list[str]  # the dtypes it has a matmul peak for


def read_limits(path: Path, dtype: str) -> Limits:
    """The figures of a ``bench limits`` result file, the matmul peak in ``dtype``."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanInputError(f"cannot read {path}: {exc.strerror}; {LIMITS_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanInputError(f"{path} is not JSON ({exc}); {LIMITS_HINT}") from None
    summary = result.get("summary") if isinstance(result, dict) else None
    if not isinstance(summary, dict) or result.get("suite") != "limits" or not _number(summary.get("read_bandwidth")):
        raise PlanInputError(f"{path} is not a `glinthawk bench limits` result (no suite 'limits' with a "
                             f"read_bandwidth); {LIMITS_HINT}")
    measured = sorted(key.removeprefix("matmul_peak_") for key, value in summary.items()
                      if key.startswith("matmul_peak_") and not key.endswith("_to_float32") and _number(value))
    machine = result.get("machine") if isinstance(result.get("machine"), dict) else {}
    memory = machine.get("ram_bytes")
    return Limits(flops=summary.get(f"matmul_peak_{dtype}") if dtype in measured else None,
                  bandwidth=summary["read_bandwidth"], memory=int(memory) if _number(memory) else None,
                  measured=measured)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Lengths:
    """The tokens of each request of a file: its prompt, and the most it may generate (max_tokens)."""

    prompts: list[int]
    outputs: list[int]
    skipped: int  # lines that are not requests (each would be an error line in a run)
    estimated: bool  # prompts counted as characters / CHARS_PER_TOKEN (no tokenizer at hand)

    @property
    def requests(self) -> int:
        return len(self.prompts)


def read_lengths(path: Path, model_dir: Path) -> Lengths:
    """Prompt and output lengths of every request in ``path``, tokenized with the model's tokenizer
    where ``model_dir`` has one; counted from the characters otherwise."""
    from glinthawk.requests import RequestError, parse_stream

    count, estimated = _counter(model_dir)
    prompts, outputs, skipped = [], [], 0
    try:
        with open(path, "rb") as stream:
            for request in parse_stream(stream):
                try:
                    if isinstance(request, RequestError):
                        raise request
                    tokens = count(request)
                except ValueError:  # a line a run would answer with an error (a chat template that fails too)
                    skipped += 1
                    continue
                prompts.append(max(1, tokens))
                outputs.append(max(1, request.params.max_tokens))
    except OSError as exc:
        raise PlanInputError(f"cannot read {path}: {exc.strerror}; give the requests file (JSONL) to plan for") \
            from None
    if not prompts:
        raise PlanInputError(f"{path} holds no request ({skipped} line(s) that are not one): give a JSONL file "
                             "with a 'prompt' or 'messages' on each line, as `glinthawk run` takes")
    return Lengths(prompts, outputs, skipped, estimated)


def _counter(model_dir: Path) -> tuple[Callable[[Request], int], bool]:
    """A request's prompt tokens, and whether they are estimated: the tokenizer's count where the
    checkpoint has one."""
    tokenizer = None
    if (model_dir / "tokenizer.json").is_file():
        from glinthawk.tokenizer import Tokenizer, TokenizerError

        try:
            tokenizer = Tokenizer(model_dir)
        except TokenizerError:
            tokenizer = None

    def exact(request: Request) -> int:
        if isinstance(request.prompt, list):
            return len(request.prompt)
        if request.is_chat:
            return len(tokenizer.encode_chat(request.messages))
        return len(tokenizer.encode(request.prompt))

    def estimate(request: Request) -> int:
        if isinstance(request.prompt, list):
            return len(request.prompt)
        text = request.prompt if not request.is_chat else "".join(str(m.get("content", "")) for m in request.messages)
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    return (exact, False) if tokenizer is not None else (estimate, True)


def percentile(values: list[int], share: float) -> int:
    """The smallest value that ``share`` of ``values`` do not exceed (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]
