"""Tests for chunkmask.eval: known answers on synthetic chunk gradients, loop references,
jackknife calibration, the sketch's unbiased inner products, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkmask.eval._diagnostics import (
    GradientSketch,
    gradient_cosine,
    phase_shares,
    selector_statistics,
)

F64 = torch.float64


def unchecked(fn):
    return getattr(fn, "__wrapped__", fn)


# ----------------------------------------------------------------------------- references


def cross_ref(x, y):
    """<E x, E y> by the explicit double sum over pairs of different batches."""
    n = len(x)
    total = math.fsum(float(x[a] @ y[b]) for a in range(n) for b in range(n) if a != b)
    return total / (n * (n - 1))


def stats_ref(full, sel):
    """The statistics written out, and their jackknife SEs by recomputation without each batch."""

    def point(f, s):
        m_f = sum(float(v @ v) for v in f) / len(f)
        m_s = sum(float(v @ v) for v in s) / len(s)
        ff, sf = cross_ref(f, f), cross_ref(s, f)
        infl, sig = m_s / m_f, sf / ff
        return [infl, sig, ff / m_f, max(sig, 0.0) ** 2 / infl]

    est = point(full, sel)
    n = len(full)
    loo = [point(torch.cat([full[:b], full[b + 1 :]]), torch.cat([sel[:b], sel[b + 1 :]]))
           for b in range(n)]
    ses = []
    for k in range(4):
        vals = [row[k] for row in loo]
        mean = sum(vals) / n
        ses.append(math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in vals)))
    return est, ses


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 9), dim=st.integers(1, 6))
def test_statistics_match_the_loop_reference(seed, n, dim):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, dim, generator=g, dtype=F64) + 0.7
    sign = 1.0 if seed % 2 else -1.0  # both signs of the signal ratio
    sel = sign * 1.5 * full + torch.randn(n, dim, generator=g, dtype=F64)
    got = selector_statistics(full, sel)
    (infl, sig, frac, eff), (infl_se, sig_se, frac_se, eff_se) = stats_ref(full, sel)
    values = [got.second_moment_ratio, got.signal_ratio, got.full_signal_fraction, got.efficiency]
    for ours, theirs in zip(values, [infl, sig, frac, eff], strict=True):
        assert ours.item() == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    ses = [got.second_moment_ratio_se, got.signal_ratio_se, got.full_signal_fraction_se,
           got.efficiency_se]
    for ours, theirs in zip(ses, [infl_se, sig_se, frac_se, eff_se], strict=True):
        assert ours.item() == pytest.approx(theirs, rel=1e-7, abs=1e-10)
    assert got.num_batches == n


# ----------------------------------------------------------------------------- known answers


def chunk_gradients(g, batches, chunks, dim, *, mean=None, correlated=False, sigma=1.0):
    """(batches, chunks, dim) per-chunk gradient contributions."""
    if correlated:
        base = torch.randn(batches, 1, dim, generator=g, dtype=F64) * sigma
        grads = base.expand(batches, chunks, dim).clone()
    else:
        grads = torch.randn(batches, chunks, dim, generator=g, dtype=F64) * sigma
    if mean is not None:
        grads = grads + mean
    return grads


def masked_mean_of_random_chunks(g, grads, budget):
    """The masked estimator: the mean over `budget` chunks drawn uniformly without replacement."""
    batches, chunks, _ = grads.shape
    keys = torch.rand(batches, chunks, generator=g)
    picked = keys.argsort(1)[:, :budget]
    return torch.gather(grads, 1, picked[..., None].expand(-1, -1, grads.shape[-1])).mean(1)


def test_perfectly_correlated_chunks_cost_nothing():
    g = torch.Generator().manual_seed(0)
    grads = chunk_gradients(g, 50, 16, 8, correlated=True, mean=0.3)
    stats = selector_statistics(grads.mean(1), masked_mean_of_random_chunks(g, grads, 4))
    assert stats.second_moment_ratio.item() == pytest.approx(1.0, abs=1e-12)
    assert stats.signal_ratio.item() == pytest.approx(1.0, abs=1e-12)
    assert stats.efficiency.item() == pytest.approx(1.0, abs=1e-12)
    assert stats.second_moment_ratio_se.item() < 1e-12


@pytest.mark.parametrize(("chunks", "budget"), [(16, 4), (64, 12), (10, 10)])
def test_independent_chunks_inflate_by_T_over_B(chunks, budget):
    g = torch.Generator().manual_seed(chunks + budget)
    grads = chunk_gradients(g, 1500, chunks, 16)
    stats = selector_statistics(grads.mean(1), masked_mean_of_random_chunks(g, grads, budget))
    want = chunks / budget
    se = stats.second_moment_ratio_se.item()
    assert 0 < se < 0.05 * want
    assert abs(stats.second_moment_ratio.item() - want) < 5 * se
    # pure noise: the full gradient has no signal, and efficiency is not identifiable
    assert abs(stats.full_signal_fraction.item()) < 5 * stats.full_signal_fraction_se.item()


def test_unbiased_selector_keeps_the_signal_and_efficiency_is_predicted():
    g = torch.Generator().manual_seed(3)
    dim, chunks, budget = 16, 16, 4
    mu = torch.full((dim,), 0.25, dtype=F64)
    grads = chunk_gradients(g, 3000, chunks, dim, mean=mu)
    stats = selector_statistics(grads.mean(1), masked_mean_of_random_chunks(g, grads, budget))
    assert abs(stats.signal_ratio.item() - 1.0) < 5 * stats.signal_ratio_se.item()
    assert stats.signal_ratio_se.item() < 0.05
    # E|g_S|^2 / E|g|^2 = (|mu|^2 + d/B) / (|mu|^2 + d/T)
    m2 = float(mu @ mu)
    want = (m2 + dim / budget) / (m2 + dim / chunks)
    assert abs(stats.second_moment_ratio.item() - want) < 5 * stats.second_moment_ratio_se.item()
    assert abs(stats.full_signal_fraction.item() - m2 / (m2 + dim / chunks)) < 5 * (
        stats.full_signal_fraction_se.item()
    )
    assert abs(stats.efficiency.item() - 1 / want) < 5 * stats.efficiency_se.item()


def test_a_selector_against_the_signal_makes_no_progress():
    """signal ratio -1: the squared ratio would predict full progress; a positive step has none."""
    g = torch.Generator().manual_seed(5)
    full = chunk_gradients(g, 200, 8, 6, mean=torch.full((6,), 0.5, dtype=F64)).mean(1)
    stats = selector_statistics(full, -full)
    assert stats.signal_ratio.item() == pytest.approx(-1.0, abs=1e-12)
    assert stats.second_moment_ratio.item() == pytest.approx(1.0, abs=1e-12)
    assert stats.efficiency.item() == 0.0 and stats.efficiency_se.item() == 0.0
    # the same selector with its sign restored is the full gradient: efficiency 1
    assert selector_statistics(full, full).efficiency.item() == pytest.approx(1.0, abs=1e-12)


def test_signal_in_one_phase():
    """Chunks 0-3 (phase 0) carry the signal; a selector that only sees phase 1 has none."""
    g = torch.Generator().manual_seed(4)
    batches, chunks, dim = 2000, 16, 8
    mean = torch.zeros(chunks, dim, dtype=F64)
    mean[:4] = 0.5
    grads = chunk_gradients(g, batches, chunks, dim, mean=mean)
    full = grads.sum(1)  # token-sum: the full gradient sums the chunks
    phase1_only = grads[:, 4:].sum(1) * (chunks / 12)
    blind = selector_statistics(full, phase1_only)
    assert abs(blind.signal_ratio.item()) < 5 * blind.signal_ratio_se.item()
    assert blind.signal_ratio_se.item() < 0.1
    # Horvitz-Thompson with uniform inclusion B/T: unbiased, so signal ratio 1
    keys = torch.rand(batches, chunks, generator=g).argsort(1)[:, :4]
    chosen = torch.zeros(batches, chunks, dtype=torch.bool).scatter_(1, keys, True)
    ht = (grads * chosen[..., None]).sum(1) * (chunks / 4)
    unbiased = selector_statistics(full, ht)
    assert abs(unbiased.signal_ratio.item() - 1.0) < 5 * unbiased.signal_ratio_se.item()
    # per phase, the unbiased selector's signal sits in phase 0
    parts = torch.stack(
        [(grads * (chosen & (torch.arange(chunks) < 4))[..., None]).sum(1),
         (grads * (chosen & (torch.arange(chunks) >= 4))[..., None]).sum(1)], 1
    ) * (chunks / 4)
    shares = phase_shares(full, parts)
    assert shares.signal.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert shares.second_moment.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert abs(shares.signal[0].item() - 1.0) < 5 * shares.signal_se[0].item()
    assert abs(shares.signal[1].item()) < 5 * shares.signal_se[1].item()
    # phase 1 holds 3/4 of the chunks and so about 3/4 of the noise
    assert 0.55 < shares.second_moment[1].item() < 0.85


def test_jackknife_standard_errors_are_calibrated():
    """Over 200 independent studies, the mean jackknife SE matches the spread of the estimates."""
    g = torch.Generator().manual_seed(5)
    estimates, ses = [], []
    for _ in range(200):
        grads = chunk_gradients(g, 40, 8, 4, mean=torch.full((4,), 0.4, dtype=F64))
        stats = selector_statistics(grads.mean(1), masked_mean_of_random_chunks(g, grads, 2))
        estimates.append(stats.second_moment_ratio.item())
        ses.append(stats.second_moment_ratio_se.item())
    spread = torch.tensor(estimates).std().item()
    assert 0.75 < (sum(ses) / len(ses)) / spread < 1.35


def test_phase_shares_match_the_loop_reference():
    g = torch.Generator().manual_seed(6)
    parts = torch.randn(7, 3, 5, generator=g, dtype=F64) + torch.tensor([0.5, -0.2, 0.0])[:, None]
    full = parts.sum(1) + 0.3 * torch.randn(7, 5, generator=g, dtype=F64)
    got = phase_shares(full, parts)
    s = parts.sum(1)
    for k in range(3):
        want_signal = cross_ref(parts[:, k], full) / cross_ref(s, full)
        want_moment = sum(float(parts[b, k] @ s[b]) for b in range(7)) / sum(
            float(s[b] @ s[b]) for b in range(7)
        )
        assert got.signal[k].item() == pytest.approx(want_signal, rel=1e-9)
        assert got.second_moment[k].item() == pytest.approx(want_moment, rel=1e-9)
    assert (got.signal_se > 0).all() and (got.second_moment_se > 0).all()


# ----------------------------------------------------------------------------- sketch and probe


def test_sketch_is_linear_deterministic_and_concatenation_invariant():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(5, 3, generator=g), torch.randn(11, generator=g)
    sketch = GradientSketch(dim=32, seed=3)
    whole = sketch([torch.cat([a.reshape(-1), b])])
    torch.testing.assert_close(sketch([a, None, b]), whole)
    torch.testing.assert_close(sketch([2 * a, 2 * b]), 2 * whole)
    torch.testing.assert_close(GradientSketch(dim=32, seed=3)([a, b]), whole)
    assert not torch.allclose(GradientSketch(dim=32, seed=4)([a, b]), whole)
    # bf16 gradients are read in float64
    torch.testing.assert_close(sketch([a.bfloat16(), b.bfloat16()]),
                               sketch([a.bfloat16().float(), b.bfloat16().float()]))
    assert sketch([]).abs().sum() == 0


def test_sketch_preserves_inner_products_in_expectation():
    """Averaged over 400 seeds, <Rx, Ry> estimates <x, y> within 5 standard errors."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, generator=g, dtype=F64)
    y = 0.6 * x + torch.randn(300, generator=g, dtype=F64)
    values = torch.stack([GradientSketch(dim=16, seed=s)([x]) @ GradientSketch(dim=16, seed=s)([y])
                          for s in range(400)])
    se = values.std() / math.sqrt(400)
    assert abs(values.mean() - x @ y) < 5 * se
    norms = torch.stack([GradientSketch(dim=16, seed=s)([x]).square().sum() for s in range(400)])
    assert abs(norms.mean() - x @ x) < 5 * norms.std() / math.sqrt(400)


