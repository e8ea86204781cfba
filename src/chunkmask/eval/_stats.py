r"""Statistics for comparing training runs: paired differences, equivalence, power, binomial CIs.

A claim that masked training "matches" GRPO is a claim about a difference between two noisy
learning curves, so it needs a paired design (same checkpoint, prompts, seeds and evaluation
states per pair), a confidence interval on the difference, and a sample size chosen in advance:

- `paired_difference`: the mean paired difference with a Student-t confidence interval;
- `equivalence_test`: two one-sided tests (TOST, Schuirmann 1987) against a margin, e.g. ±5
  success points;
- `pairs_for_halfwidth`: how many pairs give a CI of a given half-width at a given spread;
- `binomial_interval`: the Wilson score interval of a success rate from evaluation episodes;
- `holm_adjust`: Holm's step-down adjustment of a family of p-values (many arms against one
  baseline).

These are plain functions on Python numbers (sequences of floats), meant for reports, not for the
training step. The Student-t quantiles and tail probabilities come from SciPy, an optional
dependency (`pip install scipy`, or `pip install chunkmask[stats]`) imported only when a function
needs it; `binomial_interval` needs only the standard library.
"""

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, NamedTuple

from chunkmask._checks import check_positive_int, check_probability, check_range, check_real

__all__ = [
    "BinomialInterval",
    "EquivalenceTest",
    "PairedDifference",
    "binomial_interval",
    "equivalence_test",
    "holm_adjust",
    "pairs_for_halfwidth",
    "paired_difference",
]


def _scipy_stats() -> Any:
    """Import `scipy.stats` on first use: SciPy is optional, needed only for Student-t values."""
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - exercised with scipy hidden
        raise ImportError(
            "chunkmask.eval needs SciPy for Student-t quantiles: `pip install scipy` (or "
            "`pip install chunkmask[stats]`)."
        ) from exc
    return stats


def _normal_quantile(q: float) -> float:
    """The standard normal quantile (standard library; no SciPy needed)."""
    return NormalDist().inv_cdf(q)


_MAX_PAIRS = 2**53  # past this, n is no longer exact in float64 and the search cannot converge


def _values(x: Sequence[float], name: str) -> list[float]:
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise TypeError(f"`{name}` must be a sequence of numbers, got {type(x).__name__}.")
    return [check_real(v if not hasattr(v, "item") else v.item(), f"{name}[{i}]")
            for i, v in enumerate(x)]


class PairedDifference(NamedTuple):
    """Result of `paired_difference` (plain floats).

    Attributes:
        mean: the mean of `a - b` over pairs.
        low: the lower confidence bound.
        high: the upper confidence bound.
        se: the standard error of the mean.
        sd: the standard deviation of the differences (Bessel-corrected).
        n: the number of pairs.
        confidence: the confidence level of `[low, high]`.
    """

    mean: float
    low: float
    high: float
    se: float
    sd: float
    n: int
    confidence: float


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95
) -> PairedDifference:
    r"""Mean paired difference $\bar d$ of `a - b` with a Student-t confidence interval.

    $$
    \bar d \pm t_{1-\alpha/2,\, n-1}\, \frac{s_d}{\sqrt n}, \qquad \alpha = 1 - \text{confidence}.
    $$

    Pair $i$ is one seed (the same checkpoint, prompts and evaluation states for both arms).

    Args:
        a: values of arm A per pair, e.g. final success per seed.
        b: values of arm B for the same pairs, in the same order.
        confidence: the confidence level in `(0, 1)`.

    Returns:
        A `PairedDifference`.

    Raises:
        TypeError: if an input is not a sequence of real numbers.
        ValueError: if the lengths differ, there are fewer than 2 pairs, a value is not finite,
            or `confidence` is outside `(0, 1)`.

    Example:
        >>> d = paired_difference([0.52, 0.61, 0.48, 0.55], [0.50, 0.55, 0.47, 0.50])
        >>> round(d.mean, 4), round(d.low, 4), round(d.high, 4)
        (0.035, -0.0029, 0.0729)
    """
    xa, xb = _values(a, "a"), _values(b, "b")
    if len(xa) != len(xb):
        raise ValueError(f"`b` must have as many values as `a` ({len(xa)}), got {len(xb)}.")
    if len(xa) < 2:
        raise ValueError(f"`a` must hold at least 2 pairs for a confidence interval, got {len(xa)}.")
    confidence = check_range(confidence, "confidence", low=0.0, high=1.0, low_open=True,
                             high_open=True)
    n = len(xa)
    t = float(_scipy_stats().t.ppf(0.5 + confidence / 2, n - 1))
    # Work in units of 2**e >= every |value| (exact scaling by `ldexp`): differences then lie in
    # [-2, 2], and `hypot` sums the squared deviations without overflow or underflow.
    top = max(max(abs(v) for v in xa), max(abs(v) for v in xb))
    e = math.frexp(top)[1]
    d = [math.ldexp(x, -e) - math.ldexp(y, -e) for x, y in zip(xa, xb, strict=True)]
    mean = math.fsum(d) / n
    sd = math.hypot(*(v - mean for v in d)) / math.sqrt(n - 1)
    se = sd / math.sqrt(n)
    try:
        out = [math.ldexp(v, e) for v in (mean, mean - t * se, mean + t * se, se, sd)]
    except OverflowError:
        out = [math.inf]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(
            "`a` and `b` must give a paired difference and interval representable in float64, "
            f"got values up to {top:.3g} in magnitude, whose differences or "
            f"{confidence:.6g}-interval overflow."
        )
    mean, low, high, se, sd = out
    return PairedDifference(mean, low, high, se, sd, n, confidence)


