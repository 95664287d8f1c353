"""Start-up of ``glinthawk generate``: what it imports and what it runs before the first step.

Structure only, no clocks: timings are in docs/PERFORMANCE.md ("Start-up")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Modules a plain-prompt generate does not need, each tens of milliseconds to seconds to import:
# the chat template's jinja2, structured output's llguidance, and what only the benchmarks
# (transformers, matplotlib) or the Ray launcher use. (tqdm comes with torch itself.)
NOT_NEEDED = ("jinja2", "llguidance", "transformers", "ray", "matplotlib")

PROBE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr))
from glinthawk.cli import main
main(sys.argv[1:])
"""


def test_plain_generate_imports_only_what_it_uses(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"custom_id": "a", "prompt": "The quick brown fox", "max_tokens": 2}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "generate", str(prompts), "-o", str(out), "--model",
         str(tiny_checkpoint("llama_gqa")), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["finish_reason"] == "length"
    modules = json.loads(proc.stderr.split("MODULES ", 1)[1])
    assert "torch" in modules and "tokenizers" in modules  # the probe saw the real run
    loaded = {name for name in modules if name.split(".")[0] in NOT_NEEDED}
    assert not loaded, f"plain generate imported {sorted(loaded)}"
