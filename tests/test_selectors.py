"""The selector registry: one name -> function dispatch shared by every trainer."""

import pytest
import torch

import chunkmask
from chunkmask import (
    ChunkBudget,
    ProbabilisticChunkMasker,
    SelectorInputs,
    available_selectors,
    get_selector,
    register_selector,
)
from chunkmask.pcm import chunk_score_norm
from chunkmask.selectors import GENERIC_SELECTORS, unregister_selector

BUDGET = 2
LENGTHS = torch.tensor([5, 1, 3, 0, 2])  # variable length, one empty trajectory
N = 6


def _inputs(**kw):
    g = torch.Generator().manual_seed(0)
    valid = torch.arange(N)[None, :] < LENGTHS[:, None]
    phases = torch.where(valid, torch.arange(N)[None, :] % 3, -1)
    masker = ProbabilisticChunkMasker(budget=BUDGET, num_phases=chunkmask.NUM_PHASES, seed=0)
    base = dict(
        valid=valid,
        budget=BUDGET,
        generator=g,
        phases=phases,
        scores=torch.tensor([0.1, 0.5, 0.2, 0.0, 0.0][: chunkmask.NUM_PHASES]),
        advantages=torch.tensor([1.0, -0.5, 0.3, 0.0, 2.0]),
        entropy=torch.rand(len(LENGTHS), N, generator=torch.Generator().manual_seed(1)),
        score_norms=chunk_score_norm(-torch.rand(len(LENGTHS), N, 4)),
        masker=masker,
    )
    base.update(kw)
    return SelectorInputs(**base)


def test_generic_selectors_are_registered():
    assert GENERIC_SELECTORS == (
        "full", "pcm", "random", "top_phase", "entropy_topk", "pps", "neyman"
    )
    assert set(GENERIC_SELECTORS) <= set(available_selectors())


def test_register_round_trip_and_duplicate():
    @register_selector("first_only_test")
    def first(inputs):
        return get_selector("full")(inputs._replace(valid=inputs.valid & (torch.arange(N) == 0)))

    try:
        assert get_selector("first_only_test") is first
        assert "first_only_test" in available_selectors()
        sel = first(_inputs()).check()
        assert sel.counts.tolist() == [1, 1, 1, 0, 1]
        with pytest.raises(ValueError, match="already registered"):
            register_selector("first_only_test")(lambda inputs: None)
        register_selector("first_only_test")(first)  # the same function again: a no-op
        replacement = register_selector("first_only_test", replace=True)(lambda i: first(i))
        assert get_selector("first_only_test") is replacement
    finally:
        unregister_selector("first_only_test")
    assert "first_only_test" not in available_selectors()


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"`selector` must be one of .*'full'.*'pcm'.*got 'nope'"):
        get_selector("nope")
    with pytest.raises(ValueError, match="`selector`"):
        unregister_selector("nope")


@pytest.mark.parametrize("name", GENERIC_SELECTORS)
def test_each_generic_selector_returns_a_valid_selection(name):
    inputs = _inputs()
    sel = get_selector(name)(inputs).check(values=True)
    assert sel.num_traj == len(LENGTHS) and sel.chunks_total == N
    picked = torch.zeros(len(LENGTHS), N, dtype=torch.bool)
    rows = torch.arange(len(LENGTHS))[:, None].expand_as(sel.indices)
    picked[rows[sel.mask], sel.indices[sel.mask]] = True
    assert not (picked & ~inputs.valid).any()  # only valid chunks
    counts = sel.counts
    if name == "full":
        assert counts.tolist() == LENGTHS.tolist()
    elif name == "pps":  # B per trajectory on average over the batch (expected, not exact)
        assert (counts <= LENGTHS).all()
    elif name == "top_phase":  # at most B, from one phase
        assert (counts <= torch.clamp(LENGTHS, max=BUDGET)).all()
    else:  # exactly min(B, T_i)
        assert counts.tolist() == torch.clamp(LENGTHS, max=BUDGET).tolist()


def test_random_with_per_trajectory_budgets():
    budgets = torch.tensor([3, 1, 0, 0, 2])
    sel = get_selector("random")(_inputs(budgets=budgets)).check()
    assert sel.counts.tolist() == [3, 1, 0, 0, 2]


def test_pcm_passes_advantages_to_an_advantage_aware_masker():
    masker = ProbabilisticChunkMasker(
        budget=ChunkBudget(BUDGET, advantage_aware=True), num_phases=chunkmask.NUM_PHASES, seed=0
    )
    sel = get_selector("pcm")(_inputs(masker=masker)).check()
    assert sel.counts[3] == 0  # advantage 0 (and empty)
    with pytest.raises(ValueError, match="`advantages` is required"):
        get_selector("pcm")(_inputs(masker=masker, advantages=None))


