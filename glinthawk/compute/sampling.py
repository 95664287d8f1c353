"""Token sampling for a batch of sequences, each with its own parameters.

Randomness is counter-based: the uniform number a sequence uses at generation step ``s``
is a hash of ``(seed, s)``. A seeded request therefore draws the same numbers no matter
which other requests share its batch, which micro-batch it rides in, or how often it was
rebuilt after a node failure. The draw is turned into a token by inverse-CDF over the
filtered distribution, in vocabulary order.

On the CPU the random rows go to the C loop in ``_sampling.c`` (its filters find their
thresholds by selection, not by sorting the vocabulary); the torch expressions below do
the same elsewhere (CUDA, float16, no C compiler at install time). The two agree but for
float rounding at a filter's edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from glinthawk.stops import check_stop_limits
from glinthawk.threads import hook_openmp
from glinthawk.compute import cbind, elementwise
from glinthawk.compute.cbind import _sampling  # None where not built (the benchmark sets it so)
from glinthawk.compute.logprobs import MAX_LOGPROBS

hook_openmp(_sampling)  # slices of rows on torch's threads, else in turn


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI/vLLM defaults)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Log-probs (of the raw distribution, before temperature and filters: compute/logprobs.py):
    # of each generated token with this many alternatives, and of each prompt token after the first.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Python API only (vLLM's field): {"json": schema} / {"regex": ...} / {"choice": [...]} /
    # {"json_object": true}, sent as the line's ``structured_outputs``; the sampler never reads it.
    structured_outputs: dict | None = field(default=None, compare=False)
    # Python API only (vLLM's field): choices per prompt, sent as the line's ``n``; the sampler never reads it.
    n: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token), "
                                 f"got {value!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, dict):
            raise ValueError("structured_outputs must be a dict such as {'json': schema} or {'regex': pattern}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens must be a positive integer (0 only scores a prompt: with prompt_logprobs, "
                             "or echo on /v1/completions), got 0")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        check_stop_limits(self.stop, self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows any number of digits)
        return False


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def uniforms(seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """One float64 in [0, 1) per (seed, step), independent of everything else in the batch."""
    seed_arr = np.asarray([s & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64)
    step_arr = np.asarray(steps, dtype=np.uint64)
    mixed = _splitmix64(_splitmix64(seed_arr) ^ step_arr)
    return torch.from_numpy((mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [rows, vocab]; returns int64 [rows] on CPU.

    Greedy rows take the argmax of the logits as they are (a bf16 model's bf16 logits
    widen to float32 exactly); the others are sampled in float32.
    ``seeds[i]`` is row i's effective seed (the request's, or one drawn at admission),
    ``steps[i]`` the index of the token being generated.
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [rows, vocab] with a vocabulary, got shape {list(logits.shape)}")
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    some_greedy = len(random_rows) < len(params)
    if some_greedy:
        tokens = elementwise.argmax(logits)
    else:
        tokens = torch.empty(len(params), dtype=torch.int64)
    if not random_rows:
        return tokens
    chosen = [params[i] for i in random_rows]
    draws = uniforms([seeds[i] for i in random_rows], [steps[i] for i in random_rows])
    if _sampling is not None and elementwise.fits(logits):
        _sample_in_c(logits.contiguous(), random_rows, chosen, draws, tokens)
        return tokens
    temperature = torch.tensor([p.temperature for p in chosen], device=logits.device)
    if some_greedy:
        logits = logits.index_select(0, torch.tensor(random_rows, device=logits.device))
    logits = logits.float()
    probs = torch.softmax(_top_k_filter(logits / temperature[:, None], [p.top_k for p in chosen]), dim=-1)
    probs = _min_p_filter(probs, [p.min_p for p in chosen])
    probs = _top_p_filter(probs, [p.top_p for p in chosen])
    drawn = inverse_cdf(probs, draws.to(logits.device))
    # A row with nothing left to draw from (NaN or infinite logits, or a temperature that is
    # 0 in float32) takes its argmax, as the C sampler does.
    total = probs.sum(dim=-1)
    broken = ~(torch.isfinite(total) & (total > 0))
    tokens[torch.tensor(random_rows)] = torch.where(broken, torch.argmax(logits, dim=-1), drawn).cpu()
    return tokens


def _sample_in_c(logits: torch.Tensor, rows: list[int], params: list[SamplingParams], draws: torch.Tensor,
                 tokens: torch.Tensor, threads: int | None = None) -> None:
    """Fill ``tokens[rows]`` from the contiguous CPU ``logits`` rows that ``_sampling.sample``
    draws, over ``threads`` of torch's (default: all of them)."""
    def column(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=dtype)
    index = torch.tensor(rows, dtype=torch.int64)
    temperature, min_p = column("temperature", torch.float32), column("min_p", torch.float32)
    top_p = column("top_p", torch.float32).clamp_(min=_TINY)
    vocab = logits.shape[1]
    top_k = torch.tensor(_active_top_ks([p.top_k for p in params], vocab), dtype=torch.int64)
    cbind.sample(logits, index, temperature, top_k, min_p, top_p, draws, tokens, threads or torch.get_num_threads())


