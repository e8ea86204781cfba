"""Tests for chunkmask.eval: scipy references, coverage by simulation (fixed seeds), errors."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps

from chunkmask.eval._stats import (
    binomial_interval,
    equivalence_test,
    holm_adjust,
    paired_difference,
    pairs_for_halfwidth,
)


def test_paired_difference_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.1, 12)
    b = a - rng.normal(0.02, 0.05, 12)
    got = paired_difference(a.tolist(), b.tolist(), confidence=0.9)
    want = sps.ttest_rel(a, b).confidence_interval(confidence_level=0.9)
    assert got.low == pytest.approx(want.low, rel=1e-12)
    assert got.high == pytest.approx(want.high, rel=1e-12)
    assert got.mean == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    assert got.sd == pytest.approx(float(np.std(a - b, ddof=1)), rel=1e-12)
    assert got.n == 12 and got.confidence == 0.9


def test_paired_interval_covers_the_true_difference_95_percent():
    rng = np.random.default_rng(1)
    hits = 0
    sims = 4000
    for _ in range(sims):
        base = rng.normal(0.4, 0.2, 8)
        other = base + rng.normal(0.03, 0.1, 8)
        ci = paired_difference(other.tolist(), base.tolist())
        hits += ci.low <= 0.03 <= ci.high
    # binomial SE of the coverage is about 0.0034: accept within 5 SE of 0.95
    assert abs(hits / sims - 0.95) < 5 * math.sqrt(0.95 * 0.05 / sims)


def test_equivalence_matches_the_tost_interval_rule():
    rng = np.random.default_rng(2)
    for trial in range(200):
        n = int(rng.integers(3, 30))
        shift = rng.normal(0, 0.05)
        a = rng.normal(0.5, 0.1, n)
        b = a + shift + rng.normal(0, 0.05, n)
        res = equivalence_test(a.tolist(), b.tolist(), margin=0.05, alpha=0.05)
        ci = paired_difference(a.tolist(), b.tolist(), confidence=0.9)
        assert res.equivalent == (-0.05 < ci.low and ci.high < 0.05), trial
        assert res.difference.low == pytest.approx(ci.low)


def test_equivalence_controls_its_error_rate_at_the_margin():
    """With the true difference exactly at the margin, TOST declares equivalence <= 5% of the time."""
    rng = np.random.default_rng(3)
    sims, hits = 3000, 0
    for _ in range(sims):
        a = rng.normal(0.5, 0.1, 20)
        b = a - 0.05 + rng.normal(0, 0.04, 20)
        hits += equivalence_test(a.tolist(), b.tolist(), margin=0.05).equivalent
    assert hits / sims < 0.05 + 5 * math.sqrt(0.05 * 0.95 / sims)


def test_equivalence_with_identical_pairs():
    assert equivalence_test([0.5, 0.6], [0.5, 0.6], margin=0.05).equivalent
    assert not equivalence_test([0.6, 0.7], [0.5, 0.6], margin=0.05).equivalent


def test_pairs_for_halfwidth_is_the_smallest_n():
    for sd, hw in [(21.5, 5.0), (5.0, 2.0), (10.0, 5.0), (1.0, 10.0)]:
        n = pairs_for_halfwidth(sd, hw)
        assert sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= hw
        if n > 2:
            assert sps.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) > hw
    assert pairs_for_halfwidth(0.0, 1.0) == 2


def test_wilson_interval():
    ci = binomial_interval(37, 120)
    # a closed form written out
    z, n, p = sps.norm.ppf(0.975), 120, 37 / 120
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (ci.low, ci.high) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert binomial_interval(0, 50).low == 0.0 and binomial_interval(50, 50).high == 1.0
    assert 0 < binomial_interval(0, 50).high < 0.1


def test_wilson_coverage_near_the_boundary():
    rng = np.random.default_rng(4)
    p, n, sims = 0.05, 200, 4000
    hits = sum(
        binomial_interval(int(k), n).low <= p <= binomial_interval(int(k), n).high
        for k in rng.binomial(n, p, sims)
    )
    assert hits / sims > 0.93


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: paired_difference([1.0], [1.0]), ValueError, r"`a` must hold at least 2 pairs"),
        (lambda: paired_difference([1.0, 2.0], [1.0]), ValueError, r"`b` must have as many"),
        (lambda: paired_difference("ab", "ab"), TypeError, r"`a` must be a sequence"),
        (lambda: paired_difference([1.0, float("nan")], [1.0, 2.0]), ValueError, r"`a\[1\]` must be finite"),
        (lambda: paired_difference([1.0, True], [1.0, 2.0]), TypeError, r"`a\[1\]` must be a real"),
        (lambda: paired_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0), ValueError,
         r"`confidence` must lie in"),
        (lambda: equivalence_test([1.0, 2.0], [1.0, 2.0], margin=0.0), ValueError,
         r"`margin` must lie in"),
        (lambda: equivalence_test([1.0, 2.0], [1.0, 2.0], margin=0.1, alpha=0.5), ValueError,
         r"`alpha` must lie in"),
        (lambda: pairs_for_halfwidth(-1.0, 1.0), ValueError, r"`sd` must lie in"),
        (lambda: pairs_for_halfwidth(1.0, 0.0), ValueError, r"`halfwidth` must lie in"),
        (lambda: binomial_interval(5, 4), ValueError, r"`successes` must be <= `trials`"),
        (lambda: binomial_interval(-1, 4), ValueError, r"`successes` must be >= 0"),
        (lambda: binomial_interval(1, 0), ValueError, r"`trials` must be > 0"),
        (lambda: binomial_interval(1.0, 4), TypeError, r"`successes` must be an int"),
        (lambda: binomial_interval(1, 4, confidence=1.0), ValueError, r"`confidence` must lie"),
        (lambda: holm_adjust([]), ValueError, r"`p_values` must hold at least one p-value, got an empty"),
        (lambda: holm_adjust([0.1, 1.5]), ValueError, r"`p_values\[1\]` must lie in \[0(\.0)?, 1"),
        (lambda: holm_adjust(0.1), TypeError, r"`p_values` must be a sequence"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _holm_step_down(p_values, alpha):
    """Holm's procedure as written in 1979: reject sorted hypotheses while p_(k) <= alpha/(m-k+1)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    rejected = set()
    for k, i in enumerate(order):
        if p_values[i] > alpha / (m - k):
            break
        rejected.add(i)
    return rejected


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), st.floats(0.001, 0.5))
def test_holm_adjusted_values_reproduce_the_step_down_procedure(p_values, alpha):
    adjusted = holm_adjust(p_values)
    assert len(adjusted) == len(p_values)
    assert all(a >= p - 1e-15 and a <= 1.0 for a, p in zip(adjusted, p_values, strict=True))
    # adjusted values are monotone in the raw ones
    for a, pa in zip(adjusted, p_values, strict=True):
        for b, pb in zip(adjusted, p_values, strict=True):
            if pa < pb:
                assert a <= b
    # rejecting adjusted <= alpha is the step-down procedure (ties at the boundary aside)
    if all(abs(p * (len(p_values) - k) - alpha) > 1e-12 for p in p_values for k in range(len(p_values))):
        assert {i for i, a in enumerate(adjusted) if a <= alpha} == _holm_step_down(p_values, alpha)


def test_holm_known_values_and_single_test():
    assert holm_adjust([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm_adjust([0.3]) == [0.3]
    assert holm_adjust([0.5, 0.5]) == [1.0, 1.0]


def test_holm_controls_the_family_wise_error_rate():
    rng = np.random.default_rng(5)
    reps, m = 4000, 8
    # correlated null p-values (a shared baseline): p = Phi(z) with z = (u + v_i) / sqrt(2)
    z = (rng.standard_normal((reps, 1)) + rng.standard_normal((reps, m))) / np.sqrt(2)
    pv = 0.5 * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))
    any_reject = np.mean([min(holm_adjust(row.tolist())) < 0.05 for row in pv])
    assert any_reject <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps)
    # and the unadjusted family would not control it
    raw = np.mean((pv < 0.05).any(1))
    assert raw > 0.15
