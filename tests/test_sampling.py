"""Token sampling: greedy, temperature, top-k / top-p / min-p, counter-based seeded draws.

The behaviour tests run against both samplers: the C loop (CPU, where it is built) and
the torch expressions (CUDA, or no C compiler at install time)."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from glinthawk.compute import sampling
from glinthawk.compute.sampling import (
    CDF_BLOCK,
    SamplingParams,
    inverse_cdf,
    sample,
    uniforms,
)

VOCAB = 50
NO_C = "the C sampler is not built (no C compiler at install time)"
NEEDS_C = pytest.mark.skipif(sampling._sampling is None, reason=NO_C)


@pytest.fixture(params=["c", "torch"])
def backend(request, monkeypatch):
    """Which sampler ``sample`` uses for its random rows."""
    if request.param == "c" and sampling._sampling is None:
        pytest.skip(NO_C)
    if request.param == "torch":
        monkeypatch.setattr(sampling, "_sampling", None)
    return request.param


BOTH = pytest.mark.usefixtures("backend")


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits: torch.Tensor, params: SamplingParams, seeds, step: int = 0) -> torch.Tensor:
    """Sample one row of logits under many seeds (one batch row per seed)."""
    rows = logits.expand(len(seeds), -1)
    return sample(rows, [params] * len(seeds), list(seeds), [step] * len(seeds))


@BOTH
def test_greedy_is_argmax():
    logits = random_logits(6)
    tokens = sample(logits, [SamplingParams(temperature=0)] * 6, [1] * 6, list(range(6)))
    assert tokens.dtype == torch.int64 and tokens.device.type == "cpu"
    assert torch.equal(tokens, logits.argmax(-1))


@BOTH
def test_filters_that_leave_one_token_equal_greedy():
    logits = random_logits(8, seed=1)
    greedy = logits.argmax(-1)
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6),
                   SamplingParams(temperature=2.0, min_p=1.0)):
        for step in range(5):
            tokens = sample(logits, [params] * 8, list(range(100, 108)), [step] * 8)
            assert torch.equal(tokens, greedy), params


@BOTH
def test_top_k_keeps_exactly_the_k_most_likely():
    logits = random_logits(1, seed=2)[0]
    allowed = set(logits.topk(5).indices.tolist())
    picked = draw(logits, SamplingParams(temperature=3.0, top_k=5), range(400)).tolist()
    assert set(picked) == allowed  # never outside, and every one of them reachable


@BOTH
def test_top_k_at_or_above_vocab_and_minus_one_disable_it():
    logits = random_logits(1, seed=3)[0]
    seeds = range(200)
    plain = draw(logits, SamplingParams(temperature=1.0), seeds)
    for top_k in (-1, 0, VOCAB, VOCAB + 10):
        assert torch.equal(draw(logits, SamplingParams(temperature=1.0, top_k=top_k), seeds), plain)


@BOTH
def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    logits = probs.log()
    seeds = range(600)
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.75), seeds).tolist()) == {1, 3}
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.9), seeds).tolist()) == {1, 3, 2}
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=1.0), seeds).tolist()) == {0, 1, 2, 3}
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.4), seeds).tolist()) == {1}


@BOTH
def test_top_p_keeps_every_token_that_ties_the_least_likely_kept():
    probs = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])  # 0.4 + 0.3 + one 0.1 reach 0.8: all three 0.1s tie
    picked = set(draw(probs.log(), SamplingParams(temperature=1.0, top_p=0.8), range(800)).tolist())
    assert picked == {0, 1, 2, 3, 4}
    picked = set(draw(probs.log(), SamplingParams(temperature=1.0, top_p=0.65), range(800)).tolist())
    assert picked == {1, 3}


@BOTH
def test_top_k_keeps_every_token_that_ties_the_kth():
    probs = torch.tensor([0.3, 0.05, 0.3, 0.3, 0.05])
    assert set(draw(probs.log(), SamplingParams(temperature=1.0, top_k=2), range(600)).tolist()) == {0, 2, 3}


LARGE = 4096  # enough groups of weights for the C sampler to find top-k and top-p thresholds from their maxima


@BOTH
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=3),
                                    SamplingParams(temperature=1.0, top_p=0.5),
                                    SamplingParams(temperature=1.0, top_k=200, top_p=0.3)])
def test_ties_stay_together_in_a_large_vocabulary(params):
    """Ten tokens tie far above the rest of 4096 (which still hold a tenth of the mass): a
    filter that keeps any of the ten keeps all ten, and nothing else."""
    logits = torch.full((LARGE,), -3.0)
    tied = torch.arange(7, LARGE, 409)  # ten tokens, spread over the vocabulary
    logits[tied] = 5.0
    picked = draw(logits, params, range(1000))
    assert set(picked.tolist()) == set(tied.tolist())


@BOTH
def test_top_p_beyond_the_largest_of_each_group():
    """One token in 64 weighs twice the others: a nucleus of 5% of the mass takes all 64 of
    those and some of the rest, so (ties staying) every token; one of 1% only the 64."""
    logits = torch.full((LARGE,), math.log(0.5))
    heavy = torch.arange(0, LARGE, 64)
    logits[heavy] = 0.0
    picked = draw(logits, SamplingParams(temperature=1.0, top_p=0.05), range(1000))
    assert float(((picked % 64) != 0).float().mean()) > 0.9
    picked = draw(logits, SamplingParams(temperature=1.0, top_p=0.01), range(1000))
    assert bool(((picked % 64) == 0).all()) and len(set(picked.tolist())) > 40


@BOTH
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=3, top_p=0.5),
                                    SamplingParams(temperature=1.0, top_k=5, min_p=0.3)])
def test_filters_combine(params):
    probs = torch.tensor([0.02, 0.30, 0.08, 0.25, 0.20, 0.15])
    # top-k 3 keeps 0.30, 0.25, 0.20 (sum 0.75); top-p 0.5 of that keeps 0.30 and 0.25.
    # top-k 5 keeps down to 0.08, and min-p 0.3 drops what is under 0.09: 0.30, 0.25, 0.20, 0.15.
    expected = {1, 3} if params.top_p < 1 else {1, 3, 4, 5}
    assert set(draw(probs.log(), params, range(800)).tolist()) == expected


@BOTH
def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([0.40, 0.25, 0.21, 0.10, 0.04])
    logits = probs.log()
    seeds = range(600)
    # min_p 0.5: keep p >= 0.2 (= 0.5 * 0.40).
    assert set(draw(logits, SamplingParams(temperature=1.0, min_p=0.5), seeds).tolist()) == {0, 1, 2}
    assert set(draw(logits, SamplingParams(temperature=1.0, min_p=0.2), seeds).tolist()) == {0, 1, 2, 3}


@BOTH
def test_greedy_rows_mixed_with_random_rows():
    logits = random_logits(6, seed=4)
    greedy, rand = SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=10)
    params = [greedy, rand, greedy, rand, rand, greedy]
    seeds, steps = [11, 12, 13, 14, 15, 16], [0, 1, 2, 3, 4, 5]
    tokens = sample(logits, params, seeds, steps)
    for i in (0, 2, 5):
        assert tokens[i] == logits[i].argmax()
    for i in (1, 3, 4):
        alone = sample(logits[i:i + 1], [rand], [seeds[i]], [steps[i]])
        assert tokens[i] == alone[0]
        assert tokens[i].item() in logits[i].topk(10).indices.tolist()


@BOTH
def test_bfloat16_logits_sample_as_their_float32_values():
    """A bf16 model's logits: greedy rows take their argmax as they are, the other rows are
    sampled in float32, both exactly as from the same values widened to float32."""
    logits = random_logits(6, seed=6, vocab=1000).bfloat16()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9)] * 3
    seeds, steps = [1, 2, 3, 4, 5, 6], [0, 3, 1, 4, 2, 5]
    assert torch.equal(sample(logits, params, seeds, steps), sample(logits.float(), params, seeds, steps))
    assert torch.equal(sample(logits, params[:1] * 6, seeds, steps), logits.float().argmax(-1))


@BOTH
def test_same_seed_and_step_same_token_whatever_the_other_rows():
    logits = random_logits(1, seed=5)[0] / 3  # flat enough that the draws spread
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)
    alone = [sample(logits[None], [params], [1234], [step]).item() for step in range(20)]
    for step in range(20):
        others = random_logits(5, seed=50 + step)
        batch = torch.cat([others[:2], logits[None], others[2:]])
        mixed = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=3), params,
                 SamplingParams(temperature=0.5, min_p=0.1), SamplingParams(temperature=1.0)]
        tokens = sample(batch, mixed, [7, 8, 1234, 9, 1234], [3, step, step, 0, step + 1])
        assert tokens[2].item() == alone[step]
    # ... and the draws do depend on the step and on the seed.
    assert len(set(alone)) > 3
    other_seed = [sample(logits[None], [params], [4321], [step]).item() for step in range(20)]
    assert other_seed != alone


def test_uniforms_are_deterministic_and_uniform():
    seeds, steps = [s % 97 for s in range(20000)], [s // 97 for s in range(20000)]
    u = uniforms(seeds, steps)
    assert u.dtype == torch.float64
    assert torch.equal(u, uniforms(seeds, steps))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert counts.min() > 1800 and counts.max() < 2200
    assert uniforms([-1], [0]).item() == uniforms([2**64 - 1], [0]).item()  # seeds are taken mod 2**64
    assert uniforms([5], [0]).item() != uniforms([5], [1]).item()


@pytest.mark.parametrize("vocab", [7, CDF_BLOCK, 3 * CDF_BLOCK + 5, 32000])
def test_inverse_cdf_matches_a_whole_vocabulary_cumsum(vocab):
    generator = torch.Generator().manual_seed(vocab)
    rows = 400
    probs = torch.softmax(torch.randn(rows, vocab, generator=generator) * 4, dim=-1)
    probs[probs < probs.median(dim=-1, keepdim=True).values] = 0  # filtered-out tokens, as top-p leaves them
    probs[:2] = 0
    probs[0, -1] = probs[1, 0] = 1  # all mass on the last token, on the first
    draws = torch.rand(rows, generator=generator, dtype=torch.float64)
    draws[:4] = torch.tensor([0.0, 1 - 2**-53, 0.0, 1 - 2**-53], dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)[:, 0]
    picked = inverse_cdf(probs, draws)
    assert bool((probs.gather(1, picked[:, None]) > 0).all()), "picked a token with no probability"
    # The block sums are float32: a draw within ~1e-7 of a boundary may land next door.
    assert int((picked != expected).sum()) <= 1


@BOTH
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_empirical_distribution_follows_softmax(temperature):
    logits = torch.tensor([1.0, 0.2, -0.5, 1.5, 0.0, -1.0])
    expected = torch.softmax(logits / temperature, dim=0)
    n = 6000
    # One row per (seed, step): spread over both counters.
    seeds = [i % 300 for i in range(n)]
    steps = [i // 300 for i in range(n)]
    tokens = sample(logits.expand(n, -1), [SamplingParams(temperature=temperature)] * n, seeds, steps)
    observed = torch.bincount(tokens, minlength=len(logits)).double()
    chi2 = float(((observed - n * expected) ** 2 / (n * expected)).sum())
    # 5 degrees of freedom: P(chi2 > 30) ~ 1.5e-5 for a correct sampler; fixed seeds make it
    # deterministic. A sampler off by a few percent in any bucket lands far above.
    assert chi2 < 30, (observed / n, expected)


@BOTH
def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 2000
    seeds = list(range(n))
    hot = sample(logits.expand(n, -1), [SamplingParams(temperature=2.0)] * n, seeds, [0] * n)
    cold = sample(logits.expand(n, -1), [SamplingParams(temperature=0.25)] * n, seeds, [0] * n)
    assert (cold == 0).sum() > (hot == 0).sum() + 300


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", "hot"), ("temperature", True),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", None),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("max_tokens", True),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True), ("top_k", "5"),
    ("min_p", -0.1), ("min_p", 1.5),
    ("seed", 1.5), ("seed", "7"),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_invalid_stop_strings():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=("",))
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=(3,))


def test_valid_edges_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=1, seed=-5)
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=1, min_p=1.0, seed=2**70)
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-3).greedy


@NEEDS_C
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_and_torch_samplers_draw_the_same_tokens(dtype, monkeypatch):
    """Both samplers, on 32,000-token rows under every filter: the same token but where a
    float rounding at a filter's edge or a draw's boundary differs (the C loop's exp and
    sums are not torch's)."""
    generator = torch.Generator().manual_seed(7)
    rows = 240
    logits = (torch.randn(rows, 32000, generator=generator) * 3).to(dtype)
    logits[::7] /= 4  # flatter rows: large nuclei
    logits[1::7] *= 3  # peaked rows: top-p's nucleus, a few tokens, found from the maxima of groups
    kinds = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.7, top_p=0.9),
             SamplingParams(temperature=1.2, top_k=40), SamplingParams(temperature=1.0, min_p=0.05),
             SamplingParams(temperature=0.6, top_k=500, top_p=0.95, min_p=0.01), SamplingParams(temperature=0)]
    params = [kinds[i % len(kinds)] for i in range(rows)]
    seeds, steps = list(range(rows)), [i % 13 for i in range(rows)]
    ours = sample(logits, params, seeds, steps)
    monkeypatch.setattr(sampling, "_sampling", None)
    reference = sample(logits, params, seeds, steps)
    assert int((ours != reference).sum()) <= 2
    assert len(set(ours.tolist())) > rows // 2  # the draws spread: not all argmax


