import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from _reference.allocation import (
    keep_probabilities_reference,
    knee_reference,
    neyman_brute_force,
    neyman_continuous_reference,
    stratified_variance,
)
from chunkmask.pcm._allocation import (
    BudgetSuggestion,
    keep_probabilities,
    neyman_allocation,
    neyman_allocation_continuous,
    suggest_budget,
)

# ----------------------------------------------------------------------------- keep probabilities


@st.composite
def score_batches(draw):
    rows = draw(st.integers(1, 5))
    phases = draw(st.integers(1, 6))
    values = st.sampled_from([0.0, 0.0, 1e-4, 0.05, 0.3, 1.0, 2.5, 40.0])
    scores = draw(arrays(np.float64, (rows, phases), elements=values))
    defined = draw(arrays(np.bool_, (rows, phases)))
    return torch.from_numpy(scores), torch.from_numpy(defined)


@settings(deadline=None, max_examples=60)
@given(score_batches(), st.sampled_from([0.05, 0.1, 0.5, 1.0]), st.sampled_from([0.5, 1.0, 2.0]))
def test_keep_probabilities_match_reference(batch, p_min, power):
    scores, defined = batch
    # Undefined entries may hold garbage.
    garbage = torch.where(defined, scores, torch.tensor(math.nan, dtype=torch.float64))
    p = keep_probabilities(garbage, defined, p_min=p_min, power=power)
    assert p.dtype == torch.float64
    want = torch.tensor(
        [
            keep_probabilities_reference(s.tolist(), d.tolist(), p_min, power)
            for s, d in zip(scores, defined, strict=True)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(p, want, rtol=1e-12, atol=0)
    assert ((p >= p_min - 1e-12) & (p <= 1)).all()
    informative = (torch.where(defined, scores, 0.0) > 0).any(-1)
    assert (p.amax(-1)[informative] == 1).all()
    assert (p[~informative] == 1).all()
    assert (p[informative][~defined[informative]] == p_min).all()
    perm = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        keep_probabilities(garbage[perm], defined[perm], p_min=p_min, power=power), p[perm]
    )


def test_keep_probabilities_paper_example_and_options():
    scores = torch.tensor([0.0, 0.4, 2.0, 1.0, 0.1])
    torch.testing.assert_close(keep_probabilities(scores), torch.tensor([0.1, 0.2, 1.0, 0.5, 0.1]))
    torch.testing.assert_close(
        keep_probabilities(scores, power=0.5),
        torch.tensor([0.1, math.sqrt(0.2), 1.0, math.sqrt(0.5), math.sqrt(0.05)]),
    )
    defined = torch.tensor([True, True, False, True, True])
    torch.testing.assert_close(
        keep_probabilities(scores, defined, p_min=0.2), torch.tensor([0.2, 0.4, 0.2, 1.0, 0.2])
    )
    # Uniform fallbacks: nothing defined, or all defined scores zero.
    assert keep_probabilities(scores, torch.zeros(5, dtype=torch.bool)).tolist() == [1.0] * 5
    assert keep_probabilities(torch.zeros(4)).tolist() == [1.0] * 4


def test_keep_probabilities_batched_and_dtypes():
    scores = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    p = keep_probabilities(scores)
    assert p.shape == (3, 4, 5) and p.dtype == torch.float32
    torch.testing.assert_close(p[1, 2], keep_probabilities(scores[1, 2]))
    low = keep_probabilities(scores.to(torch.bfloat16))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, keep_probabilities(scores.to(torch.bfloat16).float()))
    assert keep_probabilities(scores.double()).dtype == torch.float64


