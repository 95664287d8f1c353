"""Write docs/CLI.md, the command-line reference, from the commands' own --help.

    python scripts/gen_cli_docs.py           # regenerate docs/CLI.md
    python scripts/gen_cli_docs.py --check   # exit 1 if docs/CLI.md is stale

Every command of the ``glinthawk`` group is included, as the group lists them when this runs (so a new
subcommand shows up by itself), then ``glinthawk-node``. The help is rendered at a fixed width, so the
output does not depend on the terminal it was generated in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from glinthawk.cli import main as glinthawk_main
from glinthawk.node.cli import main as node_main

WIDTH = 100
DOC = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"
REGENERATE = "python scripts/gen_cli_docs.py"
HEADER = f"""# Command-line reference

<!-- Generated from the commands' --help by scripts/gen_cli_docs.py; do not edit. Regenerate: {REGENERATE} -->

The `glinthawk` commands, then `glinthawk-node`. Every command also takes `--help`.
"""


def _helps(command: click.Command, ctx: click.Context) -> Iterator[tuple[str, str]]:
    """(command path, help text) for ``command`` and, for a group, every visible subcommand under it."""
    yield ctx.command_path, command.get_help(ctx)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _helps(sub, click.Context(sub, info_name=name, parent=ctx))


def render() -> str:
    sections = [HEADER]
    for command, name in ((glinthawk_main, "glinthawk"), (node_main, "glinthawk-node")):
        ctx = click.Context(command, info_name=name, terminal_width=WIDTH, max_content_width=WIDTH)
        for path, text in _helps(command, ctx):
            sections.append(f"## `{path}`\n\n```text\n{text}\n```\n")
    return "\n".join(sections)


def main() -> int:
    parser = argparse.ArgumentParser(description="Write docs/CLI.md from the commands' --help.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/CLI.md is stale; write nothing")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
