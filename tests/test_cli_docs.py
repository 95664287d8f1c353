"""docs/CLI.md must be what scripts/gen_cli_docs.py renders from the commands' current --help."""

from __future__ import annotations

import importlib.util
import re
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


ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of ``doc``."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_is_a_front_door_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150, "the README is the front door; details go to docs/"
    commands = re.findall(r"```bash\n(.+)\n```", readme)
    assert len(commands) == 2 and "glinthawk run" in commands[0] and "pytest" in commands[1]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == commands[1]