class EquivalenceTest(NamedTuple):
    """Result of `equivalence_test` (plain floats and a verdict).

    Attributes:
        equivalent: both one-sided tests reject at level `alpha`: the difference lies within
            `(-margin, margin)`.
        p_value: the larger of the two one-sided p-values.
        difference: the paired difference with its `1 - 2 alpha` interval (the TOST interval).
        margin: the equivalence margin.
    """

    equivalent: bool
    p_value: float
    difference: PairedDifference
    margin: float


def equivalence_test(
    a: Sequence[float], b: Sequence[float], *, margin: float, alpha: float = 0.05
) -> EquivalenceTest:
    r"""Two one-sided tests (TOST) that the paired difference `a - b` lies within `±margin`.

    $H_0$: $|\mu_d| \ge m$. Reject (declare equivalence) when both
    $t_{low} = (\bar d + m)/se$ and $t_{high} = (m - \bar d)/se$ exceed $t_{1-\alpha, n-1}$,
    which is the same as the $1 - 2\alpha$ confidence interval lying inside $(-m, m)$
    (Schuirmann 1987).

    Args:
        a: values of arm A per pair.
        b: values of arm B for the same pairs.
        margin: the equivalence margin $m > 0$, in the units of the values (e.g. 0.05 for five
            success points on a rate).
        alpha: the level of each one-sided test, in `(0, 0.5)`.

    Returns:
        An `EquivalenceTest`.

    Raises:
        TypeError: if an input is not a sequence of real numbers.
        ValueError: on mismatched lengths, fewer than 2 pairs, a non-positive `margin`, or
            `alpha` outside `(0, 0.5)`.

    Example:
        >>> close = equivalence_test([0.50, 0.52, 0.49, 0.51, 0.50], [0.50, 0.50, 0.50, 0.50,
        ...                          0.51], margin=0.05)
        >>> close.equivalent, round(close.p_value, 4)
        (True, 0.0006)
    """
    margin = check_range(margin, "margin", low=0.0, low_open=True)
    alpha = check_range(alpha, "alpha", low=0.0, high=0.5, low_open=True, high_open=True)
    diff = paired_difference(a, b, confidence=1.0 - 2.0 * alpha)
    df = diff.n - 1
    if diff.se == 0.0:
        inside = -margin < diff.mean < margin
        return EquivalenceTest(inside, 0.0 if inside else 1.0, diff, margin)
    t_dist = _scipy_stats().t
    p_low = float(t_dist.sf((diff.mean + margin) / diff.se, df))
    p_high = float(t_dist.sf((margin - diff.mean) / diff.se, df))
    p = max(p_low, p_high)
    return EquivalenceTest(p < alpha, p, diff, margin)