def test_keep_probabilities_errors():
    s = torch.tensor([0.5, 1.0])
    with pytest.raises(ValueError, match=r"`scores` must be finite and non-negative.*1 bad"):
        keep_probabilities(torch.tensor([0.5, -1.0]), validate_args=True)
    with pytest.raises(ValueError, match=r"`scores` must be finite and non-negative.*1 bad"):
        keep_probabilities(torch.tensor([math.nan, 1.0]), validate_args=True)
    with pytest.raises(ValueError, match=r"`p_min` must lie in \(0.0, 1.0\], got 0.0"):
        keep_probabilities(s, p_min=0.0)
    with pytest.raises(ValueError, match=r"`p_min` must lie in \(0.0, 1.0\], got 1.5"):
        keep_probabilities(s, p_min=1.5)
    with pytest.raises(ValueError, match=r"`power` must be a positive finite number, got 0"):
        keep_probabilities(s, power=0)
    with pytest.raises(ValueError, match=r"`power` must be a positive finite number, got -1.0"):
        keep_probabilities(s, power=-1.0)
    with pytest.raises(ValueError, match=r"`power` must be a positive finite number, got inf"):
        keep_probabilities(s, power=math.inf)
    with pytest.raises(TypeError, match=r"`power` must be a real number, got str"):
        keep_probabilities(s, power="1")
    with pytest.raises(ValueError, match=r"`power` must be a positive finite number, got nan"):
        keep_probabilities(s, power=math.nan)
    with pytest.raises(TypeError, match=r"`scores` must have a float dtype"):
        keep_probabilities(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"`defined` must have a bool dtype"):
        keep_probabilities(s, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"`defined` must have the same shape as `scores` \(2,\)"):
        keep_probabilities(s, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"`scores` must have at least 1 dimensions"):
        keep_probabilities(torch.tensor(1.0))
    # Without validation, bad values at defined phases are the caller's business.
    keep_probabilities(torch.tensor([0.5, -1.0]), validate_args=False)


# ----------------------------------------------------------------------------- Neyman


@st.composite
def allocation_problems(draw):
    rows = draw(st.integers(1, 3))
    phases = draw(st.integers(1, 4))
    sizes = draw(arrays(np.int64, (rows, phases), elements=st.integers(0, 5)))
    stds = draw(
        arrays(np.float64, (rows, phases), elements=st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.7, 4.0]))
    )
    lower = draw(st.integers(0, 2))
    need = np.minimum(sizes, lower).sum(1)
    budgets = [
        draw(st.integers(int(n), int(s.sum()) + 2)) for n, s in zip(need, sizes, strict=True)
    ]
    return torch.from_numpy(sizes), torch.from_numpy(stds), torch.tensor(budgets), lower


