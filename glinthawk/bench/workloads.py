"""The requests the suites run (token-id prompts, greedy, ``ignore_eos``: every request
generates exactly ``max_tokens``), their files, and the check that every one succeeded."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import click

from glinthawk.bench.checkpoint import FIRST_PLAIN_ID


def token_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_PLAIN_ID, vocab) for _ in range(length)] for _ in range(count)]


def request_lines(prompts: list[list[int]], max_tokens: int, prefix: str = "r") -> list[dict]:
    return [{"custom_id": f"{prefix}{i}", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True} for i, prompt in enumerate(prompts)]


def write_jsonl(path: Path, lines: Iterable[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def parse_requests(lines: list[dict]):
    from glinthawk.requests import parse_line

    return [parse_line(i + 1, json.dumps(line).encode()) for i, line in enumerate(lines)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def check_results(lines: list[dict], expected_tokens: int) -> int:
    """Fail loudly if any request errored or generated a different number of tokens."""
    from glinthawk.results import is_error

    errors = [line for line in lines if is_error(line)]
    if errors:
        raise click.ClickException(f"{len(errors)} benchmark requests failed, e.g. {errors[0]}")
    generated = sum(int(line.get("completion_tokens", 0)) for line in lines)
    if generated != expected_tokens:
        raise click.ClickException(f"expected {expected_tokens} generated tokens, got {generated}")
    return generated
