"""Advantage-aware budgets: the water-filling rule, per-row budgets in the sampler and the exact
inclusion probabilities, and the masker option."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkmask import ChunkBudget, ProbabilisticChunkMasker, plackett_luce_sample
from chunkmask.pcm import advantage_aware_budgets, inclusion_probabilities


def water_fill_reference(adv, lengths, budget, max_budget=None, total=None):
    """Hand out the total one chunk at a time to the informative row with the fewest so far
    (ties: the lowest index), never past its cap."""
    caps = [min(t, max_budget) if max_budget else t for t in lengths]
    caps = [c if a != 0 else 0 for a, c in zip(adv, caps, strict=True)]
    remaining = sum(min(budget, t) for t in lengths) if total is None else total
    out = [0] * len(adv)
    while remaining > 0:
        open_rows = [i for i in range(len(adv)) if out[i] < caps[i]]
        if not open_rows:
            break
        low = min(out[i] for i in open_rows)
        # one round at the current level, in index order
        for i in open_rows:
            if out[i] == low and remaining > 0:
                out[i] += 1
                remaining -= 1
    return out


@settings(deadline=None, max_examples=80)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(0, 12),
    budget=st.integers(1, 6),
    max_budget=st.sampled_from([None, 6, 9]),
    total=st.sampled_from([None, 0, 5, 40]),
)
def test_water_filling_matches_the_reference(seed, n, budget, max_budget, total):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 12, (n,), generator=g)
    adv = torch.where(torch.rand(n, generator=g) < 0.4, 0.0, torch.randn(n, generator=g))
    if max_budget is not None and max_budget < budget:
        max_budget = budget
    got = advantage_aware_budgets(adv, lengths, budget, max_budget=max_budget, total_budget=total)
    want = water_fill_reference(adv.tolist(), lengths.tolist(), budget, max_budget, total)
    assert got.tolist() == want
    assert (got[adv == 0] == 0).all()


def test_the_total_is_what_a_fixed_budget_would_spend():
    adv = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.5, -0.2, 0.0, 0.3])
    lengths = torch.full((8,), 64)
    b = advantage_aware_budgets(adv, lengths, 12)
    assert int(b.sum()) == 8 * 12 and b.tolist() == [0, 20, 19, 0, 19, 19, 0, 19]


def enumerate_inclusion(w, k):
    n = len(w)
    pi = [0.0] * n
    usable = [i for i in range(n) if w[i] > 0]
    for order in itertools.permutations(usable, min(k, len(usable))):
        p, rest = 1.0, sum(w)
        for i in order:
            p *= w[i] / rest
            rest -= w[i]
        for i in order:
            pi[i] += p
    return pi


def test_inclusion_with_per_row_budgets_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(5, 6, generator=g, dtype=torch.float64) * 3
    w[1, 2] = 0.0
    budgets = torch.tensor([1, 2, 0, 5, 3])
    got = inclusion_probabilities(w, budgets)
    for i in range(5):
        want = enumerate_inclusion(w[i].tolist(), int(budgets[i])) if budgets[i] else [0.0] * 6
        assert got[i].tolist() == pytest.approx(want, abs=1e-10)
    # a uniform tensor budget equals the int form
    torch.testing.assert_close(inclusion_probabilities(w, torch.full((5,), 3)),
                               inclusion_probabilities(w, 3))


def test_sampler_with_budgets_draws_plackett_luce_samples_of_each_size():
    """Selection frequencies over 4e4 draws match the exact inclusion probabilities (|z| < 5)."""
    w = torch.tensor([[1.0, 2.0, 3.0, 0.5, 0.0], [0.3, 1.0, 1.0, 4.0, 2.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    budgets = torch.tensor([1, 3, 0])
    g = torch.Generator().manual_seed(1)
    draws = 40_000
    counts = torch.zeros_like(w)
    for _ in range(draws):
        sel = plackett_luce_sample(w, budgets, slots=4, generator=g, validate_args=False)
        assert (sel.counts == budgets).all()
        counts += sel.chunk_mask().double()
    pi = inclusion_probabilities(w, budgets)
    freq = counts / draws
    se = (pi * (1 - pi) / draws).sqrt().clamp_min(1e-12)
    z = ((freq - pi) / se).abs()
    assert float(z.max()) < 5.0
    assert (freq[pi == 0] == 0).all()


def test_masker_spends_nothing_on_zero_advantage_trajectories():
    g = torch.Generator().manual_seed(2)
    actions = torch.randn(8, 20, 2, 3, generator=g)
    success = torch.tensor([True, True, False, False, True, False, True, True])
    group = torch.arange(8) // 2  # groups 0 and 3: all success; 1: all failure; 2: mixed
    adv = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, -0.7, 0.0, 0.0])
    masker = ProbabilisticChunkMasker(
        budget=ChunkBudget(4, advantage_aware=True), seed=0, inclusion=True
    )
    sel = masker.select(actions=actions, success=success, group=group, advantages=adv)
    # B = 4 for each of the 2 trajectories that reach the update, not 4 x 8 rolled out.
    assert sel.counts.tolist() == [0, 0, 0, 0, 4, 4, 0, 0]
    assert sel.k == 20
    assert sel.inclusion[~sel.mask].eq(1).all() and (sel.packed_inclusion() > 0).all()
    capped = ProbabilisticChunkMasker(budget=ChunkBudget(4, advantage_aware=True, max_budget=10), seed=0)
    sel = capped.select(actions=actions, success=success, group=group, advantages=adv)
    assert sel.k == 10 and sel.counts.tolist() == [0, 0, 0, 0, 4, 4, 0, 0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: advantage_aware_budgets(torch.ones(3), torch.ones(3), 2), TypeError,
         r"`num_chunks` must have an int"),
        (lambda: advantage_aware_budgets(torch.ones(3), torch.ones(2, dtype=torch.long), 2),
         ValueError, r"`num_chunks` must have the same shape as `advantages`"),
        (lambda: advantage_aware_budgets(torch.ones(2), torch.tensor([3, -1]), 2,
                                         validate_args=True), ValueError,
         r"`num_chunks` must be >= 0"),
        (lambda: advantage_aware_budgets(torch.ones(2), torch.ones(2, dtype=torch.long), 0),
         ValueError, r"`budget` must be > 0"),
        (lambda: advantage_aware_budgets(torch.ones(2), torch.ones(2, dtype=torch.long), 1,
                                         total_budget=-1), ValueError, r"`total_budget` must be >= 0"),
        (lambda: plackett_luce_sample(torch.ones(2, 3), torch.tensor([1, 3]), slots=2,
                                      validate_args=True),
         ValueError, r"`budget` must lie in \[0, `slots`=2\]"),
        (lambda: plackett_luce_sample(torch.ones(2, 3), torch.tensor([1.0, 1.0]), slots=2),
         TypeError, r"`budget` must have an int"),
        (lambda: plackett_luce_sample(torch.ones(2, 3), torch.tensor([1]), slots=2),
         ValueError, r"`budget` must have shape \(2,\)"),
        (lambda: plackett_luce_sample(torch.ones(2, 3), 3, slots=2),
         ValueError, r"`slots` must be at least `budget` \(3\), got 2"),
        (lambda: inclusion_probabilities(torch.ones(2, 3), torch.tensor([1, -1])), ValueError,
         r"`budget` must be >= 0 per trajectory"),
        (lambda: ProbabilisticChunkMasker(budget=ChunkBudget(4, advantage_aware=1)), TypeError,
         r"`advantage_aware` must be a bool"),
        (lambda: ProbabilisticChunkMasker(budget=ChunkBudget(4, max_budget=2)), ValueError,
         r"`max_budget` must be >= `budget` \(4\)"),
        (lambda: ProbabilisticChunkMasker(budget=ChunkBudget(2, advantage_aware=True)).select(
            actions=torch.randn(2, 3, 1, 2), success=torch.tensor([True, False]),
            group=torch.tensor([0, 0])), ValueError, r"`advantages` is required"),
        (lambda: ProbabilisticChunkMasker(budget=ChunkBudget(2, advantage_aware=True)).select(
            actions=torch.randn(2, 3, 1, 2), success=torch.tensor([True, False]),
            group=torch.tensor([0, 0]), advantages=torch.ones(3)), ValueError,
         r"`advantages` must have shape \(2,\)"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_budget_zero_rows_and_empty_batches():
    assert advantage_aware_budgets(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).tolist() == []
    assert advantage_aware_budgets(torch.zeros(3), torch.full((3,), 5), 3).tolist() == [0, 0, 0]
    sel = plackett_luce_sample(torch.ones(2, 4), torch.tensor([0, 0]), slots=3)
    assert sel.counts.tolist() == [0, 0] and not math.isnan(float(sel.indices.sum()))
