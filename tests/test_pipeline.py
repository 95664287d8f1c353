"""Tier 1 in pipeline stages, each with its own Tier 2 nodes: the same tokens as one process."""

from __future__ import annotations

import pytest

from glinthawk.client import submit
from glinthawk.compute.loader import load_model
from glinthawk.tokenizer import Tokenizer

from checkpoints import build_checkpoint
from cluster_util import read_results, single_process, write_requests
from pipeline_util import pipeline

GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 11}


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """``four_layers(variant) -> Path``: a 4-layer checkpoint (enough layers for 3 stages)."""
    built = {}

    def get(variant: str = "llama_gqa"):
        if variant not in built:
            built[variant] = build_checkpoint(tmp_path_factory.mktemp(variant), variant, layers=4, seed=5)
        return built[variant]

    return get


def reference(directory, requests):
    model = load_model(directory, dtype="float32", device="cpu")
    return single_process((model, Tokenizer(directory)), requests)


@pytest.mark.parametrize("variant,cuts,nodes", [
    ("llama_gqa", [2], 1), ("llama_gqa", [1, 3], 2), ("qwen2_bias", [2], 2), ("mistral", [1, 2], 1),
])
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_stages_give_the_single_process_tokens(four_layers, tmp_path, variant, cuts, nodes, sampling):
    directory = four_layers(variant)
    requests = write_requests(tmp_path / "in.jsonl", sampling)
    async with pipeline(directory, cuts, nodes_per_stage=nodes, micro_batches=3, max_batch_tokens=16) as p:
        summary = await submit(requests, "127.0.0.1", p.port, tmp_path / "out.jsonl", progress=False)
    assert summary.failed == 0
    got = read_results(tmp_path / "out.jsonl")
    want = reference(directory, requests)
    assert {k: v["token_ids"] for k, v in got.items()} == {k: v["token_ids"] for k, v in want.items()}