def pairs_for_halfwidth(sd: float, halfwidth: float, *, confidence: float = 0.95) -> int:
    r"""The number of pairs (seeds) a paired CI of a given half-width needs.

    The smallest $n \ge 2$ with $t_{1-\alpha/2,\,n-1}\, s_d/\sqrt n \le$ `halfwidth`, for a
    paired spread $s_d$ = `sd` measured in a pilot.

    Args:
        sd: the standard deviation of the paired differences, `>= 0`.
        halfwidth: the target half-width, `> 0`, in the units of `sd`.
        confidence: the confidence level in `(0, 1)`.

    Returns:
        The number of pairs (seeds).

    Raises:
        TypeError: if an argument is not a real number.
        ValueError: on a negative `sd`, a non-positive `halfwidth`, a bad `confidence`, or a
            `halfwidth` so small against `sd` that more than $2^{53}$ pairs would be needed.

    Example:
        >>> pairs_for_halfwidth(sd=21.5, halfwidth=5.0), pairs_for_halfwidth(sd=5.0, halfwidth=2.0)
        (74, 27)
    """
    sd = check_range(sd, "sd", low=0.0)
    halfwidth = check_range(halfwidth, "halfwidth", low=0.0, low_open=True)
    confidence = check_range(confidence, "confidence", low=0.0, high=1.0, low_open=True,
                             high_open=True)
    q = 0.5 + confidence / 2
    z = _normal_quantile(q)
    # t > z, so n >= (z sd / halfwidth)^2; divide before multiplying so the ratio cannot overflow.
    ratio = z * (sd / halfwidth) if sd > 0 else 0.0
    if not ratio * ratio <= _MAX_PAIRS:  # inf included
        smallest = z * (sd / math.sqrt(_MAX_PAIRS))
        raise ValueError(
            f"`halfwidth` must be at least {smallest:.3g} for `sd` = {sd:.3g} (a smaller one needs "
            f"more than 2**53 pairs), got {halfwidth:.3g}."
        )
    n = max(2, math.ceil(ratio * ratio))
    t_dist = _scipy_stats().t
    while float(t_dist.ppf(q, float(n - 1))) * sd / math.sqrt(n) > halfwidth:
        n += 1
    return n


class BinomialInterval(NamedTuple):
    """Result of `binomial_interval` (plain floats).

    Attributes:
        rate: the observed success rate `successes / trials`.
        low: the lower Wilson bound.
        high: the upper Wilson bound.
        trials: the number of trials.
        confidence: the confidence level.
    """

    rate: float
    low: float
    high: float
    trials: int
    confidence: float


def binomial_interval(successes: int, trials: int, *, confidence: float = 0.95) -> BinomialInterval:
    r"""The Wilson score interval of a success rate (Wilson 1927).

    $$
    \frac{\hat p + \frac{z^2}{2n} \pm z\sqrt{\frac{\hat p(1-\hat p)}{n} + \frac{z^2}{4n^2}}}
         {1 + \frac{z^2}{n}}
    $$

    Unlike the normal interval it stays inside $[0, 1]$ and keeps its coverage near 0 and 1,
    where a policy's success rate often sits.

    Args:
        successes: the number of successful episodes, `0 <= successes <= trials`.
        trials: the number of episodes, `> 0`.
        confidence: the confidence level in `(0, 1)`.

    Returns:
        A `BinomialInterval`.

    Raises:
        TypeError: if a count is not an int.
        ValueError: on a count out of range or a bad `confidence`.

    Example:
        >>> ci = binomial_interval(520, 1000)
        >>> round(ci.low, 4), round(ci.high, 4)
        (0.489, 0.5508)
    """
    trials = check_positive_int(trials, "trials")
    successes = check_positive_int(successes, "successes", allow_zero=True)
    if successes > trials:
        raise ValueError(f"`successes` must be <= `trials` ({trials}), got {successes}.")
    confidence = check_probability(confidence, "confidence")
    if confidence >= 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}.")
    z = _normal_quantile(0.5 + confidence / 2)
    p = successes / trials
    den = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / den
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / den
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at the boundary
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return BinomialInterval(p, low, high, trials, confidence)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    r"""Holm's step-down adjusted p-values for a family of tests (Holm 1979).

    With the $m$ p-values sorted ascending, $p_{(1)} \le \dots \le p_{(m)}$, the adjusted
    value of the $k$-th is $\tilde p_{(k)} = \min\bigl(1, \max_{j \le k} (m - j + 1)\,
    p_{(j)}\bigr)$, returned in the input order. Rejecting every test with
    $\tilde p < \alpha$ controls the family-wise error rate at $\alpha$ under any dependence
    between the tests (as between many arms compared with one shared baseline).

    Args:
        p_values: the family's p-values, each in `[0, 1]`.

    Returns:
        The adjusted p-values, in the order given.

    Raises:
        TypeError: if `p_values` is not a sequence of real numbers.
        ValueError: if it is empty or a value lies outside `[0, 1]`.

    Example:
        >>> [round(p, 3) for p in holm_adjust([0.01, 0.04, 0.03, 0.20])]
        [0.04, 0.09, 0.09, 0.2]
    """
    values = _values(p_values, "p_values")
    if not values:
        raise ValueError("`p_values` must hold at least one p-value, got an empty sequence.")
    for i, p in enumerate(values):
        check_probability(p, f"p_values[{i}]", low_open=False)
    m = len(values)
    order = sorted(range(m), key=lambda i: values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[i]))
        adjusted[i] = running
    return adjusted
