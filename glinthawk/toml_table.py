"""One TOML table read key by key, with every error in the file's own terms (file, table, key,
what was expected): the cluster file's reader."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glinthawk.net.netem import parse_bandwidth, parse_size


class ClusterFileError(ValueError):
    """The cluster file cannot be read or does not describe a valid cluster; the message says where and why."""


def _show(value: object) -> str:
    """A value as the TOML file spells it, for error messages."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, (bool, str)):
        return json.dumps(value)
    return str(value)


class Table:
    """One TOML table, read key by key, with errors in the file's own terms (file, table, key, expectation)."""

    def __init__(self, source: Path, where: str, data: dict[str, Any]) -> None:
        self.source, self.where, self.data = source, where, data
        self.known: list[str] = []

    def error(self, message: str, key: str | None = None) -> ClusterFileError:
        at = ".".join(part for part in (self.where, key) if part)
        return ClusterFileError(f"{self.source}: {at}: {message}" if at else f"{self.source}: {message}")

    def finish(self) -> None:
        """Reject every key that no reader asked for: a typo must not silently become a default."""
        unknown = [key for key in self.data if key not in self.known]
        if unknown:
            raise self.error(f"unknown key {json.dumps(unknown[0])}; the keys here are: {', '.join(self.known)}")

    def _take(self, key: str, types: tuple[type, ...], expected: str, required: bool = False) -> Any:
        self.known.append(key)
        if key not in self.data:
            if required:
                raise self.error(f"missing; expected {expected}", key)
            return None
        value = self.data[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise self.error(f"expected {expected}, got {_show(value)}", key)
        return value

    def text(self, key: str, *, required: bool = False, expected: str = "a string",
             check: Callable[[str], object] = bool) -> str | None:
        value = self._take(key, (str,), expected, required)
        if value is not None and not check(value):
            raise self.error(f"expected {expected}, got {_show(value)}", key)
        return value

    def integer(self, key: str, *, required: bool = False, minimum: int, maximum: int | None = None) -> int | None:
        expected = f"an integer from {minimum} to {maximum}" if maximum is not None else f"an integer >= {minimum}"
        value = self._take(key, (int,), expected, required)
        if value is not None and not (minimum <= value and (maximum is None or value <= maximum)):
            raise self.error(f"expected {expected}, got {value}", key)
        return value

    def number(self, key: str, *, minimum: float = 0) -> float | None:
        expected = f"a number >= {minimum:g}"
        value = self._take(key, (int, float), expected)
        if value is not None and not (math.isfinite(value) and value >= minimum):
            raise self.error(f"expected {expected}, got {value}", key)
        return None if value is None else float(value)

    def flag(self, key: str) -> bool | None:
        return self._take(key, (bool,), "true or false")

    def path(self, key: str, base: Path) -> Path | None:
        value = self.text(key, expected="a path")
        return None if value is None else (base / Path(value).expanduser()).resolve()

    def size(self, key: str) -> str | None:
        return self._parsed(key, parse_size, (str, int), "a size > 0 like \"8GiB\", or a number of bytes")

    def bandwidth(self, key: str) -> str | None:
        return self._parsed(key, parse_bandwidth, (str, int, float), "a bandwidth like \"1Gbit\" or \"100MB/s\"")

    def _parsed(self, key: str, parse: Callable[[Any], float], types: tuple[type, ...], expected: str) -> str | None:
        """Checked with the parser the nodes use, and kept as text, which is how the command line takes it."""
        value = self._take(key, types, expected)
        if value is None:
            return None
        try:
            positive = parse(value) > 0
        except ValueError as exc:
            raise self.error(str(exc), key) from None
        if not positive:
            raise self.error(f"expected {expected}, got {_show(value)}", key)
        return str(value)

    def table(self, key: str, *, required: bool = False) -> Table:
        """The sub-table ``[key]``; an empty one when it is optional and absent."""
        value = self._take(key, (dict,), f"a table [{key}]", required)
        return Table(self.source, key, value or {})

    def tables(self, key: str, required: bool = True) -> list[Table]:
        """The array of tables ``[[key]]``: at least one, if ``required``."""
        expected = f"at least one [[{key}]] table"
        value = self._take(key, (list,), expected, required=required)
        if value is None and not required:
            return []
        if not value or not all(isinstance(item, dict) for item in value):
            raise self.error(f"expected {expected}, got {_show(value)}", key)
        return [Table(self.source, f"{key}[{i}]", item) for i, item in enumerate(value)]