@NEEDS_C
def test_c_sampler_keeps_to_the_vocabulary_on_broken_logits():
    logits = torch.randn(4, 300)
    logits[0] = float("nan")
    logits[1, 17] = float("inf")
    logits[2] = float("-inf")
    logits[3, ::2] = float("-inf")
    tokens = sample(logits, [SamplingParams(temperature=1.0, top_p=0.9, top_k=5)] * 4, [1, 2, 3, 4], [0] * 4)
    assert bool(((tokens >= 0) & (tokens < 300)).all())
    assert tokens[1] == 17
    assert tokens[3] % 2 == 1  # never a token of no probability


@NEEDS_C
@pytest.mark.parametrize("gap", [0.1, 0.9, 3.3, 10.0, 40.0, 80.0])
def test_c_sampler_weighs_tokens_by_softmax_to_float_precision(gap):
    """Two tokens whose logits differ by ``gap``: the draw at which the C loop switches
    from the first to the second gives the first's probability, 1 / (1 + e^gap) (its exp
    is a polynomial of its own): within 2e-7 of it, and 1e-12 of the total."""
    logits = torch.tensor([[-gap, 0.0]])
    params = [SamplingParams(temperature=1.0)]

    def token(u: float) -> int:
        tokens = torch.empty(1, dtype=torch.int64)
        sampling._sample_in_c(logits, [0], params, torch.tensor([u], dtype=torch.float64), tokens)
        return int(tokens[0])

    def double(bits: int) -> float:  # positive doubles are ordered as their bit patterns
        return struct.unpack("<d", struct.pack("<q", bits))[0]

    low, high = 0, struct.unpack("<q", struct.pack("<d", 1.0))[0]  # token 0 at low, token 1 at high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if token(double(middle)) == 0 else (low, middle)
    expected = 1 / (1 + math.exp(gap))
    assert abs(double(high) - expected) <= 2e-7 * expected + 1e-12