@settings(deadline=None, max_examples=80)
@given(allocation_problems())
def test_neyman_allocation_equals_brute_force(problem):
    sizes, stds, budgets, lower = problem
    alloc = neyman_allocation(budgets, sizes, stds, lower=lower)
    assert alloc.dtype == torch.int64 and alloc.shape == sizes.shape
    assert torch.equal(alloc.sum(-1), torch.minimum(budgets, sizes.sum(-1)))
    assert (alloc >= torch.minimum(sizes, torch.tensor(lower))).all() and (alloc <= sizes).all()
    for i in range(sizes.shape[0]):
        got = stratified_variance(alloc[i].tolist(), sizes[i].tolist(), stds[i].tolist())
        best = neyman_brute_force(int(budgets[i]), sizes[i].tolist(), stds[i].tolist(), lower)
        assert got[0] == best[0]
        if best[0] == 0:
            assert math.isclose(got[1], best[1], rel_tol=1e-9, abs_tol=1e-12)
        # The row alone (scalar budget) gives the same answer as the batched call.
        single = neyman_allocation(budgets[i], sizes[i], stds[i], lower=lower)  # 0-d budget
        assert torch.equal(single, alloc[i])
    perm = torch.randperm(sizes.shape[0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        neyman_allocation(budgets[perm], sizes[perm], stds[perm], lower=lower), alloc[perm]
    )


def test_neyman_allocation_equals_brute_force_on_random_cases():
    # Hypothesis favours small, degenerate values; these seeded cases cover generic ones.
    rng = np.random.default_rng(2026)
    for phases in (2, 3, 4):
        rows = 100
        sizes = rng.integers(0, 7, size=(rows, phases))
        stds = np.round(rng.uniform(0.0, 3.0, size=(rows, phases)), 3)
        stds[rng.random((rows, phases)) < 0.1] = 0.0
        lower = int(rng.integers(0, 2))
        need = np.minimum(sizes, lower).sum(1)
        budgets = np.array([rng.integers(n, s.sum() + 2) for n, s in zip(need, sizes, strict=True)])
        alloc = neyman_allocation(
            torch.from_numpy(budgets), torch.from_numpy(sizes), torch.from_numpy(stds), lower=lower
        )
        for i in range(rows):
            got = stratified_variance(alloc[i].tolist(), sizes[i].tolist(), stds[i].tolist())
            best = neyman_brute_force(int(budgets[i]), sizes[i].tolist(), stds[i].tolist(), lower)
            assert got[0] == best[0]
            if best[0] == 0:
                assert math.isclose(got[1], best[1], rel_tol=1e-9, abs_tol=1e-12)


def test_neyman_allocation_examples():
    sizes = torch.tensor([20, 10, 30])
    stds = torch.tensor([1.0, 4.0, 0.5])
    assert neyman_allocation(12, sizes, stds).tolist() == [3, 7, 2]
    assert neyman_allocation(100, sizes, stds).tolist() == [20, 10, 30]  # take all
    assert neyman_allocation(torch.tensor(0), sizes, stds).tolist() == [0, 0, 0]  # per-row 0
    # Zero-variance and empty phases only receive what is left over.
    assert neyman_allocation(
        5, torch.tensor([3, 4, 0]), torch.tensor([1.0, 0.0, 9.0])
    ).tolist() == [3, 2, 0]
    # Lower bounds are met first and capped at the size.
    assert neyman_allocation(6, sizes, stds, lower=torch.tensor([2, 0, 3])).tolist() == [2, 1, 3]
    assert neyman_allocation(
        5, torch.tensor([1, 5]), torch.tensor([9.0, 1.0]), lower=4
    ).tolist() == [1, 4]
    # Leading batch dims.
    batched = neyman_allocation(12, sizes.expand(2, 3, 3), stds.expand(2, 3, 3))
    assert batched.shape == (2, 3, 3) and (batched == torch.tensor([3, 7, 2])).all()


@settings(deadline=None, max_examples=60)
@given(allocation_problems())
def test_neyman_continuous_matches_reference(problem):
    sizes, stds, budgets, _ = problem
    alloc = neyman_allocation_continuous(budgets.to(torch.float64), sizes, stds)
    assert alloc.dtype == torch.float64
    torch.testing.assert_close(
        alloc.sum(-1),
        torch.minimum(budgets, sizes.sum(-1)).to(torch.float64),
        rtol=1e-12,
        atol=1e-9,
    )
    assert (alloc >= 0).all() and (alloc <= sizes + 1e-12).all()
    for i in range(sizes.shape[0]):
        want = neyman_continuous_reference(float(budgets[i]), sizes[i].tolist(), stds[i].tolist())
        torch.testing.assert_close(
            alloc[i], torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9
        )


def test_neyman_continuous_uncapped_is_proportional_to_n_sigma():
    sizes = torch.tensor([20.0, 10.0, 30.0])
    stds = torch.tensor([1.0, 4.0, 0.5])
    area = sizes.double() * stds.double()
    torch.testing.assert_close(
        neyman_allocation_continuous(12, sizes, stds), 12 * area / area.sum()
    )
    torch.testing.assert_close(
        neyman_allocation_continuous(12, sizes, torch.zeros(3)), 12 * sizes.double() / 60
    )


def test_neyman_errors():
    sizes = torch.tensor([3, 4])
    stds = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got -1"):
        neyman_allocation(-1, sizes, stds)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got 0"):
        neyman_allocation(0, sizes, stds)
    with pytest.raises(ValueError, match=r"`budget` must be finite and non-negative, got 1 bad value\(s\) \(first: -1\)"):
        neyman_allocation(torch.tensor([-1, 2]), sizes.expand(2, 2), stds.expand(2, 2))
    with pytest.raises(TypeError, match=r"`budget` must have an int dtype"):
        neyman_allocation(torch.tensor(2.0), sizes, stds)
    with pytest.raises(TypeError, match=r"`budget` must be an int or an integer tensor, got float"):
        neyman_allocation(2.5, sizes, stds)
    with pytest.raises(ValueError, match=r"`budget` must be a scalar or have the batch shape \(\)"):
        neyman_allocation(torch.tensor([1, 2]), sizes, stds)
    with pytest.raises(ValueError, match=r"`sizes` must be finite and non-negative, got 1 bad value\(s\) \(first: -2\)"):
        neyman_allocation(2, torch.tensor([3, -2]), stds)
    with pytest.raises(ValueError, match=r"`stds` must be finite and non-negative, got 1 bad"):
        neyman_allocation(2, sizes, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"`stds` must be finite and non-negative, got 1 bad"):
        neyman_allocation(2, sizes, torch.tensor([math.nan, 1.0]))
    with pytest.raises(ValueError, match=r"`stds` must have the same shape as `sizes` \(2,\)"):
        neyman_allocation(2, sizes, torch.ones(3))
    with pytest.raises(TypeError, match=r"`sizes` must have an int dtype"):
        neyman_allocation(2, sizes.float(), stds)
    with pytest.raises(ValueError, match=r"`lower` must be >= 0, got -1"):
        neyman_allocation(2, sizes, stds, lower=-1)
    with pytest.raises(
        ValueError, match=r"`lower` \(capped at `sizes`\) must sum to at most `budget`"
    ):
        neyman_allocation(3, sizes, stds, lower=2)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got -1.0"):
        neyman_allocation_continuous(-1.0, sizes, stds)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got 0"):
        neyman_allocation_continuous(0, sizes, stds)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got nan"):
        neyman_allocation_continuous(math.nan, sizes, stds)
    with pytest.raises(ValueError, match=r"`budget` must be finite and non-negative"):
        neyman_allocation_continuous(torch.tensor(-1.0), sizes, stds)
    with pytest.raises(ValueError, match=r"`sizes` must be finite and non-negative"):
        neyman_allocation_continuous(2, torch.tensor([1.0, -1.0]), stds)
    with pytest.raises(ValueError, match=r"`stds` must be finite and non-negative"):
        neyman_allocation_continuous(2, sizes, torch.tensor([1.0, math.inf]))
    with pytest.raises(TypeError, match=r"`budget` must be a number or a tensor, got str"):
        neyman_allocation_continuous("2", sizes, stds)


# ----------------------------------------------------------------------------- budget knee


def test_suggest_budget_matches_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        phase_weight = torch.tensor([0.1, 0.3, 1.0, 0.6, 0.1])
        phases = torch.randint(0, 5, (8, 40), generator=gen)
        scores = phase_weight[phases] * (0.5 + torch.rand(8, 40, generator=gen))
        valid = torch.arange(40) < torch.randint(20, 41, (8, 1), generator=gen)
        got = suggest_budget(scores, valid)
        budget, x, y = knee_reference(scores.tolist(), valid.tolist())
        assert isinstance(got, BudgetSuggestion)
        assert got.budget == budget and got.fraction == budget / 40
        torch.testing.assert_close(got.curve_x, torch.tensor(x, dtype=torch.float64))
        torch.testing.assert_close(got.curve_y, torch.tensor(y, dtype=torch.float64))


def test_suggest_budget_concave_and_degenerate_curves():
    # A sharply concentrated signal: two chunks hold most of the mass.
    scores = torch.tensor([5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    suggestion = suggest_budget(scores)
    assert (suggestion.budget, suggestion.fraction) == (2, 0.25)
    assert suggestion.curve_y[0] == 0 and suggestion.curve_y[-1] == 1
    # Flat signal: no knee, keep everything.
    assert suggest_budget(torch.ones(2, 6)).budget == 6
    # Trajectories with no mass are left out of the mean.
    both = torch.stack([scores, torch.zeros(8)])
    torch.testing.assert_close(suggest_budget(both).curve_y, suggestion.curve_y)
    # Permuting trajectories or chunks within a trajectory changes nothing.
    rows = torch.rand(5, 16, generator=torch.Generator().manual_seed(1)) ** 4
    base = suggest_budget(rows)
    shuffled = rows[torch.randperm(5)][:, torch.randperm(16)]
    assert suggest_budget(shuffled).budget == base.budget


def test_suggest_budget_errors():
    with pytest.raises(ValueError, match=r"`scores` must be finite and non-negative.*1 bad"):
        suggest_budget(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"`scores` must have a positive score at a `valid` chunk"):
        suggest_budget(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`scores` must have 1 or 2 dimensions"):
        suggest_budget(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"`valid` must have the same shape as `scores` \(2, 3\)"):
        suggest_budget(torch.ones(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"`valid` must have a bool dtype"):
        suggest_budget(torch.ones(2, 3), torch.ones(2, 3))
