"""A Tier 1 cut into pipeline stages, every node in this process: for the pipeline tests."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from glinthawk.compute.loader import load_model
from glinthawk.net.netem import NetEm
from glinthawk.node.stage import StageNode
from glinthawk.node.tier1 import Tier1Node
from glinthawk.node.tier2 import Tier2Node
from glinthawk.settings import Tier1Settings
from glinthawk.tokenizer import Tokenizer


@dataclass
class Pipeline:
    tier1: Tier1Node
    port: int
    stages: list[StageNode]  # after the first, in order
    tier2: list[list[Tier2Node]]  # per stage, the first's first
    tier2_ports: list[list[int]] = field(default_factory=list)


@asynccontextmanager
async def pipeline(directory: Path, cuts: list[int], *, nodes_per_stage: int | list[int] = 1, kv_tokens: int = 4096,
                   netem: NetEm | None = None, **tier1_settings):
    """Stages cut at ``cuts`` (layers 0:cuts[0], cuts[0]:cuts[1], ...), each with its Tier 2 nodes
    (``nodes_per_stage``: as many for each, or a count per stage), started from the last as a deployment would."""
    whole = load_model(directory, dtype="float32", device="cpu")
    bounds = [0, *cuts, whole.config.num_layers]
    models = [load_model(directory, dtype="float32", device="cpu", layers=range(a, b))
              for a, b in zip(bounds, bounds[1:])]
    counts = nodes_per_stage if isinstance(nodes_per_stage, list) else [nodes_per_stage] * len(models)
    tier2 = [[Tier2Node(kv_tokens=kv_tokens, netem=netem) for _ in range(count)] for count in counts]
    ports = [[await node.start("127.0.0.1", 0) for node in nodes] for nodes in tier2]
    addresses = [[f"127.0.0.1:{p}" for p in stage_ports] for stage_ports in ports]
    settings = Tier1Settings(**tier1_settings)
    later: list[StageNode] = []
    next_address = None
    tier1 = None
    try:
        for model, stage_addresses in reversed(list(zip(models[1:], addresses[1:]))):
            stage = StageNode(model, stage_addresses, next_address, netem=netem, settings=settings)
            later.insert(0, stage)
            next_address = f"127.0.0.1:{await stage.start('127.0.0.1', 0)}"
        tier1 = Tier1Node(models[0], Tokenizer(directory), addresses[0], netem=netem, next_stage=next_address,
                          settings=settings)
        port = await tier1.start("127.0.0.1", 0)
        yield Pipeline(tier1, port, later, tier2, ports)
    finally:
        if tier1 is not None:
            await tier1.close()
        for stage in later:
            await stage.close()
        for nodes in tier2:
            for node in nodes:
                await node.close()