@NEEDS_C
def test_c_sampler_draws_the_same_on_any_number_of_threads():
    """Rows split into slices, one per thread (on torch's OpenMP team): each row's token is
    its own, whatever the split."""
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(37, 3000, generator=generator) * 3).bfloat16()
    kinds = [SamplingParams(temperature=0.9, top_p=0.9), SamplingParams(temperature=1.1, top_k=20)]
    params = [kinds[i % 2] for i in range(37)]
    draws = uniforms(list(range(37)), [5] * 37)
    tokens = [torch.empty(37, dtype=torch.int64) for _ in range(3)]
    for threads, out in zip((1, 2, 5), tokens):
        sampling._sample_in_c(logits, list(range(37)), params, draws, out, threads=threads)
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    assert len(set(tokens[0].tolist())) > 20


def median_of_three_killer(n: int, stop: int) -> list[int]:
    """An order of 0..n-1 on which the C sampler's quickselect (median-of-three pivot,
    three-way partition, as in ``_sampling.c``), looking for one of the ``stop`` largest,
    drops only two values a round: each round, its three candidates get the two smallest
    values not yet given out (the median of the three is then the second smallest), the
    rest stays larger. McIlroy's adversary, run on the partition's moves."""
    order = list(range(n))  # order[i]: which element is at position i
    value: dict[int, int] = {}
    given = 0
    size = n
    while size - 2 >= stop:
        first, middle = order[0], order[size // 2]
        value[first], value[middle] = given, given + 1
        given += 2
        pivot = given - 1
        high = mid = 0
        low = size
        while mid < low:  # partition(): above the pivot first, equal, then below
            element = order[mid]
            v = value.get(element, n)  # not given out yet: above every pivot so far
            if v > pivot:
                order[mid], order[high] = order[high], element
                high += 1
                mid += 1
            elif v == pivot:
                mid += 1
            else:
                low -= 1
                order[mid], order[low] = order[low], element
        size = high
    for element in order[:size]:
        value[element] = given
        given += 1
    return [value[element] for element in range(n)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=400),
                                    SamplingParams(temperature=1.0, top_p=0.4)])
