"""CUDA graphs for decode stages (compute/graphs.py): everything but the capture itself, on the CPU.

``EagerReplay`` stands in for a CUDA graph: the same static inputs padded to a bucket, the
same replay into static outputs and slicing back. Every stage kind must give, bit for bit
in float32, what it gives unpadded: padding rows must never reach real ones. The CUDA
capture itself runs only in tests/test_gpu.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from cluster_util import distributed, read_results, single_process, write_requests
from engine_util import PROMPTS, request, run_engine

from glinthawk.compute import layers
from glinthawk.compute.graphs import (CudaGraphCapture, EagerReplay, GraphRunner, StageGraphs, StaticInput, bucket,
                                      buckets, decode_only, stage_graphs)
from glinthawk.compute.loader import load_model
from glinthawk.compute.rope import rotary
from glinthawk.compute.sampling import SamplingParams
from glinthawk.engine import Engine
from glinthawk.settings import StepSettings
from glinthawk.step import StageWork, compute_stage

VARIANTS = ["llama_gqa", "llama3_tied_mqa", "qwen2_bias", "qwen3"]
ROW_COUNTS = [1, 3, 8, 13, 5, 2, 16, 1]  # off-bucket counts, and smaller after larger (stale padding rows)


# -- buckets, eligibility, buffers ----------------------------------------------------------
def test_buckets_are_powers_of_two_up_to_the_largest_job():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 127, 128, 129, 512)] == [1, 1, 2, 4, 4, 8, 128, 128, 256, 512]
    assert buckets(1) == [1] and buckets(100) == [1, 2, 4, 8, 16, 32, 64, 128] and buckets(2048)[-1] == 2048


def test_only_decode_only_jobs_on_cuda_with_the_switch_on_take_graphs(tiny_model):
    model, _ = tiny_model()
    assert stage_graphs(model, False, 64) is None and stage_graphs(model, True, 64) is None  # off; on a CPU
    assert StepSettings().cuda_graphs is False  # off until a GPU run verifies it
    on_cuda = SimpleNamespace(device=torch.device("cuda"))  # no CUDA is touched before the first capture
    graphs = stage_graphs(on_cuda, True, 100)
    assert isinstance(graphs, StageGraphs) and isinstance(graphs.capture, CudaGraphCapture) and graphs.max_rows == 128
    assert stage_graphs(on_cuda, False, 100) is None
    assert isinstance(stage_graphs(model, True, 64, EagerReplay()), StageGraphs)  # the tests' way in on a CPU

    def work(rows: int, **fields) -> StageWork:
        rot = rotary(model.inv_freq, torch.arange(rows), model.dtype)
        return StageWork(1, rot, **fields)

    assert graphs.takes(work(128, decode=True)) and graphs.takes(work(1, decode=True))
    assert not graphs.takes(work(8))  # a step with prefill chunks
    assert not graphs.takes(work(129, decode=True))  # past the largest bucket
    assert not graphs.takes(work(8, decode=True, score_rows=torch.tensor([0])))
    assert decode_only([1, 1, 1]) and not decode_only([1, 4]) and not decode_only([])


def test_a_static_input_zeroes_the_rows_past_each_job():
    static = StaticInput(8, torch.zeros(1, 3), torch.device("cpu"))
    static.load(torch.ones(6, 3))
    static.load(torch.full((2, 3), 2.0))
    assert torch.equal(static.tensor[:2], torch.full((2, 3), 2.0)) and not static.tensor[2:].any()
    static.load(torch.full((7, 3), 3.0))
    assert torch.equal(static.tensor[:7], torch.full((7, 3), 3.0)) and not static.tensor[7:].any()


def test_a_runner_copies_in_replays_and_copies_out():
    capture = EagerReplay()
    inputs = [StaticInput(4, torch.zeros(1, 2), torch.device("cpu")) for _ in range(2)]
    runner = GraphRunner(lambda a, b: (a * 2 + b, a.sum(-1)), inputs, capture)
    a, b = torch.arange(6.0).view(3, 2), torch.ones(3, 2)
    doubled, sums = runner(a, b)
    assert torch.equal(doubled, a * 2 + b) and torch.equal(sums, a.sum(-1))
    assert doubled.data_ptr() != runner.outputs[0].data_ptr()  # a copy: the next replay overwrites the outputs
    runner(torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.equal(doubled, a * 2 + b)
    assert (capture.captures, capture.replays) == (1, 2)
    with pytest.raises(ValueError, match="5 rows"):
        runner(torch.zeros(5, 2), torch.zeros(5, 2))


# -- padded to a bucket and sliced back == unpadded, every stage kind ------------------------
def stage_works(model, rows: int, generator: torch.Generator) -> list[StageWork]:
    """A decode-only job of ``rows`` rows at each stage ``model`` runs, the final one with
    greedy, seeded and log-prob rows, a subset sampled and two rows masked."""
    cfg, stages, device = model.config, model.layer_range, model.device
    rot = rotary(model.inv_freq, torch.randint(0, 60, (rows,), generator=generator).to(device), model.dtype)
    x = torch.randn(rows, cfg.hidden_size, generator=generator).to(device, model.dtype)
    attn_out = torch.randn(rows, cfg.num_heads, cfg.head_dim, generator=generator).to(model.dtype)  # from the wire
    works = []
    if model.is_first:
        token_ids = torch.randint(0, cfg.vocab_size, (rows,), generator=generator).to(device)
        works.append(StageWork(0, rot, token_ids=token_ids))
    else:
        works.append(StageWork(stages.start, rot, x=x))  # a pipeline stage's first layer: no post-attention
    works += [StageWork(stage, rot, x=x, attn_out=attn_out) for stage in range(max(1, stages.start + 1), stages.stop)]
    if not model.is_last:
        return [*works, StageWork(stages.stop, rot, x=x, attn_out=attn_out)]
    sampled = list(range(0, rows, 2)) if rows > 2 else list(range(rows))
    params = [SamplingParams(temperature=0) if i % 3 == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=i, logprobs=2 if i % 3 == 1 else None)
              for i in range(len(sampled))]
    words = (cfg.vocab_size + 31) // 32
    masked = torch.tensor([0, len(sampled) - 1]).unique()
    masks = torch.randint(-2**31, 2**31 - 1, (len(masked), words), generator=generator, dtype=torch.int32)
    masks[:, 0] |= 0xFF  # a few tokens allowed in every masked row
    works.append(StageWork(cfg.num_layers, rot, x=x, attn_out=attn_out, sample_rows=torch.tensor(sampled).to(device),
                           params=params, seeds=[7 + i for i in range(len(params))], steps=[3] * len(params),
                           mask_rows=masked, masks=masks))
    return works


def _decode(work: StageWork) -> StageWork:
    work.decode = True
    return work


def assert_same_result(model, work: StageWork, graphs: StageGraphs, against=None) -> None:
    """The stage through ``graphs`` gives exactly what it gives eagerly (outputs, tokens, log-probs),
    or what ``against(work)`` gives."""
    assert graphs.takes(_decode(work))
    eager = compute_stage(model, work) if against is None else against(work)
    graphed = compute_stage(model, work, graphs)
    if work.stage == model.config.num_layers:
        assert torch.equal(graphed.tokens, eager.tokens), work.stage
        assert (graphed.logprobs is None) == (eager.logprobs is None)
        if eager.logprobs is not None:
            for a, b in zip(vars(graphed.logprobs).values(), vars(eager.logprobs).values()):
                assert torch.equal(a, b)
        return
    as_tuple = (lambda out: out if isinstance(out, tuple) else (out,))
    for a, b in zip(as_tuple(graphed), as_tuple(eager), strict=True):
        assert a.shape == b.shape and torch.equal(a, b), (work.stage, a.shape)


def check_every_stage(model, graphs: StageGraphs, seed: int, against=None) -> set[str]:
    """``assert_same_result`` for every stage of ``model`` at every count of ``ROW_COUNTS``; the
    stage kinds that ran through ``graphs``."""
    generator = torch.Generator().manual_seed(seed)
    for rows in ROW_COUNTS:
        for work in stage_works(model, rows, generator):
            assert_same_result(model, work, graphs, against)
    return {key[0] for key in graphs.runners}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_stage_padded_to_its_bucket_gives_the_unpadded_result(tiny_model, variant):
    model, _ = tiny_model(variant)
    graphs = StageGraphs(model, 64, EagerReplay())
    assert check_every_stage(model, graphs, seed=1) == {"first", "layer", "post", "head"}
    assert {key[2] for key in graphs.runners if key[0] == "layer"} == {1, 2, 4, 8, 16}


@pytest.mark.parametrize("cut", [(0, 1), (1, 3), (3, 4)])
def test_pipeline_stages_padded_give_the_unpadded_result(four_layers, cut):
    """A stage that hands its hidden states on ("post" at its end) and one that starts from them ("entry")."""
    model = load_model(four_layers(), dtype="float32", device="cpu", layers=range(*cut))
    kinds = check_every_stage(model, StageGraphs(model, 32, EagerReplay()), seed=2)
    assert ("entry" in kinds) == (cut[0] > 0) and ("first" in kinds) == (cut[0] == 0) and "post" in kinds


def test_the_head_in_chunks_padded_gives_the_unpadded_result(tiny_model, monkeypatch):
    """With a head that takes 4 rows a chunk, a 13-row job runs 4 + 4 + 4 + 1 through the head graphs."""
    model, _ = tiny_model()
    monkeypatch.setattr(layers, "HEAD_CHUNK_BYTES", 4 * model.config.vocab_size * 4)
    assert layers.head_rows(model) == 4
    graphs = StageGraphs(model, 64, EagerReplay())
    generator = torch.Generator().manual_seed(3)
    for rows in (13, 26, 3):
        assert_same_result(model, stage_works(model, rows, generator)[-1], graphs)
    assert {key[2] for key in graphs.runners if key[0] == "head"} <= {1, 2, 4}


def test_a_jobs_outputs_outlive_the_next_jobs_replay(tiny_model):
    """Tier 1 runs two micro-batches' same stage as separate jobs, and the first one's x is
    read only at its next stage: by then the same graph has replayed for the second."""
    model, _ = tiny_model()
    graphs = StageGraphs(model, 64, EagerReplay())
    generator = torch.Generator().manual_seed(5)
    first, second = (_decode(stage_works(model, 3, generator)[1]) for _ in range(2))
    kept = compute_stage(model, first, graphs)
    compute_stage(model, second, graphs)
    assert graphs.capture.captures == 1 and graphs.capture.replays == 2
    assert all(torch.equal(a, b) for a, b in zip(kept, compute_stage(model, first)))


@pytest.mark.parametrize("fault", ["slice", "copy-in", "padding"])
def test_the_check_catches_a_broken_runner(tiny_model, monkeypatch, fault):
    """The comparison can fail: outputs sliced one row off, inputs copied one row down, or a
    stage that lets its padding rows reach the real ones each make it fail."""
    model, _ = tiny_model()
    if fault == "slice":
        def call(self, *tensors):
            rows = tensors[0].shape[0]
            for static, tensor in zip(self.inputs, tensors):
                static.load(tensor)
            self.replay()
            return tuple(out[1:rows + 1].clone() for out in self.outputs)
        monkeypatch.setattr(GraphRunner, "__call__", call)
    elif fault == "copy-in":
        monkeypatch.setattr(StaticInput, "load", lambda self, source: self.tensor[1:source.shape[0] + 1].copy_(source))
    else:  # an op that mixes rows, eager and graphed alike: the padding rows reach the real ones
        real = layers.rms_norm
        monkeypatch.setattr(layers, "rms_norm", lambda x, w, eps: real(x, w, eps) + x.mean(0, keepdim=True))
    graphs = StageGraphs(model, 64, EagerReplay())
    work = stage_works(model, 3, torch.Generator().manual_seed(4))[1]  # a layer stage, 3 rows in a bucket of 4
    with pytest.raises(AssertionError):
        assert_same_result(model, work, graphs)


# -- through the engine and through Tier 1 ---------------------------------------------------
def _eager_replay_graphs(counter: list):
    def make(model, enabled, max_rows, capture=None):
        graphs = StageGraphs(model, max_rows, EagerReplay()) if enabled else None
        counter.append(graphs)
        return graphs
    return make


def test_engine_tokens_with_graphs_equal_tokens_without(tiny_model, monkeypatch):
    """Greedy, seeded and log-prob requests with prefill chunks sharing steps: graphs take the
    decode-only steps only, and change no token."""
    model, tok = tiny_model("qwen2_bias")
    requests = [request(f"g{i}", p, max_tokens=10, temperature=0, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    requests += [request(f"s{i}", p, max_tokens=7, temperature=0.9, top_k=40, seed=i, logprobs=2, ignore_eos=True)
                 for i, p in enumerate(PROMPTS)]
    made: list = []
    monkeypatch.setattr("glinthawk.engine.stage_graphs", _eager_replay_graphs(made))
    for kwargs in (dict(max_batch_tokens=4096), dict(max_batch_tokens=9, max_seqs=3)):
        expected, _ = run_engine(model, tok, requests, **kwargs)
        got, engine = run_engine(model, tok, requests, cuda_graphs=True, **kwargs)
        assert got == expected, kwargs
        capture = engine.graphs.capture
        assert capture.replays > 0 and capture.captures == len(engine.graphs.runners)
        # one runner per stage kind, layer and bucket: captured once, replayed on every later step
        assert capture.captures <= (model.config.num_layers + 2) * len(buckets(kwargs.get("max_seqs", 256)))
    assert Engine(model, tok, kv_tokens=64).graphs is None  # the switch off: no graphs


class _FailingEveryOther(EagerReplay):
    """A capture that fails every other time, as CUDA's does for an op it cannot capture."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def __call__(self, fn, inputs):
        self.attempts += 1
        if self.attempts % 2 == 0:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        return super().__call__(fn, inputs)


