"""docs/CLI.md must be what scripts/gen_cli_docs.py renders from the commands' current --help."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_cli_docs.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    gen = _generator()
    assert gen.DOC.is_file() and gen.DOC.read_text() == gen.render(), (
        f"docs/CLI.md is stale (a command or option changed); regenerate it with: {gen.REGENERATE}"
    )


def test_every_command_is_documented():
    from glinthawk.cli import main

    text = _generator().render()
    for name in main.commands:
        assert f"## `glinthawk {name}`" in text
    assert "## `glinthawk-node`" in text