def test_c_sampler_survives_an_adversarial_order(params, monkeypatch):
    """A row whose weights all share one bucket of the histogram, in an order that makes
    the quickselect over that bucket quadratic: the C sampler gives up on it after its
    budget of rounds and sorts, and still keeps exactly the tokens torch keeps."""
    if sampling._sampling is None:
        pytest.skip(NO_C)
    n = 1023
    ranks = torch.tensor(median_of_three_killer(n, 400), dtype=torch.float64)
    weights = 0.5 + 0.06 * (ranks + 1) / (n + 1)  # in [0.5, 0.5625): one bucket
    logits = torch.cat([weights.log(), torch.zeros(1, dtype=torch.float64)]).float()  # and the largest, 1
    ours = draw(logits, params, range(3000))
    monkeypatch.setattr(sampling, "_sampling", None)
    reference = draw(logits, params, range(3000))
    assert int((ours != reference).sum()) <= 3
    kept = set(ours.tolist())
    assert len(kept) > 350 and kept <= set(torch.topk(logits, 400).indices.tolist())


@BOTH
def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token():
    """top_p 1e-50 is 0 in float32: it still keeps the most likely token (and only it), and
    leaves top-k and min-p as they were."""
    logits = random_logits(1, seed=5, vocab=4000)[0]
    logits[7] = logits.max() + 1.0
    for params in (SamplingParams(temperature=1.0, top_p=1e-50), SamplingParams(temperature=1.0, top_p=1e-50, top_k=1)):
        assert set(draw(logits, params, range(50)).tolist()) == {7}


