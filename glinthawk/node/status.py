"""What ``glinthawk status`` shows of a Tier 1 node: its throughput lately, its requests, and
every stage's Tier 2 nodes."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class Throughput:
    """Generated tokens sampled once a second: tok/s over the last ten seconds."""

    def __init__(self, generated: Callable[[], int]):
        self.generated, self.started = generated, time.monotonic()
        self._samples: deque[tuple[float, int]] = deque(maxlen=11)  # (time, tokens)

    async def sample_forever(self) -> None:
        while True:
            self._samples.append((time.monotonic(), self.generated()))
            await asyncio.sleep(1.0)

    def tokens_per_s(self) -> float:
        samples = list(self._samples) + [(time.monotonic(), self.generated())]
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return round((n1 - n0) / max(t1 - t0, 1e-9), 1)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started


def tier1_status(node: Any) -> dict:
    """``node`` is a ``tier1.Tier1Node``."""
    uptime = node.throughput.uptime_s
    prefixes = list(node.prefixes)
    return {
        "model": node.model_name,
        "uptime_s": round(uptime, 1),
        "busy_fraction": round(node.merger.stats.busy_seconds / max(uptime, 1e-9), 3) if node.merger else 0.0,
        "tokens_per_s": node.throughput.tokens_per_s(),
        "generated_tokens": node.generated_tokens,
        "requests": {"admitted": node.stats.admitted, "finished": node.stats.finished,
                     "failed": node.stats.failed, "waiting": len(node.waiting), "running": len(node.batch_of)},
        "batches": len(node.batches),
        "micro_batches_in_flight": node.micro_batches_in_flight,
        "micro_batches": node.pacer.count,  # how many take sequences (measured, unless given)
        "prefixes": {"kept": len(prefixes), "tokens": sum(p.length for p in prefixes),
                     "readers": sum(p.readers for p in prefixes)},
        "tier2": [{  # every configured or joined node, reached or not, until it leaves
            "address": address, "alive": bool(link and link.alive), "kv_tokens": link.capacity_tokens if link else 0,
            "kv_tokens_used": link.used_tokens if link else 0, "sequences": link.sequences if link else 0,
            "draining": bool(link and link.alive and link.draining), "joined": address in node.pool.joined,
        } for address in node.pool.members for link in [node.links.get(address)]],
        **({"layers": [node.model.layer_range.start, node.model.layer_range.stop], "stages": node.later.status(),
            "stopped": node.chain_down} if node.downstream is not None else {}),
    }
