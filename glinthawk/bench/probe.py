"""A Tier 2 node process that also reports its KV fill, for the memory suite.

``python -m glinthawk.bench.probe --listen H:P --kv-tokens N --stats-file F --ready-file R``
runs the ordinary ``Tier2Node``, served as ``glinthawk-node`` serves it, and, every
``--interval`` seconds, rewrites F (atomically) with ``{"time", "filled_tokens",
"reserved_tokens", "bytes_per_token", "capacity_tokens"}``.
``filled_tokens`` counts the K/V rows written (the store's high-water marks), which is
what resident memory follows; ``reserved_tokens`` is the store's ``used_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path

from glinthawk.net.loop import run
from glinthawk.node.cli import serve_node
from glinthawk.node.tier2 import Tier2Node


def store_stats(store) -> dict:
    if store is None:
        return {"filled_tokens": 0, "reserved_tokens": 0, "bytes_per_token": None, "capacity_tokens": None}
    return {"filled_tokens": store.filled_tokens, "reserved_tokens": store.used_tokens, "bytes_per_token": store.bytes_per_token,
            "capacity_tokens": store.capacity_tokens}


async def serve(args: argparse.Namespace) -> None:
    """The node as ``glinthawk-node --role tier2`` serves it, with the stats file kept beside."""
    host, _, port = args.listen.rpartition(":")
    node = Tier2Node(kv_tokens=args.kv_tokens)
    reporter = asyncio.get_running_loop().create_task(report(node, Path(args.stats_file), args.interval))
    try:
        await serve_node(node, host or "127.0.0.1", int(port), Path(args.ready_file), metrics_port=None)
    finally:
        reporter.cancel()


async def report(node: Tier2Node, stats_path: Path, interval: float) -> None:
    """Rewrite ``stats_path`` every ``interval`` seconds, atomically: a reader never sees half of it."""
    while True:
        stats = {"time": time.time(), **store_stats(node.store)}
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(stats_path)
        await asyncio.sleep(interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glinthawk.bench.probe")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--kv-tokens", type=int, required=True)
    parser.add_argument("--stats-file", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(serve(args))


if __name__ == "__main__":
    main()