@BOTH
def test_a_top_k_beyond_int64_disables_it():
    logits = random_logits(1, seed=6)[0]
    huge = draw(logits, SamplingParams(temperature=1.0, top_k=2**64), range(300))
    assert torch.equal(huge, draw(logits, SamplingParams(temperature=1.0), range(300)))


@BOTH
@pytest.mark.parametrize("case", ["nan", "inf", "all -inf", "temperature 1e-50"])
def test_rows_with_nothing_to_draw_from_take_their_argmax(case):
    """NaN or infinite logits, or a temperature that is 0 in float32, leave no distribution:
    the row's argmax, inside the vocabulary, on both samplers."""
    logits = random_logits(1, seed=8, vocab=1000)[0]
    params = SamplingParams(temperature=1e-50 if case == "temperature 1e-50" else 1.0)
    if case == "nan":
        logits[3] = float("nan")
    elif case == "inf":
        logits[11] = float("inf")
    elif case == "all -inf":
        logits[:] = float("-inf")
    expected = int(torch.argmax(logits))
    assert set(draw(logits, params, range(20)).tolist()) == {expected}


@BOTH
def test_logits_without_a_vocabulary_are_refused():
    with pytest.raises(ValueError, match="with a vocabulary"):
        sample(torch.empty(2, 0), [SamplingParams(temperature=1.0)] * 2, [1, 2], [0, 0])
