"""One step of a batch of sequences through the model: the core both engines share.

A step is stage 0 (embedding and layer 0's q, k, v), then per layer: attention, and the
next stage (that layer's post-attention fused with the next one's pre-attention), and at
the end the head and the sampler for the rows that are sampled. ``run_step`` says that
once; where the work runs is plugged in:

- ``compute(work)`` runs one stage: on Tier 1, the ``StageMerger`` that merges the
  micro-batches ready at the same stage into one job; in the single process, at once.
- ``attend(layer, q, k, v)``: on Tier 1, a round trip to the Tier 2 nodes; in the single
  process, the local KV store.

The single-process engine drives the coroutine with ``run_now``: nothing it awaits ever
suspends, so it stays a plain loop that the tests can trust as their oracle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from glinthawk.compute.graphs import StageGraphs, decode_only
from glinthawk.compute.loader import Model
from glinthawk.compute.logprobs import Sampled
from glinthawk.compute.rope import Rotary, rotary
from glinthawk.compute.sampling import SamplingParams
from glinthawk.compute.stages import final_stage, hand_off_stage, layer_stage
from glinthawk.sequence import StepBatch

if TYPE_CHECKING:
    from glinthawk.node.chain import StageBatch

T = TypeVar("T")


@dataclass
class StageWork:
    """One batch's input to one stage. ``x`` stays on the model's device between stages."""

    stage: int
    rot: Rotary  # the step's cos/sin (on the model's device), computed once for all its stages
    token_ids: torch.Tensor | None = None  # stage 0
    x: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    sample_rows: torch.Tensor | None = None  # final stage
    params: Seq[SamplingParams] = ()
    seeds: Seq[int] = ()
    steps: Seq[int] = ()
    # Final stage, only where requests ask for prompt_logprobs: the prompt rows to score, the
    # token each is scored on, and how many alternatives each wants.
    score_rows: torch.Tensor | None = None
    score_tokens: torch.Tensor | None = None
    score_top: Seq[int] = ()
    # Final stage, only where requests ask for structured output: which sampled rows
    # (indices into ``params``) are constrained, and their allowed-token bitmasks.
    mask_rows: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    decode: bool = False  # every sequence runs one token (compute/graphs.py takes only these)
    future: asyncio.Future | None = field(default=None, repr=False)  # where a merger answers it
    seconds: float = 0.0  # its share of the compute job it ran in (set by the merger)

    @property
    def rows(self) -> int:
        return int(self.rot.cos.shape[0])


Compute = Callable[[StageWork], Awaitable[Any]]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Awaitable[torch.Tensor]]


async def run_step(model: Model, batch: StepBatch | StageBatch, compute: Compute, attend: Attend,
                   x: torch.Tensor | None = None) -> Sampled | torch.Tensor:
    """The next token of every sampled sequence of ``batch`` (and the log-probs its requests
    ask for), or, on a pipeline stage before the model's last, the hidden states to hand on;
    ``x``: those the stage before handed on (a stage after the first)."""
    layers = model.layer_range
    rot = rotary(model.inv_freq, batch.positions.to(model.device), model.dtype)
    decode = decode_only(batch.counts)
    x, q, k, v = await compute(StageWork(layers.start, rot, token_ids=batch.token_ids if model.is_first else None,
                                         x=x, decode=decode))
    for layer in layers:
        out = await attend(layer, q, k, v)
        if layer + 1 < layers.stop:
            x, q, k, v = await compute(StageWork(layer + 1, rot, x=x, attn_out=out, decode=decode))
    if not model.is_last:
        return await compute(StageWork(layers.stop, rot, x=x, attn_out=out, decode=decode))
    if not len(batch.sample_rows) and batch.score_rows is None:
        return Sampled.empty()
    params, seeds, steps = batch.sampling()
    return await compute(StageWork(layers.stop, rot, x=x, attn_out=out, sample_rows=batch.sample_rows,
                                   params=params, seeds=seeds, steps=steps, score_rows=batch.score_rows,
                                   score_tokens=batch.score_tokens, score_top=batch.score_top,
                                   mask_rows=batch.mask_rows, masks=batch.masks, decode=decode))


def compute_stage(model: Model, work: StageWork, graphs: StageGraphs | None = None) -> Any:
    """Run one stage in this thread: (x, q, k, v) on the model's device; at the end of the
    model the sampled tokens, at the end of a pipeline stage before it the hidden states.
    ``graphs``: run it through CUDA graphs where they take it (decode-only jobs)."""
    if graphs is not None and graphs.takes(work):
        return graphs.compute(work)
    device = model.device
    attn_out = work.attn_out.to(device) if work.attn_out is not None else None
    if work.stage == model.config.num_layers:
        scoring = None if work.score_rows is None else (work.score_rows.to(device), work.score_tokens,
                                                        work.score_top)
        masking = None if work.mask_rows is None else (work.mask_rows, work.masks)
        return final_stage(model, work.x, attn_out, work.sample_rows.to(device), work.params, work.seeds,
                           work.steps, scoring, masking)
    if work.stage == model.layer_range.stop:
        return hand_off_stage(model, work.x, attn_out)
    if work.stage == 0:
        return layer_stage(model, 0, work.rot, token_ids=work.token_ids.to(device))
    return layer_stage(model, work.stage, work.rot, x=work.x.to(device), attn_out=attn_out)


def run_now(step: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (an in-process step)."""
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    step.close()
    raise RuntimeError("an in-process step suspended; its compute and attention must not await")