def test_gradient_cosine():
    a = [torch.tensor([1.0, 2.0]), None, torch.tensor([[3.0]])]
    b = [torch.tensor([2.0, 0.0]), torch.tensor([1.0]), torch.tensor([[-1.0]])]
    x = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=F64)
    y = torch.tensor([2.0, 0.0, 1.0, -1.0], dtype=F64)
    want = (x @ y) / (x.norm() * y.norm())
    assert gradient_cosine(a, b).item() == pytest.approx(want.item(), rel=1e-12)
    assert gradient_cosine(torch.zeros(3), torch.ones(3)).item() == 0.0
    assert gradient_cosine([None], [None]).item() == 0.0
    assert gradient_cosine(x, x).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- errors

Z = torch.zeros(5, 3, dtype=F64)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: selector_statistics(Z[:2], Z[:2]), ValueError, r"`full` must hold at least 3"),
        (lambda: selector_statistics(Z, Z[:4]), ValueError, r"`selected` must have the same shape"),
        (lambda: selector_statistics(Z.long(), Z), TypeError, r"`full` must have a float"),
        (lambda: selector_statistics(Z[0], Z[0]), ValueError, r"`full` must have 2 dimensions"),
        (lambda: selector_statistics(Z, Z.clone().fill_(float("nan"))), ValueError,
         r"`selected` must be finite"),
        (lambda: phase_shares(Z, Z[:, None, :2]), ValueError, r"`parts` must have shape \(5, phase, 3\)"),
        (lambda: phase_shares(Z, Z), ValueError, r"`parts` must have 3 dimensions"),
        (lambda: GradientSketch(dim=0), ValueError, r"`dim` must be > 0"),
        (lambda: GradientSketch(dim=8.0), TypeError, r"`dim` must be an int"),
        (lambda: GradientSketch(seed=-1), ValueError, r"`seed` must be >= 0"),
        (lambda: GradientSketch(seed=True), TypeError, r"`seed` must be an int"),
        (lambda: GradientSketch()([torch.ones(2, dtype=torch.int64)]), TypeError,
         r"`grads\[0\]` must have a float"),
        (lambda: GradientSketch()([None, torch.tensor([float("inf")])]), ValueError,
         r"`grads\[1\]` must be finite"),
        (lambda: gradient_cosine([torch.ones(2)], []), ValueError, r"`b` must hold as many"),
        (lambda: gradient_cosine([torch.ones(2)], [torch.ones(3)]), ValueError,
         r"`b\[0\]` must have the same shape as `a\[0\]`"),
        (lambda: gradient_cosine(["x"], [torch.ones(3)]), TypeError, r"`a\[0\]` must be a torch"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