CDF_BLOCK = 256
# top_p below float32's smallest normal would round to 0 and keep nothing: it keeps the
# most likely token(s), as any top_p that small does.
_TINY = torch.finfo(torch.float32).tiny


def inverse_cdf(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability (in vocabulary order) exceeds
    ``draws[row]`` (in [0, 1)) times the row's total; never a zero-probability token.

    A whole-vocabulary float64 cumsum costs most of a sampling step (14 ms for 64 x 32000);
    summing blocks of ``CDF_BLOCK`` first and then cumsumming, in float64, only the block
    that holds the draw reads each probability once. (The block sums are float32: where
    they and the in-block cumsum disagree by a rounding, the draw keeps to a live token of
    the block, a bias of about 1e-7.)
    """
    rows, vocab = probs.shape
    blocks = -(-vocab // CDF_BLOCK)
    if vocab % CDF_BLOCK:
        probs = F.pad(probs, (0, blocks * CDF_BLOCK - vocab))
    tiled = probs.view(rows, blocks, CDF_BLOCK)
    sums = tiled.sum(-1)
    block_cdf = sums.double().cumsum(-1)  # [rows, blocks]
    targets = draws.to(torch.float64)[:, None] * block_cdf[:, -1:]
    block = torch.minimum(torch.searchsorted(block_cdf, targets, right=True), _last_nonzero(sums))  # [rows, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    chosen = tiled.gather(1, block[:, :, None].expand(rows, 1, CDF_BLOCK))[:, 0]  # [rows, CDF_BLOCK]
    index = torch.searchsorted(before + chosen.double().cumsum(-1), targets, right=True)
    first_live = (chosen > 0).int().argmax(-1, keepdim=True)
    return (block * CDF_BLOCK + torch.clamp(index, first_live, _last_nonzero(chosen)))[:, 0]


def _last_nonzero(values: torch.Tensor) -> torch.Tensor:
    """Index of each row's last positive entry, [rows, 1]."""
    return values.shape[-1] - 1 - (values > 0).flip(-1).int().argmax(-1, keepdim=True)


def _active_top_ks(top_ks: list[int], vocab: int) -> list[int]:
    """Each top_k, or 0 where it filters nothing (0, -1, or at least the vocabulary)."""
    return [k if 0 < k < vocab else 0 for k in top_ks]


def _top_k_filter(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    ks = _active_top_ks(top_ks, logits.shape[1])
    if not any(ks):
        return logits
    kmax = max(ks)
    kth = torch.topk(logits, kmax, dim=-1).values
    index = torch.tensor([max(k, 1) - 1 for k in ks], device=logits.device)
    threshold = kth.gather(1, index[:, None])
    threshold[torch.tensor([k == 0 for k in ks], device=logits.device)] = -math.inf
    return logits.masked_fill(logits < threshold, -math.inf)


def _min_p_filter(probs: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    if not any(min_ps):
        return probs
    min_p = torch.tensor(min_ps, device=probs.device, dtype=probs.dtype)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return probs.masked_fill(probs < threshold, 0.0)


def _top_p_filter(probs: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, and every token
    that ties the least likely of them."""
    if all(p >= 1.0 for p in top_ps):
        return probs
    top_p = torch.tensor(top_ps, device=probs.device, dtype=probs.dtype).clamp_(min=_TINY)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = mass_before < top_p[:, None] * sorted_probs.sum(dim=-1, keepdim=True)
    least = sorted_probs.masked_fill(~kept, math.inf).amin(dim=-1, keepdim=True)
    return probs.masked_fill(probs < least, 0.0)