def test_a_stage_whose_capture_fails_runs_eagerly_with_one_warning(tiny_model, monkeypatch, caplog):
    model, tok = tiny_model("llama_gqa")
    requests = [request(f"g{i}", p, max_tokens=8, temperature=0, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    failing = _FailingEveryOther()
    monkeypatch.setattr("glinthawk.engine.stage_graphs",
                        lambda model, enabled, max_rows, capture=None:
                        StageGraphs(model, max_rows, failing) if enabled else None)
    expected, _ = run_engine(model, tok, requests)
    with caplog.at_level("DEBUG", logger="glinthawk.graphs"):
        got, engine = run_engine(model, tok, requests, cuda_graphs=True)
    assert got == expected
    eager = [key for key, runner in engine.graphs.runners.items() if runner is None]
    assert eager and len(eager) < len(engine.graphs.runners)
    assert failing.attempts == len(engine.graphs.runners)  # a failed stage is not captured again at every step
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "runs without graphs" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_tier1_tokens_with_graphs_equal_the_single_process(checkpoint, tmp_path, monkeypatch):
    """Tier 1 merges micro-batches at one stage into one job (its rows vary): through graphs,
    the two tiers still give the single process's tokens."""
    made: list = []
    monkeypatch.setattr("glinthawk.node.tier1.stage_graphs", _eager_replay_graphs(made))
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    expected = single_process(checkpoint, requests)
    summary, out = asyncio.run(distributed(checkpoint, requests, tmp_path / "out.jsonl", nodes=2, micro_batches=2,
                                           cuda_graphs=True))
    assert summary.failed == 0
    assert {k: v["token_ids"] for k, v in read_results(out).items()} == {k: v["token_ids"] for k, v in expected.items()}
    assert made and made[0] is not None and made[0].capture.replays > 0


def test_the_engine_bench_captures_before_the_timed_run(tiny_model, monkeypatch):
    """``bench engine --set cuda_graphs=on`` captures its batch's graphs in a short run first, so
    the timed run only replays them."""
    from glinthawk.bench import engine as bench_engine
    from glinthawk.bench.runs import run_engine as bench_run
    from glinthawk.bench.workloads import request_lines, token_prompts

    monkeypatch.setattr(bench_engine, "stage_graphs", _eager_replay_graphs([]))
    model, tok = tiny_model()
    lines = request_lines(token_prompts(4, 3, model.config.vocab_size), 6)
    graphs, seconds = bench_engine._captured_graphs(model, tok, lines, 40, 64, 4, True)
    captured = graphs.capture.captures
    assert captured > 0 and seconds > 0
    bench_run(model, tok, lines, kv_tokens=40, max_batch_tokens=64, max_seqs=4, graphs=graphs)
    assert graphs.capture.captures == captured and graphs.capture.replays > captured
    assert bench_engine._captured_graphs(model, tok, lines, 40, 64, 4, False) == (None, None)


def test_the_switch_reaches_the_engine_from_glinthawk_generate(checkpoint, model_dir, tmp_path, monkeypatch):
    """``glinthawk generate --cuda-graphs``: the engine is asked for graphs (on a CPU it gets none
    unless a capture is given; here the eager one), and the tokens are those of the default."""
    from click.testing import CliRunner

    from glinthawk.cli import main

    made: list = []
    monkeypatch.setattr("glinthawk.engine.stage_graphs", _eager_replay_graphs(made))
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    outputs = {}
    for switch in ("--no-cuda-graphs", "--cuda-graphs"):
        out = tmp_path / f"{switch}.jsonl"
        result = CliRunner().invoke(main, ["generate", str(requests), "-o", str(out), "--model", str(model_dir),
                                           "--dtype", "float32", "--no-progress", switch])
        assert result.exit_code == 0, result.output
        outputs[switch] = {k: v["token_ids"] for k, v in read_results(out).items()}
    assert made[0] is None and made[1] is not None and made[1].capture.replays > 0
    assert outputs["--cuda-graphs"] == outputs["--no-cuda-graphs"]
