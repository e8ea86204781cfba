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
    assert GENERIC_SELECTORS == ("full", "pcm", "random", "top_phase", "entropy_topk", "pps")
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
     ("pps", "advantages"), ("pps", "score_norms")],
)
def test_missing_input_is_named(name, field):
    with pytest.raises(ValueError, match=f"`{field}` must be given for selector '{name}'"):
        get_selector(name)(_inputs(**{field: None}))
