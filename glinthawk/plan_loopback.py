"""The planner's model applied to a ``glinthawk run`` on one machine (loopback), to check it against runs.

``plan.plan`` sizes a well-fed cluster from a roofline; on loopback with a small model the fixed
costs it leaves out are most of a step, so this adds them, each measured on the host
(``plan_measure.measure_host``), never fitted to the runs it predicts:

- Tier 1's step of a micro-batch of ``r`` rows: ``step_s + FLOPs / (peak * TIER1_EFFICIENCY)``, the
  planner's roofline term plus a fixed part (the engine's step of one row, less its FLOPs); a
  prompt row skips the LM head but for each prompt's last.
- Each layer of each micro-batch sends one frame to every Tier 2 node and waits for the answers.
  A frame round trip between two processes (``round_trip_s``) costs Tier 1 ``message_s`` of CPU,
  plus a read of the frame's bytes on each side (``read_bandwidth``); a delay adds 2 x (delay +
  asyncio's timer slack), and an answer that lands while Tier 1 computes another job waits for it.
- ``m`` micro-batches in flight (DESIGN.md): a sequence's cycle is its micro-batch's Tier 1 work
  plus a round trip per layer; Tier 1 computes all ``m`` in turn. A step takes the longer of the
  two, or of the CPU work of every process over the machine's cores (they share them).
- On a shared machine, every figure is slowed by the fair share of the cores that the cluster's
  busy threads get beside ``others`` (measured during the run, as the other processes' load).
- The prompt step is one such step with ``prompt`` rows per sequence; then ``output - 1``
  decode steps (the prompt step samples the first token), after Tier 1's gathering pause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glinthawk.node.microbatch import GATHER_QUIET_S
from glinthawk.plan import ATTENTION_EFFICIENCY, TIER1_EFFICIENCY, Model


# A delayed frame is written by a timer, and asyncio's epoll waits in whole milliseconds, rounded up:
# each one leaves half of one late on average.
TIMER_S = 1e-3


@dataclass(frozen=True)
class Host:
    """One machine's figures, as a loopback node sees them (one compute thread per process)."""

    matmul_peak: float  # FLOP/s of one thread in the run's dtype
    read_bandwidth: float  # bytes/s
    step_s: float  # Tier 1's fixed time per step, beyond its FLOPs
    round_trip_s: float  # wall time of a small frame there and back between two processes
    message_s: float  # the sender's CPU time per such round trip
    cores: int
    others: float = 0.0  # threads of other processes on the CPUs meanwhile (a shared machine)


@dataclass(frozen=True)
class LoopbackRun:
    """A ``glinthawk run`` configuration: every request submitted at once, all of one length. Each node
    computes on one thread: Tier 2 nodes as ``glinthawk run`` gives them; Tier 1, which it gives every
    core with one stage, held to one (``LocalCluster(tier1_threads=1)``) where this is checked."""

    tier2_nodes: int
    requests: int
    prompt_tokens: int
    output_tokens: int
    micro_batches: int
    delay_s: float = 0.0  # one way (--inject-delay-ms)
    max_batch_tokens: int = 2048  # rows of one Tier 1 job (--max-batch-tokens)


@dataclass(frozen=True)
class Prediction:
    tokens_per_s: float
    prompt_step_s: float
    decode_step_s: float
    bound: str  # what sets the decode step: "Tier 1", "round trips" or "cores"


def predict(model: Model, host: Host, run: LoopbackRun) -> Prediction:
    """Generated tokens/s of ``run`` on ``host``, timed from submit to the last result."""
    prompt_s, _ = _step(model, host, run, run.prompt_tokens, run.prompt_tokens)
    context = run.prompt_tokens + run.output_tokens / 2  # the mean a decode step attends over
    decode_s, bound = _step(model, host, run, 1, context)
    total = GATHER_QUIET_S + prompt_s + (run.output_tokens - 1) * decode_s
    return Prediction(run.requests * run.output_tokens / total, prompt_s, decode_s, bound)


def _step(model: Model, host: Host, run: LoopbackRun, tokens: int, context: float) -> tuple[float, str]:
    """Seconds of one step of every micro-batch (``tokens`` rows per sequence), and what bounds it."""
    nodes, layers = run.tier2_nodes, model.layers
    # Each micro-batch is a job of its own on Tier 1: merging those at one stage (node/merger.py) takes
    # answers that land together, and across processes they land apart (measured: one job per micro-batch).
    jobs = run.micro_batches
    sequences = run.requests / jobs
    rows = sequences * tokens
    frames = nodes  # a job's frames per layer: one per node
    flops = rows * model.flops_per_token - (rows - sequences) * model.head_flops  # a prompt's last token only
    compute = math.ceil(rows / run.max_batch_tokens) * host.step_s + flops / (host.matmul_peak * TIER1_EFFICIENCY)
    # each side reads a frame's bytes once: the q/k/v out, the attention (q's size) back
    frame = rows * model.wire_per_token / layers / frames * (1 + 1 / 3)
    send = host.message_s + frame / host.read_bandwidth  # Tier 1's CPU per frame
    attention = sequences * context * model.kv_per_token / layers / (nodes * host.read_bandwidth * ATTENTION_EFFICIENCY)
    tier1 = compute + layers * frames * send  # Tier 1's CPU for one job's step
    tier2 = layers * frames * (send + attention)  # every node's, together
    busy, step, bound = 1.0, 0.0, ""
    for _ in range(20):  # the step's length and how busy it keeps the cluster depend on each other
        # The figures are for a core of one's own; beside ``others`` (a shared machine), the cluster's
        # threads that compute at once (``busy`` on average) get their fair share of the cores.
        slow = 1 / min(1.0, host.cores / (busy + host.others))
        # Tier 1 computes on its event loop's thread: an answer (and, with a delay, a frame held back
        # until due) that lands while it computes waits for the rest of that layer's work, half of it on average.
        computing = min(1.0, (jobs - 1) * slow * tier1 / step) if step else 0.0  # another job computing
        waits = (1 + (run.delay_s > 0)) * computing * slow * tier1 / layers / 2
        delay = run.delay_s + (TIMER_S / 2 if run.delay_s else 0.0)
        round_trip = (2 * delay + slow * (host.round_trip_s + (frames - 1) * send + frame / host.read_bandwidth)
                      + attention + waits)
        candidates = {"round trips": slow * compute + layers * round_trip, "Tier 1": jobs * slow * tier1,
                      "cores": jobs * slow * (tier1 + tier2) / host.cores}
        bound = max(candidates, key=candidates.__getitem__)
        step = candidates[bound]
        busy = min(1.0 + nodes, max(1.0, jobs * slow * (tier1 + tier2) / step))
    return step, bound
