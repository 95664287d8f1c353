"""Start-up of ``glinthawk generate``: seconds from spawn to each phase, trees side by side.

    python scripts/startup_timeline.py --model DIR --trees BEFORE,AFTER --repeats 7 --dtypes bfloat16,float32

Each repeat runs one whole ``glinthawk generate`` process per tree and dtype, in alternating
order (the host is shared: compare only runs of one call), on one 16-token prompt (token ids)
and one new token. It prints medians of: the interpreter up, the checkpoint load started and
done, the first forward pass started (after any warm-up), exit, wall, CPU seconds, peak RSS
and minor page faults. docs/PERFORMANCE.md ("Start-up") has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs inside each child: timestamps since GH_T0 (the parent's clock just before the spawn).
CHILD = """
import atexit, json, os, sys, time
t0, marks = float(os.environ["GH_T0"]), {"interp": time.time()}
import glinthawk.cli as cli, glinthawk.engine as engine
run_step, load = engine.run_step, cli.load_checkpoint
def first_step(*a, **k):
    marks.setdefault("forward", time.time())
    return run_step(*a, **k)
def timed_load(*a, **k):
    marks["load"] = time.time(); out = load(*a, **k); marks["loaded"] = time.time(); return out
engine.run_step, cli.load_checkpoint = first_step, timed_load
atexit.register(lambda: print("TIMELINE " + json.dumps({k: v - t0 for k, v in {**marks, "exit": time.time()}.items()}),
                              file=sys.stderr))
cli.main(sys.argv[1:])
"""
KEYS = ("interp", "load", "loaded", "forward", "exit", "wall", "cpu", "rss_mib", "minflt")


def run_once(tree: str, model: str, dtype: str, prompts: Path, out: Path) -> dict:
    start = time.time()
    env = {**os.environ, "PYTHONPATH": tree, "GH_T0": repr(start)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "generate", str(prompts), "-o", str(out), "--model", model,
                             "--dtype", dtype, "--no-progress"], env=env, stderr=subprocess.PIPE, text=True,
                            cwd=out.parent)  # not a source tree: '-c' puts the working directory first on sys.path
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    err = proc.stderr.read()
    if status != 0:
        raise SystemExit(f"{tree} {dtype} failed:\n{err}")
    marks = json.loads(err.split("TIMELINE ", 1)[1].splitlines()[0])
    return {**marks, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
            "minflt": usage.ru_minflt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--trees", required=True, help="comma-separated source trees (PYTHONPATH of each run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args()
    trees, dtypes = args.trees.split(","), args.dtypes.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    loads, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "in.jsonl"
        prompts.write_text(json.dumps({"custom_id": "a", "prompt": list(range(3, 19)), "max_tokens": 1,
                                       "temperature": 0}) + "\n")
        for repeat in range(args.repeats):
            for dtype in dtypes:
                for tree in trees if repeat % 2 == 0 else trees[::-1]:
                    out = Path(tmp) / f"out-{trees.index(tree)}-{dtype}.jsonl"
                    runs.setdefault((tree, dtype), []).append(run_once(tree, args.model, dtype, prompts, out))
                    loads.append(os.getloadavg()[0])
                    outputs.setdefault(dtype, set()).add(json.loads(out.read_text())["token_ids"][0])
    print(f"medians of {args.repeats} runs; seconds since spawn, peak RSS in MiB")
    print(f"{'tree':28} {'dtype':9}" + "".join(f"{key:>10}" for key in KEYS))
    for (tree, dtype), samples in sorted(runs.items(), key=lambda item: (item[0][1], trees.index(item[0][0]))):
        print(f"{tree:28} {dtype:9}" + "".join(f"{statistics.median(s[key] for s in samples):10.3f}" for key in KEYS))
        print(f"{'':38}first forward, each run: " + " ".join(f"{s['forward']:.2f}" for s in samples))
    print(f"1-min load average during the runs: median {statistics.median(loads):.2f} ({min(loads):.2f}-{max(loads):.2f})")
    print("same token from every tree:", all(len(tokens) == 1 for tokens in outputs.values()))


if __name__ == "__main__":
    main()