@pytest.mark.parametrize(
    ("name", "field"),
    [("pcm", "masker"), ("pcm", "phases"), ("top_phase", "scores"), ("entropy_topk", "entropy"),
     ("pps", "advantages"), ("pps", "score_norms"), ("neyman", "phases"), ("neyman", "scores")],
)
def test_missing_input_is_named(name, field):
    with pytest.raises(ValueError, match=f"`{field}` must be given for selector '{name}'"):
        get_selector(name)(_inputs(**{field: None}))


def _brute_force_neyman(budget, sizes, stds, lower):
    """The integer allocation minimising sum_c N_c^2 s_c^2 (1/n_c - 1/N_c), by enumeration."""
    import itertools

    best, best_alloc = None, None
    ranges = [range(min(lo, n), n + 1) for lo, n in zip(lower, sizes, strict=True)]
    for alloc in itertools.product(*ranges):
        if sum(alloc) != min(budget, sum(sizes)):
            continue
        var = 0.0
        for n_c, size, s in zip(alloc, sizes, stds, strict=True):
            if size == 0 or s == 0:
                continue
            var += float("inf") if n_c == 0 else size**2 * s**2 * (1 / n_c - 1 / size)
        if best is None or var < best - 1e-12:
            best, best_alloc = var, alloc
    return best, best_alloc


def test_neyman_allocation_is_optimal_with_a_floor_and_inclusion_is_n_over_N():
    # 3 trajectories over 3 phases, one of them shorter than B
    phases = torch.tensor([
        [0, 0, 0, 1, 1, 2, 2, 2, 2, 2],
        [0, 1, 1, 1, 1, 1, 1, 2, -1, -1],
        [2, 2, 1, -1, -1, -1, -1, -1, -1, -1],
    ])
    valid = phases >= 0
    scores = torch.tensor([4.0, 0.25, 1.0])  # sigma = 2, 0.5, 1
    budget = 4
    sel = get_selector("neyman")(
        SelectorInputs(valid=valid, budget=budget, phases=phases, scores=scores,
                       generator=torch.Generator().manual_seed(3))
    ).check(values=True)
    stds = scores.sqrt().tolist()
    for i in range(3):
        picked = sel.indices[i][sel.mask[i]]
        got = [int((phases[i, picked] == c).sum()) for c in range(3)]
        sizes = [int((phases[i] == c).sum()) for c in range(3)]
        lower = [1 if n > 0 else 0 for n in sizes]
        best, _ = _brute_force_neyman(budget, sizes, stds, lower)
        var = sum(
            n**2 * s**2 * (1 / g - 1 / n) for g, n, s in zip(got, sizes, stds, strict=True) if n
        )
        assert var == pytest.approx(best)
        assert min(got[c] for c in range(3) if sizes[c]) >= 1  # the floor
        pi = sel.inclusion[i][sel.mask[i]]
        expected = torch.tensor([got[int(phases[i, t])] / sizes[int(phases[i, t])] for t in picked])
        torch.testing.assert_close(pi, expected.to(pi.dtype))
    assert sel.counts.tolist() == [4, 4, 3]


def test_neyman_horvitz_thompson_total_is_unbiased():
    """Mean over draws of sum_t x_t / pi_t over the selected chunks equals sum_t x_t."""
    phases = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]])
    x = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64)[None]
    inputs = SelectorInputs(
        valid=phases >= 0, budget=5, phases=phases, scores=torch.tensor([0.5, 3.0, 0.1, 1.0, 0.0]),
        generator=torch.Generator().manual_seed(11),
    )
    draws = 4000
    estimates = torch.empty(draws, dtype=torch.float64)
    for k in range(draws):
        sel = get_selector("neyman")(inputs)
        picked = sel.indices[0][sel.mask[0]]
        estimates[k] = (x[0, picked] / sel.inclusion[0][sel.mask[0]]).sum()
    se = estimates.std() / draws**0.5
    assert abs(float(estimates.mean()) - float(x.sum())) < 4 * float(se)
    assert float(se) < 0.05  # the test can tell a biased design: a bias of 0.2 would fail


def test_neyman_without_scores_is_proportional():
    phases = torch.tensor([[0] * 8 + [1] * 4])
    sel = get_selector("neyman")(
        SelectorInputs(valid=phases >= 0, budget=6, phases=phases, scores=torch.zeros(5))
    )
    picked = sel.indices[0][sel.mask[0]]
    assert [int((phases[0, picked] == c).sum()) for c in (0, 1)] == [4, 2]


def test_neyman_with_no_valid_chunk_selects_nothing():
    phases = torch.tensor([[0, 1, 2], [1, 1, 2]])
    sel = get_selector("neyman")(
        SelectorInputs(valid=torch.zeros(2, 3, dtype=torch.bool), budget=2, phases=phases,
                       scores=torch.ones(5))
    ).check(values=True)
    assert sel.counts.tolist() == [0, 0] and sel.inclusion is not None
