"""What each Tier 2 actor of ``glinthawk run --ray`` reserves of Ray's ``memory`` resource, and the
KV it is given for it.

Ray's ``memory`` is a logical resource, in bytes: an actor created with ``.options(memory=BYTES)``
is placed only on a machine whose unreserved ``memory`` covers BYTES, and holds them while it
lives (admission control only: nothing limits what the process really uses). A machine's
``memory`` is its RAM less Ray's object store (about 70% of it by default). So each Tier 2 actor
reserves what it will use, its KV and its process beside it, counted as ``glinthawk plan`` counts
a node's RSS (``TIER2_FIXED``, and ``TIER2_KV_OVERHEAD`` per byte of KV), and Ray never places
more on a machine than it has. Nothing here imports Ray: the machines come as ``Machine`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glinthawk.net.netem import parse_size
from glinthawk.plan import GiB, TIER2_FIXED, TIER2_KV_OVERHEAD
from glinthawk.settings import Tier2Settings

# Of a machine's Ray memory, what Tier 2 actors sized by glinthawk (no --kv-memory or --kv-tokens)
# may reserve together; the rest is left to a Tier 1 there and to other work.
RAY_KV_FRACTION = 0.8


@dataclass(frozen=True)
class Machine:
    """A Ray node that can hold a Tier 2 actor: its ``memory`` resource (bytes) and CPUs."""

    memory: float
    cpus: float


@dataclass(frozen=True)
class Tier2Size:
    """One stage's Tier 2 actors: their KV options and the bytes of Ray memory each reserves."""

    args: list[str]
    reserve: int


def machines_of(nodes: list[dict]) -> list[Machine]:
    """The live machines of ``ray.nodes()`` with a CPU at least (a Tier 2 actor takes one)."""
    return [Machine(float(node["Resources"].get("memory", 0)), float(node["Resources"].get("CPU", 0)))
            for node in nodes if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]


def reservation(kv_bytes: int) -> int:
    """Bytes of Ray memory a Tier 2 actor with ``kv_bytes`` of KV reserves: its RSS as ``glinthawk plan``
    counts it (a fixed GiB for the process, and 4.5% more than the KV)."""
    return math.ceil(TIER2_FIXED + kv_bytes * TIER2_KV_OVERHEAD)


def kv_memory_for(node_memory: float, actors_on_node: int, fraction: float = RAY_KV_FRACTION) -> int:
    """Bytes of KV for one of ``actors_on_node`` Tier 2 actors on a machine of ``node_memory`` bytes of
    Ray memory: what its share of ``fraction`` of that leaves beside its process (so that its
    ``reservation`` is at most that share). ValueError when that leaves nothing."""
    kv = _kv_in(fraction * node_memory / max(1, actors_on_node))
    if kv <= 0:
        raise ValueError(f"Ray reports {node_memory / GiB:.1f} GiB of memory on a machine for {actors_on_node} "
                         f"Tier 2 actor(s): {fraction:.0%} of it leaves no KV beside each process's "
                         f"{TIER2_FIXED / GiB:g} GiB; give --kv-memory (or --kv-tokens), or run fewer Tier 2 nodes")
    return kv


def _kv_in(share: float) -> int:
    """The most KV whose ``reservation`` is within ``share`` bytes (the float division may be a byte over)."""
    kv = int((share - TIER2_FIXED) / TIER2_KV_OVERHEAD)
    while kv > 0 and reservation(kv) > share:
        kv -= 1
    return kv


