"""Slow, obviously correct float64 oracles for `chunkmask.pcm` (Python loops, brute force)."""

import itertools


def keep_probabilities_reference(scores, defined, p_min=0.1, power=1.0):
    """Eq. 8-9 for one row of phases, written out step by step."""
    idx = [c for c in range(len(scores)) if defined[c]]
    total = sum(float(scores[c]) for c in idx)
    if not idx or total == 0:
        return [1.0] * len(scores)
    share = {c: float(scores[c]) / total for c in idx}  # Eq. 8
    top = max(share.values())
    out = []
    for c in range(len(scores)):
        if c in share:
            out.append(max(p_min, (share[c] / top) ** power))  # Eq. 9
        else:
            out.append(p_min)
    return out


def stratified_variance(alloc, sizes, stds):
    """(number of uncovered positive-variance strata, finite part of sum A^2 (1/n - 1/N))."""
    uncovered = 0
    finite = 0.0
    for n, size, sd in zip(alloc, sizes, stds, strict=True):
        area = size * sd
        if size == 0 or area == 0:
            continue
        if n == 0:
            uncovered += 1
            continue
        finite += area * area * (1.0 / n - 1.0 / size)
    return uncovered, finite


def neyman_brute_force(budget, sizes, stds, lower=0):
    """Best (uncovered, variance) over every integer allocation with lower <= n <= N, sum = B."""
    budget = min(budget, sum(sizes))
    ranges = [range(min(lower, size), size + 1) for size in sizes]
    best = None
    for alloc in itertools.product(*ranges):
        if sum(alloc) != budget:
            continue
        value = stratified_variance(alloc, sizes, stds)
        if (
            best is None
            or value[0] < best[0]
            or (value[0] == best[0] and value[1] < best[1] - 1e-12 * max(1.0, abs(best[1])))
        ):
            best = value
    return best


def neyman_continuous_reference(budget, sizes, stds, iters=200):
    """Capped Neyman b_c = min(N_c, lambda A_c) with lambda found by bisection."""
    total = sum(sizes)
    if budget >= total:
        return [float(s) for s in sizes]
    areas = [n * s for n, s in zip(sizes, stds, strict=True)]
    if sum(min(n, 1e300 * a) if a > 0 else 0.0 for n, a in zip(sizes, areas, strict=True)) < budget:
        # Positive-variance strata cannot absorb the budget: fill them, then proportional to N.
        fixed = [float(n) if a > 0 else 0.0 for n, a in zip(sizes, areas, strict=True)]
        rest = budget - sum(fixed)
        free = sum(n for n, a in zip(sizes, areas, strict=True) if a == 0)
        return [
            f if a > 0 else rest * n / free for f, n, a in zip(fixed, sizes, areas, strict=True)
        ]
    lo, hi = 0.0, 1.0
    while sum(min(n, hi * a) for n, a in zip(sizes, areas, strict=True)) < budget:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if sum(min(n, mid * a) for n, a in zip(sizes, areas, strict=True)) < budget:
            lo = mid
        else:
            hi = mid
    lam = (lo + hi) / 2
    return [min(float(n), lam * a) for n, a in zip(sizes, areas, strict=True)]


def knee_reference(scores, valid):
    """App. D: mean captured-share curve over informative trajectories and argmax(y - x)."""
    n = len(scores[0])
    curves = []
    for row, mask in zip(scores, valid, strict=True):
        vals = sorted((float(s) for s, m in zip(row, mask, strict=True) if m), reverse=True)
        total = sum(vals)
        if total <= 0:
            continue
        curve = [0.0]
        acc = 0.0
        for m in range(1, n + 1):
            if m <= len(vals):
                acc += vals[m - 1]
            curve.append(min(acc / total, 1.0))
        curves.append(curve)
    y = [sum(c[m] for c in curves) / len(curves) for m in range(n + 1)]
    x = [m / n for m in range(n + 1)]
    gaps = [(y[m] - y[0]) / (y[-1] - y[0]) - x[m] for m in range(n + 1)]
    best = max(range(n + 1), key=lambda m: (gaps[m], -m))
    if gaps[best] <= 1e-12:
        best = n
    return best, x, y
