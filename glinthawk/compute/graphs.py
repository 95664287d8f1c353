"""CUDA graphs for Tier 1's decode stages: one captured graph per (stage, bucketed row count).

A decode step of a small model on a GPU is bound by kernel launches, not by the GPU
(docs/PERFORMANCE.md, "On a GPU"). Replaying a captured graph launches a stage's kernels
in one call. A graph has fixed shapes and addresses, so each graph runs on static input
buffers of a bucket's row count (1, 2, 4, 8, ...): a job's rows are copied in, the rows
past them are zeros, and the outputs are the first rows of the static outputs, copied out
(the next replay overwrites them). Every Tier 1 stage works row by row (attention is on
Tier 2), so padding rows cannot reach real ones; the CPU tests check that bit for bit.

What is data-dependent stays outside the graphs: the host-to-device copies of a job's
inputs, picking the sampled rows, and the whole sampler (Python over each row's params,
``.cpu()``); the head's logits come from a graph, the draw from them does not.

Only decode-only jobs (one new token per sequence) take graphs; prefill chunks are large,
bound by the GPU's arithmetic, and run eagerly as before. The capture itself is a strategy
(``CudaGraphCapture`` on a GPU, ``EagerReplay`` elsewhere), so the copy-in/copy-out path
runs in the CPU tests. A stage whose capture fails (an op CUDA cannot capture, memory) runs
eagerly from then on, with one warning: graphs are a speed-up, never a reason to stop a run.
Untested on GPU hardware so far: ``cuda_graphs`` is off by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from glinthawk.compute.layers import head, post_attention
from glinthawk.compute.loader import Model
from glinthawk.compute.rope import Rotary
from glinthawk.compute.stages import head_and_sample, layer_stage

if TYPE_CHECKING:
    from glinthawk.step import StageWork

log = logging.getLogger("glinthawk.graphs")

Tensors = tuple[torch.Tensor, ...]
StageFn = Callable[..., Tensors]
Replay = Callable[[], None]


def bucket(rows: int) -> int:
    """The row count a job of ``rows`` rows runs at: the next power of two (at least 1)."""
    return 1 << max(0, rows - 1).bit_length()


def buckets(max_rows: int) -> list[int]:
    """Every bucket a job of at most ``max_rows`` rows can run at, smallest first."""
    return [1 << i for i in range(bucket(max_rows).bit_length())]


class Capture(Protocol):
    """Makes a replayable ``fn`` over fixed ``inputs``: returns (replay, static outputs), where
    each ``replay()`` recomputes the outputs, in place, from what the inputs hold then."""

    def __call__(self, fn: StageFn, inputs: Tensors) -> tuple[Replay, Tensors]: ...


class EagerReplay:
    """The capture for CPUs and tests: runs ``fn`` at each replay and copies its results into
    static outputs, the same copy-in/replay/copy-out path a CUDA graph takes."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def __call__(self, fn: StageFn, inputs: Tensors) -> tuple[Replay, Tensors]:
        self.captures += 1
        outputs = tuple(t.clone() for t in fn(*inputs))  # its own memory, as a graph's outputs are

        def replay() -> None:
            self.replays += 1
            for static, fresh in zip(outputs, fn(*inputs)):
                static.copy_(fresh)

        return replay, outputs


class CudaGraphCapture:
    """A ``torch.cuda.CUDAGraph`` per call, after ``warm_up`` eager runs on a side stream (they
    initialize cuBLAS and the allocator's blocks); every graph shares one memory pool."""

    def __init__(self, warm_up: int = 3) -> None:
        self.warm_up = warm_up
        self.captures = 0
        self._pool: Any = None
        self._graphs: list[torch.cuda.CUDAGraph] = []  # kept alive as long as their outputs are used

    def __call__(self, fn: StageFn, inputs: Tensors) -> tuple[Replay, Tensors]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warm_up):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: on Tier 1 the event loop's thread puts small copies on the GPU meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = tuple(fn(*inputs))
        self._graphs.append(graph)
        self.captures += 1
        return graph.replay, outputs


class StaticInput:
    """A static input buffer of one bucket; the rows past the last job's are kept zero."""

    def __init__(self, rows: int, like: torch.Tensor, device: torch.device) -> None:
        self.tensor = torch.zeros((rows, *like.shape[1:]), dtype=like.dtype, device=device)
        self.filled = 0  # rows [0, filled) may hold a job's values; the rest are zero

    def load(self, source: torch.Tensor) -> None:
        rows = source.shape[0]
        self.tensor[:rows].copy_(source)
        if rows < self.filled:  # the last job's rows past this one's become padding again
            self.tensor[rows:self.filled].zero_()
        self.filled = rows


class GraphRunner:
    """One stage function at one bucket: its static inputs, its replay and static outputs."""

    def __init__(self, fn: StageFn, inputs: Sequence[StaticInput], capture: Capture) -> None:
        self.inputs = tuple(inputs)
        self.rows = self.inputs[0].tensor.shape[0]
        self.replay, self.outputs = capture(fn, tuple(i.tensor for i in self.inputs))

    def __call__(self, *tensors: torch.Tensor) -> Tensors:
        rows = tensors[0].shape[0]
        if rows > self.rows:
            raise ValueError(f"{rows} rows do not fit a graph of {self.rows}")
        for static, tensor in zip(self.inputs, tensors):
            static.load(tensor)
        self.replay()
        return tuple(out[:rows].clone() for out in self.outputs)  # the next replay overwrites them


