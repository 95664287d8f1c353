"""Structured output as a request asks for it: OpenAI's ``response_format`` and vLLM's
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``structured_outputs``.

Only the request's fields are read here (no grammar library): a wrong shape is the line's
error at parse time; compiling the grammar (``grammar.py``) happens at admission, where a
schema the library rejects is, again, that line's error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Fields a request line (plain, or an OpenAI body) may carry to constrain its output.
FIELDS = frozenset({"response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs"})
_STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "json_object")
# A grammar's source text, bounded apart from the line's 16 MiB: a schema is compiled per request.
MAX_SOURCE_CHARS = 1 << 20
_ANY_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class Constraint:
    """What the output must match: ``kind`` "json" (``source``: a JSON schema's text) or
    "regex" (``source``: the pattern, anchored at both ends)."""

    kind: str
    source: str

    def describe(self) -> str:
        return "JSON schema" if self.kind == "json" else "regex"


def from_fields(fields: dict[str, Any]) -> Constraint | None:
    """The constraint a line's fields ask for, or None; ValueError (the line's error) for a bad shape."""
    given = [name for name in sorted(FIELDS) if fields.get(name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give at most one of {', '.join(given)} (each constrains the output alone)")
    name = given[0]
    value = fields[name]
    if name == "response_format":
        constraint = _response_format(value)
    elif name == "structured_outputs":
        constraint = _structured_outputs(value)
    else:
        constraint = _guided(name, value)
    if constraint is not None and len(constraint.source) > MAX_SOURCE_CHARS:
        raise ValueError(f"'{name}' is {len(constraint.source)} characters; at most {MAX_SOURCE_CHARS} are taken")
    return constraint


def _response_format(value: Any) -> Constraint | None:
    """OpenAI's ``{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}``."""
    if not isinstance(value, dict):
        raise ValueError(f"'response_format' must be an object such as {{\"type\": \"json_object\"}}, "
                         f"got {type(value).__name__}")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise ValueError(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}")
    unknown = sorted(set(value) - allowed[kind])
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in 'response_format' of type {kind}")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json", _ANY_OBJECT)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("'response_format.json_schema' must be an object with a 'schema' (and a 'name')")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in 'response_format.json_schema'")
    if "name" in spec and not isinstance(spec["name"], str):
        raise ValueError("'response_format.json_schema.name' must be a string")
    return _schema(spec.get("schema"), "response_format.json_schema.schema")


def _structured_outputs(value: Any) -> Constraint | None:
    """vLLM's ``{"json": schema, "regex": str, "choice": [str], "json_object": true}`` (one of them)."""
    if not isinstance(value, dict):
        raise ValueError(f"'structured_outputs' must be an object such as {{\"regex\": \"[0-9]+\"}}, "
                         f"got {type(value).__name__}")
    unknown = sorted(set(value) - set(_STRUCTURED_OUTPUTS_KEYS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} in 'structured_outputs'; "
                         f"supported: {', '.join(_STRUCTURED_OUTPUTS_KEYS)}")
    given = [k for k in _STRUCTURED_OUTPUTS_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise ValueError("'structured_outputs' must give exactly one of " + ", ".join(_STRUCTURED_OUTPUTS_KEYS))
    key = given[0]
    if key == "json_object":
        if value[key] is not True:
            raise ValueError("'structured_outputs.json_object' must be true")
        return Constraint("json", _ANY_OBJECT)
    return _guided({"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice"}[key], value[key],
                   f"structured_outputs.{key}")


def _guided(name: str, value: Any, where: str | None = None) -> Constraint:
    where = where or name
    if name == "guided_json":
        if isinstance(value, str):  # vLLM takes the schema as an object or as its JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"'{where}' is a string but not JSON ({exc.msg} at column {exc.colno})") from None
        return _schema(value, where)
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise ValueError(f"'{where}' must be a non-empty string (a regular expression)")
        return Constraint("regex", value)
    if not isinstance(value, list) or not value or any(not isinstance(c, str) or not c for c in value):
        raise ValueError(f"'{where}' must be a non-empty list of non-empty strings")
    return Constraint("regex", "|".join(_escape(choice) for choice in value))


def _schema(value: Any, where: str) -> Constraint:
    if isinstance(value, bool):  # JSON Schema allows true (anything) and false (nothing)
        raise ValueError(f"'{where}' must be a JSON schema object, got {json.dumps(value)}")
    if not isinstance(value, dict):
        raise ValueError(f"'{where}' must be a JSON schema object, got {type(value).__name__}")
    return Constraint("json", json.dumps(value, ensure_ascii=False))


_REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~")


def _escape(text: str) -> str:
    """``text`` as a literal in the grammar library's (Rust) regex syntax."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)
