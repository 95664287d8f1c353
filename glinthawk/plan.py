"""``glinthawk plan``: how many Tier 2 nodes to buy for a model and a workload, and what it costs.

A roofline model, with the efficiencies this project measured (docs/PERFORMANCE.md):

- Tier 1 runs a decode step of batch ``b`` in ``max(W / bw1, F * b / flops1)``: it reads the
  weights ``W`` once per step and does ``F = 2 * matmul parameters`` FLOPs per token at 80% of
  the device's peak (the projections and MLP reach 76-86% of it). Past the batch ``B*`` where the
  two meet, a larger batch buys nothing; below it, Tier 1 waits on its memory. So the plan runs
  ``B*`` sequences per micro-batch, which is also the cheapest per token (below ``B*`` throughput
  and KV room grow together; above it only KV room does). Prompt tokens cost ``F`` each too, less
  the LM head's share (only a prompt's last token is sampled).
- Tier 1 is kept busy with ``m = 1 + ceil(round trip / Tier 1's time per layer)`` micro-batches in
  flight (DESIGN.md), the round trip being the link's latency both ways, the q/k/v frame on the
  link, and Tier 2's attention. A sequence makes one token per cycle (Tier 1's step plus a round
  trip per layer), so by Little's law ``tokens/s x cycle`` sequences run at once.
- Each of them reserves ``prompt + output`` tokens of KV on one Tier 2 node; a node holds
  ``(memory - 1 GiB) / 1.045`` bytes of KV (its RSS is 1.045 x KV + a fixed part), and reads its
  K/V once per generated token at 90% of its memory bandwidth (decode attention reaches 86-95%).
  Nodes are bought for whichever is larger: the KV room, or the bandwidth to read it at the
  throughput Tier 1 makes. Tier 1's network link caps the throughput too (q, k, v out and the
  attention back, every layer, every token).
- The single-tier layout for comparison keeps the KV on the accelerator beside the weights:
  its batch is what fits there, and its steps read that KV too.

It predicts upper bounds for a well-fed cluster: Python overheads, prefill attention and
stragglers are left out, so measured figures come lower (on loopback, two-tier reached 0.70-0.83
of a single process, docs/PERFORMANCE.md). ``plan_loopback`` adds those fixed costs, measured, to
check the model against runs on one machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from glinthawk.compute.config import ModelConfig

GiB = 2**30
TIER1_USABLE = 0.9  # of the accelerator's memory for weights (and KV, single-tier): the rest is activations
TIER1_EFFICIENCY = 0.8  # of peak FLOP/s that Tier 1's matmuls reach
TIER2_FIXED = GiB  # of a Tier 2 node's memory for the OS and the process beside its KV
TIER2_KV_OVERHEAD = 1.045  # a Tier 2 node's RSS per byte of KV (measured)
ATTENTION_EFFICIENCY = 0.9  # of a Tier 2 node's memory bandwidth that decode attention reads at
LEAST_BUSY = 0.5  # below this share of its time busy, the link's latency is not hidden: refuse
MOST_MICRO_BATCHES = 256


class PlanError(ValueError):
    """The inputs admit no sensible plan; the message says why and what would."""


@dataclass(frozen=True)
class Machine:
    memory: int  # bytes
    price: float  # per hour
    bandwidth: float  # memory read, bytes/s
    flops: float = 0.0  # peak FLOP/s (Tier 1)


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    output_tokens: int
    requests: int
    latency_s: float = 0.0  # one way, between the tiers
    link: float = 1e9  # Tier 1's network, bytes/s each way


@dataclass(frozen=True)
class Layout:
    name: str
    tier2_nodes: int
    batch: int  # sequences running at once
    micro_batches: int
    kv_per_node: int  # bytes of KV to give each Tier 2 node (--kv-memory); single-tier: on the accelerator
    tokens_per_s: float  # generated tokens
    cost_per_hour: float
    bound: str  # what limits the throughput
    busy: float  # share of its time Tier 1 computes

    @property
    def cost_per_million(self) -> float:
        return self.cost_per_hour / (self.tokens_per_s * 3600) * 1e6


@dataclass(frozen=True)
class Model:
    """What the plan needs of a checkpoint: sizes in bytes, FLOPs per token."""

    weights: int
    flops_per_token: int
    kv_per_token: int
    wire_per_token: int  # what goes Tier 1 -> Tier 2 for one token, all layers (q, k, v)
    layers: int
    max_tokens: int
    head_flops: int = 0  # of flops_per_token: the LM head's, which a prompt spends on its last token only

    @classmethod
    def of(cls, config: ModelConfig, itemsize: int) -> "Model":
        h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
        head = config.vocab_size * h
        parameters = config.num_layers * (per_layer + 2 * h) + h + head + (0 if config.tie_word_embeddings else head)
        return cls(weights=parameters * itemsize, flops_per_token=2 * (config.num_layers * per_layer + head),
                   kv_per_token=config.kv_bytes_per_token(itemsize),
                   wire_per_token=config.num_layers * (q + 2 * kv) * itemsize, layers=config.num_layers,
                   max_tokens=config.max_position_embeddings, head_flops=2 * head)


def plan(model: Model, tier1: Machine, tier2: Machine, work: Workload) -> tuple[Layout, Layout | None]:
    """The two-tier layout to buy and the single-tier one to compare with (None: it holds no sequence)."""
    _check(model, tier1, tier2, work)
    # More nodes shorten the round trip, so fewer sequences need room: what ``nodes`` call for never
    # grows with ``nodes``, and the fewest that suffice are found by doubling, then bisecting.
    high = 1
    while _two_tier(model, tier1, tier2, work, high).tier2_nodes > high:
        high *= 2
    low = high // 2 + 1 if high > 1 else 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if _two_tier(model, tier1, tier2, work, middle).tier2_nodes <= middle else (
            middle + 1, high)
    two_tier = _two_tier(model, tier1, tier2, work, high)
    kv = two_tier.batch * (work.prompt_tokens + work.output_tokens) * model.kv_per_token
    two_tier = dataclasses.replace(two_tier, tier2_nodes=high, cost_per_hour=tier1.price + high * tier2.price,
                                   kv_per_node=math.ceil(kv / high))
    if two_tier.micro_batches > MOST_MICRO_BATCHES:
        raise PlanError(f"a {work.latency_s * 1e3:g} ms link cannot be hidden: Tier 1 would need "
                        f"{two_tier.micro_batches} micro-batches in flight (more than {MOST_MICRO_BATCHES}); "
                        "bring the tiers closer")
    if two_tier.bound == UNFILLED:
        raise PlanError(f"a {work.latency_s * 1e3:g} ms link cannot be hidden for this workload: Tier 1 needs "
                        f"{_needed(model, tier1, tier2, work, high)} sequences in flight to stay busy, the workload "
                        f"has {work.requests} requests, so it would compute {two_tier.busy:.0%} of the time; bring "
                        "the tiers closer, or plan a larger workload")
    return two_tier, _single_tier(model, tier1, work)


UNFILLED = "too few requests in flight"


def _t1_tokens_s(model: Model, tier1: Machine, work: Workload) -> float:
    """Generated tokens/s of a Tier 1 that computes all the time (prompt tokens cost as much, but
    for the LM head: only a prompt's last token is sampled)."""
    per_request = work.prompt_tokens * _prompt_flops(model) + work.output_tokens * model.flops_per_token
    return tier1.flops * TIER1_EFFICIENCY * work.output_tokens / per_request


def _prompt_flops(model: Model) -> int:
    return model.flops_per_token - model.head_flops


def _timing(model: Model, tier1: Machine, tier2: Machine, work: Workload, nodes: int) -> tuple[int, float, float]:
    """B* (the batch where Tier 1's compute meets its weight reads), its step's seconds, and one
    layer's round trip from Tier 1 and back with ``nodes`` Tier 2 nodes."""
    flops = tier1.flops * TIER1_EFFICIENCY
    weights_s = model.weights / tier1.bandwidth  # a step's floor: the weights read once
    batch = max(1, math.ceil(weights_s * flops / model.flops_per_token))
    step_s = max(weights_s, batch * model.flops_per_token / flops)
    context = work.prompt_tokens + (work.output_tokens + 1) / 2  # the average a decode step attends over
    attention_s = batch * context * model.kv_per_token / (nodes * tier2.bandwidth * ATTENTION_EFFICIENCY)
    # the sizes above are for all layers; the round trip is one layer's
    return batch, step_s, 2 * work.latency_s + (batch * model.wire_per_token / work.link + attention_s) / model.layers


def _needed(model: Model, tier1: Machine, tier2: Machine, work: Workload, nodes: int) -> int:
    """Sequences in flight for Tier 1 (or its link) to run flat out: a sequence makes a token per
    cycle, Tier 1's step plus a round trip per layer (Little's law)."""
    _, step_s, round_trip = _timing(model, tier1, tier2, work, nodes)
    seq_tokens = work.prompt_tokens + work.output_tokens
    wanted = min(_t1_tokens_s(model, tier1, work), work.link * work.output_tokens / (model.wire_per_token * seq_tokens))
    return max(1, math.ceil(wanted * (step_s + model.layers * round_trip)))


def _two_tier(model: Model, tier1: Machine, tier2: Machine, work: Workload, nodes: int) -> Layout:
    """The layout with ``nodes`` Tier 2 nodes; its ``tier2_nodes`` is how many it calls for."""
    batch, step_s, round_trip = _timing(model, tier1, tier2, work, nodes)
    seq_tokens = work.prompt_tokens + work.output_tokens
    context = work.prompt_tokens + (work.output_tokens + 1) / 2
    t1_tokens_s = _t1_tokens_s(model, tier1, work)
    link_tokens_s = work.link * work.output_tokens / (model.wire_per_token * seq_tokens)
    micro = 1 + math.ceil(round_trip / (step_s / model.layers))  # DESIGN.md: 1 + round trip / Tier 1's layer
    wanted = min(t1_tokens_s, link_tokens_s)
    needed = _needed(model, tier1, tier2, work, nodes)
    running = min(needed, work.requests)
    tokens_s = wanted * running / needed
    kv = running * seq_tokens * model.kv_per_token
    node_kv = int((tier2.memory - TIER2_FIXED) / TIER2_KV_OVERHEAD)
    for_reads = math.ceil(tokens_s * context * model.kv_per_token / (tier2.bandwidth * ATTENTION_EFFICIENCY))
    calls_for = max(1, math.ceil(kv / node_kv), for_reads)
    bound = UNFILLED if running / needed < LEAST_BUSY else (
        "Tier 1's network link" if link_tokens_s < t1_tokens_s else "Tier 1 compute")
    return Layout("two-tier", calls_for, running, micro, math.ceil(kv / calls_for), tokens_s,
                  tier1.price + calls_for * tier2.price, bound, tokens_s / t1_tokens_s)


def _single_tier(model: Model, tier1: Machine, work: Workload) -> Layout | None:
    """Weights and KV on the accelerator: the batch is what its memory holds beside the weights."""
    flops = tier1.flops * TIER1_EFFICIENCY
    context = work.prompt_tokens + (work.output_tokens + 1) / 2
    seq_kv = (work.prompt_tokens + work.output_tokens) * model.kv_per_token
    batch = min(work.requests, int((tier1.memory * TIER1_USABLE - model.weights) // seq_kv))
    if batch < 1:
        return None
    step_s = max((model.weights + batch * context * model.kv_per_token) / tier1.bandwidth,
                 batch * model.flops_per_token / flops)
    per_token_s = (work.prompt_tokens * _prompt_flops(model) / flops + work.output_tokens * step_s / batch)
    tokens_s = work.output_tokens / per_token_s
    compute_s = batch * model.flops_per_token / flops
    bound = "Tier 1 compute" if step_s == compute_s else "accelerator memory"
    busy = tokens_s / _t1_tokens_s(model, tier1, work)
    return Layout("single-tier", 0, batch, 1, batch * seq_kv, tokens_s, tier1.price, bound, busy)


def _check(model: Model, tier1: Machine, tier2: Machine, work: Workload) -> None:
    if min(tier1.price, tier2.price) <= 0:
        raise PlanError("prices must be above 0 per hour")
    if min(tier1.bandwidth, tier2.bandwidth, tier1.flops, work.link) <= 0:
        raise PlanError("bandwidths and FLOP/s must be above 0")
    if min(work.prompt_tokens, work.output_tokens, work.requests) < 1 or work.latency_s < 0:
        raise PlanError("prompt and output lengths and the request count must be at least 1, the latency >= 0")
    if model.weights > tier1.memory * TIER1_USABLE:
        raise PlanError(f"the weights ({model.weights / GiB:.1f} GiB) do not fit one Tier 1 "
                        f"({TIER1_USABLE:.0%} of {tier1.memory / GiB:.1f} GiB is usable for them): cut it into "
                        "pipeline stages over several accelerators (--layers), or take a larger one or a smaller dtype")
    seq_tokens = work.prompt_tokens + work.output_tokens
    if seq_tokens > model.max_tokens:
        raise PlanError(f"prompt + output ({seq_tokens} tokens) exceeds the model's context of {model.max_tokens}")
    node_kv = (tier2.memory - TIER2_FIXED) / TIER2_KV_OVERHEAD
    if seq_tokens * model.kv_per_token > node_kv:
        raise PlanError(f"one sequence's KV ({seq_tokens * model.kv_per_token / GiB:.2f} GiB) does not fit a Tier 2 "
                        f"node of {tier2.memory / GiB:.1f} GiB (of which {max(node_kv, 0) / GiB:.2f} GiB holds KV): "
                        "take nodes with more memory, or shorter sequences")