def decode_only(counts: Sequence[int]) -> bool:
    """Whether a step's sequences each run one token (what takes graphs)."""
    return bool(counts) and all(count == 1 for count in counts)


class StageGraphs:
    """The graphed stages of one model: runners made on first use per (stage kind, layer,
    bucket, input shapes), static inputs shared by the runners of one bucket."""

    def __init__(self, model: Model, max_rows: int, capture: Capture | None = None) -> None:
        self.model = model
        self.max_rows = bucket(max_rows)
        self.capture = capture if capture is not None else CudaGraphCapture()
        self.runners: dict[tuple, GraphRunner | None] = {}  # None: its capture failed, it runs eagerly
        self._inputs: dict[tuple, StaticInput] = {}

    def takes(self, work: StageWork) -> bool:
        """Whether ``work`` runs through graphs: a decode-only job that fits the largest bucket
        (a final stage that scores prompt rows never is one; it is checked all the same)."""
        return work.decode and work.score_rows is None and 0 < work.rows <= self.max_rows

    def compute(self, work: StageWork) -> Any:
        """``step.compute_stage`` through graphs, with the same results."""
        model, (cos, sin) = self.model, work.rot
        device = model.device
        attn_out = work.attn_out.to(device) if work.attn_out is not None else None
        if work.stage == model.config.num_layers:
            return self._final(work, attn_out)
        if work.stage == model.layer_range.stop:
            return self.run("post", work.stage - 1, work.x, attn_out)[0]
        if work.stage == 0:
            return self.run("first", 0, work.token_ids, cos, sin)
        if attn_out is None:  # a pipeline stage's first layer: the hidden states handed on
            return self.run("entry", work.stage, work.x, cos, sin)
        return self.run("layer", work.stage, work.x, attn_out, cos, sin)

    def _final(self, work: StageWork, attn_out: torch.Tensor) -> Any:
        rows = work.sample_rows.to(self.model.device)
        last = self.model.config.num_layers - 1
        (h,) = self.run("post", last, work.x.index_select(0, rows), attn_out.index_select(0, rows))
        masking = None if work.mask_rows is None else (work.mask_rows, work.masks)
        return head_and_sample(self.model, h, work.params, work.seeds, work.steps, masking,
                               head_fn=lambda x: self.run("head", None, x)[0])

    def run(self, kind: str, layer: int | None, *tensors: torch.Tensor) -> Tensors:
        """Stage function ``kind`` (of ``layer``) on ``tensors`` (rows first), through its runner."""
        rows = bucket(tensors[0].shape[0])
        shapes = tuple((t.dtype, tuple(t.shape[1:])) for t in tensors)
        key = (kind, layer, rows, shapes)
        if key not in self.runners:
            self.runners[key] = self._runner(kind, layer, rows, tensors)
        runner = self.runners[key]
        return runner(*tensors) if runner is not None else stage_fn(self.model, kind, layer)(*tensors)

    def _runner(self, kind: str, layer: int | None, rows: int, tensors: Sequence[torch.Tensor]) -> GraphRunner | None:
        inputs = [self._input(rows, index, t) for index, t in enumerate(tensors)]
        try:
            return GraphRunner(stage_fn(self.model, kind, layer), inputs, self.capture)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            first = not any(runner is None for runner in self.runners.values())
            (log.warning if first else log.debug)(
                "CUDA graph capture failed for stage %s%s at %d rows (%s); it runs without graphs (turn them off "
                "with --no-cuda-graphs to skip the attempts)", kind, "" if layer is None else f" {layer}", rows,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None

    def _input(self, rows: int, index: int, like: torch.Tensor) -> StaticInput:
        """The static buffer for argument ``index`` at ``rows``: one per shape, shared by every
        runner (each copies its inputs in before it replays)."""
        key = (rows, index, like.dtype, tuple(like.shape[1:]))
        if key not in self._inputs:
            self._inputs[key] = StaticInput(rows, like, self.model.device)
        return self._inputs[key]


def stage_fn(model: Model, kind: str, layer: int | None) -> StageFn:
    """The pure tensor function a graph captures for stage ``kind``; each returns a tuple."""
    if kind == "first":
        return lambda token_ids, cos, sin: layer_stage(model, 0, Rotary(cos, sin), token_ids=token_ids)
    if kind == "layer":
        return lambda x, attn_out, cos, sin: layer_stage(model, layer, Rotary(cos, sin), x=x, attn_out=attn_out)
    if kind == "entry":
        return lambda x, cos, sin: layer_stage(model, layer, Rotary(cos, sin), x=x)
    if kind == "post":
        return lambda x, attn_out: (post_attention(model, model.layer(layer), x, attn_out),)
    if kind == "head":
        return lambda x: (head(model, x),)
    raise ValueError(f"no stage function {kind!r}")


def stage_graphs(model: Model, enabled: bool, max_rows: int, capture: Capture | None = None) -> StageGraphs | None:
    """The graphs a Tier 1 (or the engine) runs its decode stages through: None unless
    ``enabled`` and the model is on CUDA, or a ``capture`` is given (tests: ``EagerReplay``)."""
    if not enabled or (capture is None and model.device.type != "cuda"):
        return None
    return StageGraphs(model, max_rows, capture)
