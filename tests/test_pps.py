import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkmask import masked_grpo_loss, pps_sample
from chunkmask.pcm import chunk_score_norm, pps_inclusion


def pps_inclusion_ref(sizes, total):
    """Slow water-filling: cap the largest unit at 1 while c * s_max > 1, then recompute."""
    s = [float(x) for x in sizes]
    k = min(total, sum(1 for x in s if x > 0))
    pi = [0.0] * len(s)
    capped = set()
    while k - len(capped) > 0:
        rest = [i for i, x in enumerate(s) if x > 0 and i not in capped]
        c = (k - len(capped)) / sum(s[i] for i in rest)
        big = max(rest, key=lambda i: s[i])
        if c * s[big] > 1 + 1e-12:
            capped.add(big)
            continue
        for i in rest:
            pi[i] = c * s[i]
        break
    for i in capped:
        pi[i] = 1.0
    return np.array(pi)


sizes_lists = st.lists(
    st.sampled_from([0.0, 0.5, 1.0, 3.0]) | st.floats(0, 100, allow_subnormal=False),
    min_size=1, max_size=12,
)


@settings(deadline=None, max_examples=150)
@given(sizes_lists, st.integers(0, 14))
def test_inclusion_matches_reference_and_invariants(sizes, total):
    s = torch.tensor(sizes, dtype=torch.float64)
    pi = pps_inclusion(s, total)
    np.testing.assert_allclose(pi.numpy(), pps_inclusion_ref(sizes, total), atol=1e-9)
    positive = int((s > 0).sum())
    assert float(pi.sum()) == pytest.approx(min(total, positive), abs=1e-9)
    assert bool(((pi >= 0) & (pi <= 1)).all()) and bool((pi[s == 0] == 0).all())
    # Monotone in size, and invariant to a common scale and to a permutation of the units.
    order = s.argsort()
    assert bool((pi[order].diff() >= -1e-12).all())
    torch.testing.assert_close(pps_inclusion(s * 7.5, total), pi)
    perm = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(len(sizes)))
    torch.testing.assert_close(pps_inclusion(s[perm], total), pi[perm])


