"""Pipeline stages of Tier 1, in process: a model loaded as layer ranges computes what the whole does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glinthawk.compute.attention import AttentionPlan, attend_with
from glinthawk.compute.kvcache import KVStore
from glinthawk.compute.loader import CheckpointError, load_model
from glinthawk.engine import Engine
from glinthawk.requests import parse_line
from glinthawk.scheduling import Intake
from glinthawk.sequence import commit_step, pack_step, plan_step
from glinthawk.step import compute_stage, run_now, run_step
from glinthawk.tokenizer import Tokenizer

from checkpoints import build_checkpoint

REQUESTS = [{"custom_id": f"r{i}", "prompt": prompt, "max_tokens": 9, "ignore_eos": True, **sampling}
            for i, (prompt, sampling) in enumerate([
                ("The quick brown fox", {"temperature": 0}),
                ("Tier one holds the weights", {"temperature": 0.8, "top_p": 0.9, "seed": 3}),
                ("Once upon a time", {"temperature": 0}),
            ])]


def pipeline_tokens(stages, tokenizer) -> dict[str, list[int]]:
    """Every request through ``stages`` in turn, one step after another; one KV store stands in
    for each stage's Tier 2 nodes (layers are indexed as in the whole model)."""
    cfg = stages[0].config
    store = KVStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4096, stages[0].dtype)
    intake = Intake(tokenizer, cfg.max_position_embeddings, cfg.vocab_size, None)
    running = [intake.admit(parse_line(i + 1, json.dumps(r).encode())) for i, r in enumerate(REQUESTS)]
    for seq in running:
        store.reserve(seq.id, seq.reserve_tokens)
    done = {}
    while running:
        batch = pack_step(plan_step(running, 16))  # small steps: prompts are prefilled in chunks
        plan = AttentionPlan.of(store, [s.id for s in batch.seqs], batch.starts, batch.counts)

        async def attend(layer, q, k, v):
            return attend_with(plan, layer, q, k, v)

        handed_on = None
        for stage in stages:
            async def compute(work, stage=stage):
                return compute_stage(stage, work)

            handed_on = run_now(run_step(stage, batch, compute, attend, x=handed_on))
        for seq in commit_step(batch, handed_on, tokenizer):
            running.remove(seq)
            done[seq.request.custom_id] = seq.generated
    return done


def engine_tokens(model, tokenizer) -> dict[str, list[int]]:
    lines = []
    Engine(model, tokenizer, kv_tokens=4096, max_batch_tokens=16).run(
        [parse_line(i + 1, json.dumps(r).encode()) for i, r in enumerate(REQUESTS)], lines.append)
    return {line["custom_id"]: line["token_ids"] for line in lines}


@pytest.mark.parametrize("cuts", [[2], [1, 3], [1, 2, 3]])
@pytest.mark.parametrize("variant", ["llama_gqa", "llama3_tied_mqa", "qwen2_bias", "mistral", "qwen3"])
def test_stages_of_a_model_give_its_tokens(tmp_path_factory, variant, cuts):
    """A 4-layer model cut into 2, 3 or 4 stages (layers A:B each) gives, token for token, what
    the whole model gives in the single-process engine: greedy and seeded sampling alike."""
    directory = build_checkpoint(tmp_path_factory.mktemp(variant), variant, layers=4)
    tokenizer = Tokenizer(directory)
    whole = load_model(directory, dtype="float32", device="cpu")
    bounds = [0, *cuts, 4]
    stages = [load_model(directory, dtype="float32", device="cpu", layers=range(a, b))
              for a, b in zip(bounds, bounds[1:])]
    assert pipeline_tokens(stages, tokenizer) == engine_tokens(whole, tokenizer)


def test_a_stage_holds_only_its_own_weights(tiny_checkpoint):
    directory = tiny_checkpoint("llama3_tied_mqa")  # tied: the last stage still needs the head
    first, last = (load_model(directory, layers=range(a, b)) for a, b in ((0, 1), (1, 2)))
    assert (len(first.layers), first.layer_range, first.is_first, first.is_last) == (1, range(0, 1), True, False)
    assert first.embed_tokens is not None and first.norm is None and first.lm_head is None
    assert last.embed_tokens is None and last.norm is not None and last.lm_head is not None
    whole = load_model(directory)
    dense = [w.to_dense() if w.is_mkldnn else w for w in (last.layer(1).down, whole.layer(1).down)]
    assert torch.equal(*dense)
    with pytest.raises(CheckpointError, match=r"layers 1:3 are not a range of the model's 2 layers; give A:B"):
        load_model(directory, layers=range(1, 3))
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        load_model(directory / "config.json")


PEAK_RSS = """
import resource, sys
from glinthawk.compute.loader import load_model
def peak_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = peak_kib()
stop = int(sys.argv[2])
model = load_model(sys.argv[1], dtype="float32", device="cpu", layers=range(0, stop))
print(peak_kib() - before, model.weight_bytes() // 1024)
"""


def test_a_stage_s_peak_memory_is_its_share_of_the_weights(tmp_path):
    """Loading 2 of a model's 8 layers takes about a quarter of the memory the whole takes
    (the weights are read one tensor at a time, and only the stage's)."""
    directory = build_checkpoint(tmp_path / "wide", "llama_gqa", layers=8, hidden=512)

    def measure(stop: int) -> tuple[int, int]:
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(directory), str(stop)], capture_output=True,
                             text=True, check=True)
        growth, weights = run.stdout.split()
        return int(growth), int(weights)

    (stage_growth, stage_weights), (whole_growth, whole_weights) = measure(2), measure(8)
    assert stage_weights < 0.3 * whole_weights
    assert stage_growth < 0.4 * whole_growth, (stage_growth, whole_growth)
