"""Sampling: processors pinned on examples and edge cases, and right in distribution (chi-square).

The chi-square tests draw >= 20k tokens with fixed keys (so they are deterministic) and compare
the counts with the renormalised truncated distribution computed here from its definition.
"""

import math

import pytest
import torch

from craftfn import random
from craftfn.generation import (
    SamplingOptions,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    sample_token,
    suppress_tokens,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")

# --------------------------------------------------------------------------------------------
# A chi-square goodness-of-fit test with its own survival function (scipy is not a dependency).

def _gamma_p_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its power series (converges for x < a + 1)."""
    term = total = 1.0 / a
    n = a
    for _ in range(10_000):
        n += 1.0
        term *= x / n
        total += term
        if abs(term) < abs(total) * 1e-15:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_q_continued_fraction(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by Lentz's continued fraction (x >= a + 1)."""
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof)."""
    if statistic <= 0:
        return 1.0
    a, x = dof / 2.0, statistic / 2.0
    if x < a + 1.0:
        return 1.0 - _gamma_p_series(a, x)
    return _gamma_q_continued_fraction(a, x)


def chi_square_p_value(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Goodness of fit of integer ``samples`` to ``expected_probs``.

    Categories with zero expected probability must never be drawn (returns 0.0 if one is).
    """
    n = samples.numel()
    counts = torch.bincount(samples.flatten(), minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * n
    support = expected > 0
    if counts[~support].sum() > 0:
        return 0.0
    stat = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    return chi2_sf(stat, int(support.sum()) - 1)


@pytest.mark.parametrize(
    "stat, dof, expected",
    [
        (3.841458820694124, 1, 0.05),
        (6.634896601021214, 1, 0.01),
        (11.070497693516351, 5, 0.05),
        (23.209251158954356, 10, 0.01),
        (2.0, 2, math.exp(-1.0)),  # dof 2: exp(-x / 2)
        (100.0, 3, math.erfc(math.sqrt(50)) + math.sqrt(200 / math.pi) * math.exp(-50)),  # dof 3 closed form
    ],
)
def test_chi2_sf_known_values(stat, dof, expected):
    assert chi2_sf(stat, dof) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Processors: examples and edge cases

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_temperature_and_greedy():
    torch.testing.assert_close(apply_temperature(LOGITS, 0.5), LOGITS * 2)
    for seed in range(20):
        assert sample_token(LOGITS, random.key(seed), temperature=0.0).tolist() == [0]
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(LOGITS, 0.0)


def test_top_k_keeps_k_and_ties_at_the_cut():
    assert top_k_filter(LOGITS, 2).isfinite().tolist() == [[True, True, False, False, False, False]]
    tied = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    assert top_k_filter(tied, 2).isfinite().tolist() == [[True, True, True, False]]
    assert torch.equal(top_k_filter(LOGITS, 0), LOGITS)
    assert torch.equal(top_k_filter(LOGITS, 100), LOGITS)


def test_top_p_edge_cases():
    # Tiny top_p is greedy, never an empty set; top_p = 1 leaves the logits untouched.
    assert top_p_filter(LOGITS, 1e-9).isfinite().tolist() == [[True] + [False] * 5]
    assert top_p_filter(LOGITS, 1.0) is LOGITS
    for seed in range(20):
        assert sample_token(LOGITS, random.key(seed), top_p=1e-9).tolist() == [0]
    # The smallest set whose mass reaches p: 0.5 + 0.3 >= 0.7.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_filter(probs.log(), 0.7).isfinite().tolist() == [[True, True, False, False]]
    assert top_p_filter(probs.log(), 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(probs.log(), 0.81).isfinite().tolist() == [[True, True, True, False]]
    # Ties at the cut are all kept (the result never depends on the sort order of equal values).
    tied = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]).log()
    assert top_p_filter(tied, 0.5).isfinite().tolist() == [[True, True, True, False, False]]
    assert top_p_filter(tied.flip(-1), 0.5).isfinite().tolist() == [[False, False, True, True, True]]
    # Rows are independent.
    two = torch.cat([probs.log(), probs.log().flip(-1)])
    assert top_p_filter(two, 0.7).isfinite().tolist() == [[True, True, False, False], [False, False, True, True]]