def test_inclusion_rows_tensor_totals_and_valid():
    sizes = torch.tensor([[9.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    pi = pps_inclusion(sizes, torch.tensor([2, 4, 3]))
    torch.testing.assert_close(pi, torch.tensor([[1.0, 1 / 3, 1 / 3, 1 / 3], [1.0] * 4,
                                                 [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    valid = torch.tensor([[True, True, False, False]] * 3)
    pi = pps_inclusion(sizes, 1, valid)
    assert pi[:, 2:].abs().sum() == 0 and pi.sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert pps_inclusion(torch.zeros(2, 0), 3).shape == (2, 0)


def draw(sizes, budget, *, scope="batch", valid=None, generator=None):
    """`pps_sample` and the dense `(traj, chunk)` pi of its design; checks the Selection's pi.

    The batch design's total is B times the rows holding a valid chunk of positive size.
    """
    sel = pps_sample(sizes, budget, scope=scope, valid=valid, generator=generator)
    valid = torch.ones_like(sizes, dtype=torch.bool) if valid is None else valid
    if scope == "batch":
        drawable = sum(bool(((sizes[i] > 0) & valid[i]).any()) for i in range(sizes.shape[0]))
        pi = pps_inclusion(sizes.reshape(1, -1), budget * drawable, valid.reshape(1, -1))
        pi = pi.reshape(sizes.shape)
    else:
        pi = pps_inclusion(sizes, budget, valid)
    assert sel.inclusion is not None and sel.inclusion.dtype == torch.float64
    torch.testing.assert_close(sel.packed_inclusion(), pi[sel.chunk_mask()])
    assert (sel.inclusion[~sel.mask] == 1).all()
    return sel, pi


def test_systematic_draw_has_the_promised_inclusion_probabilities():
    sizes = torch.tensor([[5.0, 1.0, 0.5, 2.0, 0.0, 3.0], [1.0, 1.0, 4.0, 0.2, 0.2, 0.0]])
    gen = torch.Generator().manual_seed(12345)
    n = 20_000
    counts = torch.zeros(2, 6, dtype=torch.float64)
    totals = set()
    for _ in range(n):
        sel, pi = draw(sizes, 2, generator=gen)
        counts += sel.chunk_mask().double()
        totals.add(int(sel.counts.sum()))
    assert totals == {4}  # K = 2 x 2 chunks, exactly, every draw
    freq = counts / n
    se = (pi * (1 - pi) / n).sqrt()
    assert bool(((freq - pi).abs() <= 4.5 * se + 1e-12).all()), (freq, pi)


def test_horvitz_thompson_with_pps_is_unbiased_for_the_full_sum():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, generator=g)  # per-chunk "gradients"
    sizes = x.abs() + 0.1 * torch.rand(3, 8, generator=g)
    estimates = []
    for _ in range(4000):
        sel, pi = draw(sizes, 2, scope="trajectory", generator=g)
        chosen = sel.chunk_mask()
        estimates.append(float(torch.where(chosen, x / pi.float(), 0.0).sum()))
    est = np.array(estimates)
    assert abs(est.mean() - float(x.sum())) < 4.5 * est.std() / math.sqrt(len(est))
    # For positive contributions, sizes proportional to them make the estimator exact (a fixed
    # sample size of terms sum(x) / K each); uniform inclusion does not.
    y = x.abs()
    sel, pi = draw(y, 2, scope="trajectory", generator=g)
    assert float(torch.where(sel.chunk_mask(), y / pi.float(), 0.0).sum()) == pytest.approx(
        float(y.sum()), rel=1e-5
    )
    uniform = []
    for _ in range(200):
        sel, pi = draw(torch.ones(3, 8), 2, scope="trajectory", generator=g)
        uniform.append(float(torch.where(sel.chunk_mask(), y / pi.float(), 0.0).sum()))
    assert np.std(uniform) > 0.5


def test_trajectory_scope_budgets_and_zero_rows():
    sizes = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    sel, pi = draw(sizes, torch.tensor([3, 2, 4]), scope="trajectory",
                   generator=torch.Generator().manual_seed(0))
    assert sel.counts.tolist() == [3, 0, 4]
    assert sel.num_chunks.tolist() == [4, 4, 4]
    assert pi[1].abs().sum() == 0 and pi[2].tolist() == [1.0] * 4


def test_batch_scope_total_counts_only_trajectories_that_can_be_drawn():
    # rows 1 (advantage 0: size 0) and 3 (no valid chunk, e.g. dropped by dynamic sampling)
    # must not add to the batch total K = B x drawable rows
    sizes = torch.tensor([[1.0, 2.0, 3.0, 4.0, 1.0, 1.0], [0.0] * 6, [1.0] * 6, [5.0] * 6])
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[3] = False
    for budget in (1, 2, 3):
        totals = []
        g = torch.Generator().manual_seed(budget)
        for _ in range(50):
            sel, pi = draw(sizes, budget, valid=valid, generator=g)
            totals.append(int(sel.counts.sum()))
            assert float(pi.sum()) == pytest.approx(2 * budget)  # 2 drawable rows
            assert int(sel.counts[1]) == 0 and int(sel.counts[3]) == 0
        assert set(totals) <= {2 * budget}  # systematic PPS: the total is floor/ceil of 2B


def test_loss_with_pps_inclusion_runs_and_equals_full_when_everything_is_drawn():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(2, 3, 4, generator=g).clamp_max(0)
    adv = torch.tensor([1.0, -1.0])
    sel, pi = draw(torch.ones(2, 3), 3, generator=g)  # K >= all: pi = 1
    from chunkmask import Selection, shrink

    packed = shrink({"logp": logp, "adv": adv, "pi": pi.float()}, sel)
    ht = masked_grpo_loss(packed["logp"], old_logp=packed["logp"].detach(), advantages=packed["adv"], selection=sel, estimator="horvitz_thompson")
    full = Selection.from_mask(torch.ones(2, 3, dtype=torch.bool))
    ref = masked_grpo_loss(shrink({"l": logp}, full)["l"], old_logp=shrink({"l": logp}, full)["l"], advantages=shrink({"a": adv}, full)["a"], selection=full)
    torch.testing.assert_close(ht.loss, ref.loss)


def test_chunk_score_norm_is_a_lower_bound_on_the_logit_score_norm():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 6, 9, generator=g) * 3
    p = logits.softmax(-1)
    a = torch.multinomial(p.reshape(-1, 9), 1, generator=g).reshape(4, 5, 6)
    logp = p.log().gather(-1, a[..., None])[..., 0]
    nu = chunk_score_norm(logp)
    exact = (torch.nn.functional.one_hot(a, 9) - p).square().sum((-1, -2)).sqrt()
    assert bool((nu <= exact + 1e-6).all()) and bool((nu >= 0.5 * exact - 1e-6).all())
    ref = (1 - logp.exp()).square().sum(-1).sqrt()
    torch.testing.assert_close(nu, ref)
    mask = torch.zeros(4, 5, 6, dtype=torch.bool)
    assert chunk_score_norm(logp, mask).abs().sum() == 0
    assert chunk_score_norm(logp.double()).dtype == torch.float64
    torch.testing.assert_close(chunk_score_norm(logp.bfloat16()), nu, atol=2e-2, rtol=2e-2)


def test_errors_name_the_argument():
    s = torch.ones(2, 3)
    with pytest.raises(TypeError, match="`sizes`"):
        pps_inclusion(s.long(), 1)
    with pytest.raises(ValueError, match="`sizes` must have at least 1 dimension"):
        pps_inclusion(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match="`sizes`.*finite and non-negative"):
        pps_inclusion(torch.tensor([1.0, -1.0]), 1)
    with pytest.raises(ValueError, match="`sizes`.*finite and non-negative"):
        pps_inclusion(torch.tensor([1.0, float("nan")]), 1)
    pps_inclusion(torch.tensor([1.0, float("nan")]), 1, torch.tensor([True, False]))  # padding
    with pytest.raises(ValueError, match="`budget` must be >= 0, got -1"):
        pps_inclusion(s, -1)
    with pytest.raises(TypeError, match="`budget` must be an int, got float"):
        pps_inclusion(s, 1.5)
    with pytest.raises(ValueError, match=r"`budget` must be an int or have shape \(2,\)"):
        pps_inclusion(s, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="`budget`"):
        pps_inclusion(s, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="`budget` must be >= 0"):
        pps_inclusion(s, torch.tensor([1, -2]))
    with pytest.raises(ValueError, match=r"`valid`.*\(2, 3\)"):
        pps_inclusion(s, 1, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="`scope` must be one of"):
        pps_sample(s, 1, scope="row")
    with pytest.raises(TypeError, match="`budget` must be an int with scope='batch'"):
        pps_sample(s, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="`budget` must be > 0, got 0"):
        pps_sample(s, 0)
    with pytest.raises(ValueError, match="`sizes`.*2 dimensions"):
        pps_sample(torch.ones(3), 1)
    with pytest.raises(TypeError, match="`logp`"):
        chunk_score_norm(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="`logp` must be <= 0"):
        chunk_score_norm(torch.full((1, 2, 3), 0.5))
    with pytest.raises(ValueError, match="`logp`.*3 dimensions"):
        chunk_score_norm(torch.zeros(2, 3))