def holds(machines: list[Machine], reserve: int, fraction: float = 1.0) -> int:
    """How many actors of ``reserve`` bytes and a CPU each the machines hold within ``fraction`` of their memory."""
    return sum(min(int(m.cpus), int(fraction * m.memory // reserve)) for m in machines)


def auto_kv_memory(machines: list[Machine], actors: int, fraction: float = RAY_KV_FRACTION) -> int:
    """KV bytes for each of ``actors`` Tier 2 actors given no size: the largest for which the machines
    hold them all within ``fraction`` of their memory. One size for all, since Ray must know an
    actor's reservation before it places it; the largest that fits rather than the smallest
    machine's even share, so that one small machine holds fewer actors instead of shrinking all."""
    def fits(kv: int) -> bool:
        return kv > 0 and holds(machines, reservation(kv), fraction) >= actors

    # Each machine's share for each count it could hold; what fits is a prefix of them, smallest first.
    sizes = sorted({_kv_in(fraction * m.memory / k) for m in machines for k in range(1, min(actors, int(m.cpus)) + 1)})
    low, high = 0, len(sizes)
    while low < high:  # low: how many sizes fit
        middle = (low + high) // 2
        low, high = (middle + 1, high) if fits(sizes[middle]) else (low, middle)
    if low == 0:
        largest = max((m.memory for m in machines), default=0.0)
        raise ValueError(f"Ray's {len(machines)} machine(s) with a CPU (the largest with {largest / GiB:.1f} GiB of "
                         f"Ray memory) cannot hold {actors} Tier 2 actor(s) with KV beside each process's "
                         f"{TIER2_FIXED / GiB:g} GiB in {fraction:.0%} of their memory; give --kv-memory (or "
                         "--kv-tokens), or run fewer Tier 2 nodes")
    return sizes[low - 1]


def tier2_sizes(kv: Tier2Settings, machines: list[Machine], actors: int, token_bytes: list[int]) -> list[Tier2Size]:
    """Each stage's Tier 2 KV options and reservation, for ``actors`` Tier 2 actors in all; ``token_bytes``:
    a token's KV bytes on each stage's nodes (what --kv-tokens costs). A given size is refused (ValueError,
    one line) when the machines cannot hold every actor at it: Ray would leave the rest pending forever."""
    if kv.sized:
        explicit = [kv.kv_tokens * per_token if kv.kv_tokens is not None else parse_size(kv.kv_memory)
                    for per_token in token_bytes]
        sizes = [Tier2Size(kv.kv_args, reservation(kv_bytes)) for kv_bytes in explicit]
        largest = max(size.reserve for size in sizes)
        if (room := holds(machines, largest)) < actors:
            raise ValueError(f"each Tier 2 actor reserves {largest / GiB:.1f} GiB of Ray's memory resource (its KV "
                             f"and {TIER2_FIXED / GiB:g} GiB for its process) and a CPU: Ray's machines hold {room} "
                             f"of the {actors}; give a smaller --kv-memory (or --kv-tokens), fewer Tier 2 nodes, or "
                             "more machines")
        return sizes
    kv_bytes = auto_kv_memory(machines, actors)
    return [Tier2Size(["--kv-memory", str(kv_bytes), *kv.dtype_args], reservation(kv_bytes)) for _ in token_bytes]


def tier2_options(reserve: int) -> dict:
    """A Tier 2 actor's Ray options: a CPU and ``reserve`` bytes of Ray memory while it lives, spread over
    the machines, and restarted whenever its node dies (it joins Tier 1 again)."""
    return {"num_cpus": 1, "memory": reserve, "max_restarts": -1, "max_task_retries": -1,
            "scheduling_strategy": "SPREAD"}


def unplaced(pending: int, actors: int, reserve: int, free: float, waited_s: float) -> str:
    """Why ``pending`` of ``actors`` Tier 2 actors have not started after ``waited_s``: the memory they miss."""
    return (f"{pending} of {actors} Tier 2 actor(s) did not start within {waited_s:g} s: they need "
            f"{pending * reserve / GiB:.1f} GiB of Ray's memory resource ({reserve / GiB:.1f} GiB each) and Ray has "
            f"{free / GiB:.1f} GiB of it free on all machines together; free some (other work holds it), or give a "
            "smaller --kv-memory or fewer Tier 2 nodes")