def test_min_p_and_penalties():
    probs = torch.tensor([[0.6, 0.3, 0.09, 0.01]])
    assert min_p_filter(probs.log(), 0.5).isfinite().tolist() == [[True, True, False, False]]
    assert min_p_filter(probs.log(), 1.0).isfinite().tolist() == [[True, False, False, False]]
    assert torch.equal(min_p_filter(probs.log(), 0.0), probs.log())
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 2.0, -2.0]]), seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert suppress_tokens(LOGITS, [0, 5]).isfinite().tolist() == [[False, True, True, True, True, False]]
    # Suppression applies before greedy too.
    assert sample_token(LOGITS, random.key(0), temperature=0.0, suppress_tokens=[0]).tolist() == [1]


def test_sample_token_is_a_pure_function_of_the_key():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a = sample_token(logits, random.key(3), top_k=10)
    assert torch.equal(a, sample_token(logits, random.key(3), top_k=10))
    draws = {tuple(sample_token(logits, random.key(s)).tolist()) for s in range(10)}
    assert len(draws) > 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"suppress_tokens": (-1,)}, "suppress_tokens"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kwargs)
    with pytest.raises(ValueError, match=match):
        sample_token(LOGITS, random.key(0), **kwargs)


# --------------------------------------------------------------------------------------------
# Right in distribution

N_DRAWS = 20_000
BASE = torch.tensor([1.2, 0.9, 0.5, 0.4, 0.4, 0.0, -0.3, -1.0, -2.0, -2.5])


def _draw(options: SamplingOptions, key_seed: int) -> torch.Tensor:
    # N identical rows with one key: the per-element noise makes the rows independent draws.
    logits = BASE.expand(N_DRAWS, -1).contiguous()
    return sample_token(logits, random.key(key_seed), options=options)


def _expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The truncated, renormalised distribution, from its definition (float64, no library filters)."""
    probs = torch.softmax(BASE.double() / temperature, dim=0)
    keep = torch.ones_like(probs, dtype=torch.bool)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    if top_k:
        kth = float(probs[order[top_k - 1]])
        keep &= probs >= kth
    if top_p < 1.0:
        mass, threshold = 0.0, None
        for i in order:
            if mass >= top_p:
                break
            mass += float(probs[i])
            threshold = float(probs[i])
        keep &= probs >= threshold
    if min_p:
        keep &= probs >= min_p * probs.max()
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 1.0},
        {"temperature": 0.5},
        {"temperature": 2.0},
        {"top_k": 3},
        {"top_k": 4, "temperature": 0.7},
        {"top_p": 0.6},
        {"top_p": 0.9, "temperature": 1.5},
        {"min_p": 0.3},
        {"min_p": 0.1, "temperature": 0.8},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_chi_square_against_truncated_distribution(options):
    expected = _expected(**options)
    samples = _draw(SamplingOptions(**options), key_seed=1234)
    assert chi_square_p_value(samples, expected) > 1e-3
    # Truncated tokens are never drawn.
    assert set(samples.unique().tolist()) <= set(torch.nonzero(expected).flatten().tolist())


def test_chi_square_detects_the_wrong_distribution():
    # Power check: temperature 0.5 samples do not fit temperature 0.6, nor top-k=4 ones a top-k of 5.
    assert chi_square_p_value(_draw(SamplingOptions(temperature=0.5), 7), _expected(temperature=0.6)) < 1e-6
    assert chi_square_p_value(_draw(SamplingOptions(top_k=4), 7), _expected(top_k=6)) < 1e-6


def test_process_logits_matches_composition():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    opts = SamplingOptions(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05)
    manual = min_p_filter(top_p_filter(top_k_filter(apply_temperature(logits, 0.7), 8), 0.9), 0.05)
    torch.testing.assert_close(process_logits(logits, opts), manual)
