"""Bad and degenerate input across the public API, in one table.

`CASES` is the table: rows `(id, call, error, match)` where `call()` must raise `error` (a
`ValueError` or `TypeError`, or an `ImportError` for a missing optional dependency) whose message
matches the regex `match`, which names the argument ("`name` must ..."). One parametrised test
runs every row. The rows come from two places:

- `EXPLICIT`: hand-written calls with their exact messages (defects found by the bad-input sweep);
- `FUZZ`: rows `(id, function, kwargs builder (t, n) -> dict, argument, classes)` expanded over a
  few `(traj, chunk)` shapes into one case per bad value, the values made by class from a valid
  one (see `tests/_fuzz.py`); such a case must raise a `ValueError` or `TypeError` naming the
  argument. Value checks (finite, range, contents) run only with `validate_args=True`, so rows of
  value classes pass it explicitly.

Then: `DEGENERATE` lists legal corner cases that must return finite outputs, and hypothesis
property tests check the numerically delicate functions (cosines, Neyman allocation, paired
differences) at huge and tiny scales.

Tests that assert our own error messages run in the plain pass only (conftest skips them in the
jaxtyping pass, which stops wrongly typed arguments before our checks word the error).
"""

import inspect
import math
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkmask as cm
from _fuzz import bad_values, check_finite_output, check_rejects
from _reference.inclusion import loss_kwargs, with_packed_inclusion
from chunkmask import (
    NUM_PHASES,
    PhaseLabelling,
    PhaseScoring,
    ProbabilisticChunkMasker,
    Selection,
    gripper_close_fraction,
    keep_probabilities,
    label_gripper_phases,
    plackett_luce_sample,
    pps_sample,
    shrink,
    success_failure_variance,
    unshrink,
)
from chunkmask.eval import (
    GradientSketch,
    binomial_interval,
    equivalence_test,
    gradient_cosine,
    paired_difference,
    pairs_for_halfwidth,
    phase_shares,
)
from chunkmask.offpolicy import staleness, staleness_filter
from chunkmask.pcm import (
    PhaseScoreBuffer,
    advantage_aware_budgets,
    chunk_score_norm,
    inclusion_probabilities,
    label_grasp_onset,
    label_time_segments,
    neyman_allocation,
    neyman_allocation_continuous,
    pps_inclusion,
    stratified_sample,
    suggest_budget,
    top_phase_sample,
    topk_sample,
    uniform_sample,
)
from chunkmask.selfbc import SuccessBuffer


@pytest.fixture
def _plain_pass_only(request):
    try:
        typed = bool(request.config.getoption("jaxtyping_packages"))
    except ValueError:
        typed = False
    if typed:
        pytest.skip("checks degenerate input our own way; runs in the plain (unchecked) pass")


@contextmanager
def _scipy_hidden():
    """Make `import scipy` fail inside the block (as on a machine without SciPy)."""
    saved = {k: v for k, v in sys.modules.items() if k == "scipy" or k.startswith("scipy.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["scipy"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        del sys.modules["scipy"]
        sys.modules.update(saved)


def _without_scipy(fn: Callable[[], Any]) -> Any:
    with _scipy_hidden():
        return fn()


def _buffer_with_one():
    buf = SuccessBuffer(2)
    buf.add({"x": torch.ones(3)}, steps=1)
    return buf


_X = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
_B3 = {"x": torch.ones(2, 3)}

# ----------------------------------------------------------------------------- explicit cases

# (id, call, error, regex the message must match)
EXPLICIT: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    # staleness: both forms check versions alike, under validate_args
    ("staleness/newer_1d", lambda: staleness_filter(torch.tensor([7]), 5, 2, validate_args=True), ValueError, r"`versions` must not be newer than `current_version` \(5\), got 7"),
    ("staleness/newer_2d", lambda: staleness_filter(torch.tensor([[3, 7]]), 5, 2, validate_args=True), ValueError, r"`versions` must not be newer than `current_version` \(5\), got 7"),
    ("staleness/negative_2d", lambda: staleness_filter(torch.tensor([[-1, 3]]), 5, 2, validate_args=True), ValueError, r"`versions` must be >= 0, got -1"),
    ("staleness/newer_tensor_current", lambda: staleness(torch.tensor([3, 9]), torch.tensor(5), validate_args=True), ValueError, r"`versions` must not be newer.*got 9"),
    ("staleness/float_versions_empty_chunks", lambda: staleness_filter(torch.zeros(4, 0), 5, 2), TypeError, r"`versions` must have an int"),
    ("staleness/current_float", lambda: staleness_filter(torch.zeros(4, 0, dtype=torch.long), 5.0, 2), TypeError, r"`current_version` must be an int"),
    # advantage-aware budgets: a negative total is rejected in both forms
    ("aab/total_int_negative", lambda: advantage_aware_budgets(torch.ones(3), torch.tensor([4, 4, 4]), 2, total_budget=-3), ValueError, r"`total_budget` must be >= 0, got -3"),
    ("aab/total_tensor_negative", lambda: advantage_aware_budgets(torch.ones(3), torch.tensor([4, 4, 4]), 2, total_budget=torch.tensor(-3), validate_args=True), ValueError, r"`total_budget` must be >= 0, got -3"),
    ("aab/total_tensor_float", lambda: advantage_aware_budgets(torch.ones(3), torch.tensor([4, 4, 4]), 2, total_budget=torch.tensor(3.0)), TypeError, r"`total_budget` must have an int"),
    ("aab/total_tensor_rank", lambda: advantage_aware_budgets(torch.ones(3), torch.tensor([4, 4, 4]), 2, total_budget=torch.tensor([3])), ValueError, r"`total_budget` must have 0 dimensions"),
    ("aab/num_chunks_negative", lambda: advantage_aware_budgets(torch.ones(2), torch.tensor([3, -1]), 2, validate_args=True), ValueError, r"`num_chunks` must be >= 0, got -1"),
    # stats: clear errors instead of scipy's TypeError or an OverflowError
    ("stats/halfwidth_too_small", lambda: pairs_for_halfwidth(1e6, 1e-6), ValueError, r"`halfwidth` must be at least 0\.0207 for `sd` = 1e\+06 .*got 1e-06"),
    ("stats/halfwidth_ratio_overflows", lambda: pairs_for_halfwidth(1e300, 1e-300), ValueError, r"`halfwidth` must be at least .*got 1e-300"),
    ("stats/paired_not_representable", lambda: paired_difference([1e308, -1e308], [-1e308, 1e308]), ValueError, r"`a` and `b` must give a paired difference and interval representable in float64, got values up to 1e\+308"),
    ("stats/paired_inf", lambda: paired_difference([math.inf, 1.0], [0.0, 0.0]), ValueError, r"`a\[0\]` must be finite"),
    ("stats/no_scipy/paired_difference", lambda: _without_scipy(lambda: paired_difference([1.0, 2.0], [0.0, 0.5])), ImportError, r"pip install scipy.*chunkmask\[stats\]"),
    ("stats/no_scipy/equivalence_test", lambda: _without_scipy(lambda: equivalence_test([1.0, 2.0], [0.0, 0.5], margin=0.1)), ImportError, r"pip install scipy"),
    ("stats/no_scipy/pairs_for_halfwidth", lambda: _without_scipy(lambda: pairs_for_halfwidth(1.0, 0.5)), ImportError, r"pip install scipy"),
    # None where a sequence is expected: a TypeError naming the argument
    ("success_buffer/add_batch_success_none", lambda: SuccessBuffer(2).add_batch(_B3, success=None, steps=[1, 2]), TypeError, r"`success` must be a 1-D tensor or a sequence, got NoneType"),
    ("success_buffer/add_batch_steps_none", lambda: SuccessBuffer(2).add_batch(_B3, success=[True, True], steps=None), TypeError, r"`steps` must be a 1-D tensor or a sequence, got NoneType"),
    ("success_buffer/add_batch_task_int", lambda: SuccessBuffer(2).add_batch(_B3, success=[True, True], steps=[1, 2], task=3), TypeError, r"`task` must be a 1-D tensor or a sequence, got int"),
    ("success_buffer/add_batch_batch_none", lambda: SuccessBuffer(2).add_batch(None, success=[True, True], steps=[1, 2]), TypeError, r"`batch` must be a non-empty dict"),
    ("success_buffer/gather_none", lambda: _buffer_with_one().gather(None), TypeError, r"`indices` must be a 1-D tensor or a sequence, got NoneType"),
    ("success_buffer/gather_int", lambda: _buffer_with_one().gather(0), TypeError, r"`indices` must be a 1-D tensor or a sequence, got int"),
    ("success_buffer/gather_out_of_range", lambda: _buffer_with_one().gather([1]), ValueError, r"`indices` must lie in \[0, 1\), got 1"),
    ("sketch/grads_none", lambda: GradientSketch(8)(None), TypeError, r"`grads` must be a tensor or a sequence of per-parameter gradients.*got NoneType"),
    ("sketch/grads_entry", lambda: GradientSketch(8)([torch.ones(2), "x"]), TypeError, r"`grads\[1\]` must be a torch.Tensor"),
    ("cosine/a_none", lambda: gradient_cosine(None, _X), TypeError, r"`a` must be a tensor or a sequence of per-parameter gradients.*got NoneType"),
    ("cosine/b_none", lambda: gradient_cosine(_X, None), TypeError, r"`b` must be a tensor or a sequence of per-parameter gradients.*got NoneType"),
    ("cosine/b_entry_none_a_str", lambda: gradient_cosine(["x"], [None]), TypeError, r"`a\[0\]` must be a torch.Tensor"),
    ("cosine/inf_validated", lambda: gradient_cosine([_X.clone().fill_(math.inf)], [_X], validate_args=True), ValueError, r"`a\[0\]` must be finite"),
    ("cosine/nan_validated", lambda: gradient_cosine([_X], [_X.clone().fill_(math.nan)], validate_args=True), ValueError, r"`b\[0\]` must be finite"),
]


# ----------------------------------------------------------------------------- valid builders


def _valid(t, n):
    v = torch.ones(t, n, dtype=torch.bool)
    v[0, n - 1] = False
    return v


def _weights(t, n):
    return torch.rand(t, n, generator=torch.Generator().manual_seed(t * 31 + n)) + 0.1


def _phases(t, n):
    return (torch.arange(n).expand(t, n) % 3).clone()


def _sel(t, n):
    return Selection.from_mask(torch.arange(n).expand(t, n) % 2 == 0, k=n)


def _rollouts(t, n):
    t = max(t, 2)
    g = torch.Generator().manual_seed(t * 7 + n)
    actions = torch.randn(t, n, 2, 3, generator=g)
    return {
        "actions": actions,
        "success": torch.arange(t) % 2 == 0,
        "group": torch.zeros(t, dtype=torch.int64),
        "valid": _valid(t, n),
    }


def _buffer():
    return PhaseScoreBuffer(3)


def _buffer_state():
    buf = PhaseScoreBuffer(3)
    buf.update(torch.tensor([0.5, 1.0, 0.0]))
    return buf.state_dict()


def _bad_buffer_states(kwargs):
    state = kwargs["state"]
    out = []
    for key, value in (
        ("keep_probabilities", torch.tensor([math.nan, 1.0, 0.5])),
        ("keep_probabilities", torch.tensor([0.0, 1.0, 0.5])),
        ("keep_probabilities", torch.tensor([2.0, 1.0, 0.5])),
        ("keep_probabilities", torch.ones(4)),
        ("window_sum", torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)),
        ("window_sum", torch.tensor([math.inf, 0.0, 0.0], dtype=torch.float64)),
        ("window_count", torch.tensor([1.0, 0.0, 0.0])),
        ("window_count", torch.tensor([-1, 0, 0])),
        ("window_steps", 1.5),
        ("window_steps", True),
        ("window_steps", -1),
        ("num_updates", 2.0),
        ("num_updates", 0),  # fewer updates than window steps
    ):
        out.append({**state, key: value})
    out.append({k: v for k, v in state.items() if k != "num_updates"})
    out.append([1, 2])
    return out


def _masker_state():
    m = ProbabilisticChunkMasker(3, seed=0)
    m.select(**_rollouts(4, 6))
    return m.state_dict()


def _bad_masker_states(kwargs):
    state = kwargs["state"]
    keep = state["buffer"]["keep_probabilities"].clone()
    keep[0] = math.nan
    return [
        {**state, "budget": 3.5},
        {**state, "budget": True},
        {**state, "budget": 0},
        {**state, "num_phases": 5.0},
        {**state, "num_phases": 4},
        {**state, "generator": "x"},
        {**state, "generator": torch.zeros(3, dtype=torch.uint8)},
        {**state, "buffer": {**state["buffer"], "keep_probabilities": keep}},
        {k: v for k, v in state.items() if k != "buffer"},
        "state",
    ]


def _bad_selections(kwargs):
    sel = kwargs["selection"]
    return [
        sel._replace(indices=sel.indices.masked_fill(sel.mask, 10**6)),
        sel._replace(indices=torch.where(sel.mask, -1, 0)),
        sel._replace(indices=sel.indices.int()),
        sel._replace(mask=sel.mask[:, :1]),
        tuple(sel),
        None,
        "selection",
    ]


# Rows: (id, function, kwargs builder (t, n) -> dict, argument, classes or a callable giving values)
F = ("nan", "inf", "negative")
SHAPE = ("rank", "size", "type", "none")
FUZZ = [
    # sampling
    ("pl/weights", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "weights", ("dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("pl/weights_values", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "budget": 2, "valid": _valid(t, n), "validate_args": True}, "weights", F),
    ("pl/budget", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "budget": 2}, "budget", ("type", "none", "range", "zero")),
    ("pl/valid", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("pl/generator", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "budget": 2, "generator": torch.Generator()}, "generator", ("type",)),
    ("incl/weights", inclusion_probabilities, lambda t, n: {"weights": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "weights", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("incl/budget", inclusion_probabilities, lambda t, n: {"weights": _weights(t, n), "budget": 2}, "budget", ("type", "none", "range", "zero")),
    ("incl/num_nodes", inclusion_probabilities, lambda t, n: {"weights": _weights(t, n), "budget": 2, "num_nodes": 8}, "num_nodes", ("type", "none", "range", "zero")),
    ("strat/phases", stratified_sample, lambda t, n: {"phases": _phases(t, n), "allocation": torch.tensor([1, 1, 1]), "valid": _valid(t, n)}, "phases", ("dtype:bool", "dtype:float", *SHAPE, "empty")),
    ("strat/allocation", stratified_sample, lambda t, n: {"phases": _phases(t, n), "allocation": torch.tensor([1, 1, 1])}, "allocation", ("negative", "dtype:bool", "dtype:float", "type", "none", "empty", lambda kw: [torch.tensor([1]), torch.zeros(3, dtype=torch.int64), torch.ones(1, 1, 3, dtype=torch.int64)])),
    ("strat/generator", stratified_sample, lambda t, n: {"phases": _phases(t, n), "allocation": torch.tensor([1, 1, 1])}, "generator", ("type",)),
    ("uniform/valid", uniform_sample, lambda t, n: {"valid": _valid(t, n), "budget": 2}, "valid", ("dtype:int", "dtype:float", "rank", "type", "none")),
    ("uniform/budget", uniform_sample, lambda t, n: {"valid": _valid(t, n), "budget": 2}, "budget", ("type", "none", "range", "zero")),
    ("top/phases", top_phase_sample, lambda t, n: {"validate_args": True, "phases": _phases(t, n), "scores": torch.tensor([0.1, 0.5, 0.2]), "budget": 2, "valid": _valid(t, n)}, "phases", ("dtype:bool", "dtype:float", *SHAPE, "empty", lambda kw: [kw["phases"] + 5])),
    ("top/scores", top_phase_sample, lambda t, n: {"validate_args": True, "phases": _phases(t, n), "scores": torch.tensor([0.1, 0.5, 0.2]), "budget": 2}, "scores", ("nan", "dtype:bool", "type", "none", "empty", lambda kw: [kw["scores"][:1], kw["scores"][None, None]])),
    ("top/budget", top_phase_sample, lambda t, n: {"phases": _phases(t, n), "scores": torch.tensor([0.1, 0.5, 0.2]), "budget": 2}, "budget", ("type", "none", "range", "zero")),
    ("topk/scores", topk_sample, lambda t, n: {"validate_args": True, "scores": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "scores", ("nan", "dtype:bool", *SHAPE, "empty")),
    ("topk/budget", topk_sample, lambda t, n: {"scores": _weights(t, n), "budget": 2}, "budget", ("type", "none", "range", "zero")),
    ("pps_incl/sizes", pps_inclusion, lambda t, n: {"sizes": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "sizes", (*F, "dtype:bool", "dtype:int", "size", "type", "none", lambda kw: [kw["sizes"][0, 0]])),
    ("pps_incl/budget", pps_inclusion, lambda t, n: {"sizes": _weights(t, n), "budget": 2}, "budget", ("type", "none", "range", lambda kw: [torch.full((kw["sizes"].shape[0],), -1), torch.ones(kw["sizes"].shape[0] + 1, dtype=torch.int64), torch.tensor([2.0] * kw["sizes"].shape[0])])),
    ("pps_incl/valid", pps_inclusion, lambda t, n: {"sizes": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("pps/sizes", pps_sample, lambda t, n: {"sizes": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "sizes", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("pps/budget", pps_sample, lambda t, n: {"sizes": _weights(t, n), "budget": 2}, "budget", ("type", "none", "range", "zero", lambda kw: [torch.tensor([2] * kw["sizes"].shape[0])])),
    ("pps/budget_traj", pps_sample, lambda t, n: {"sizes": _weights(t, n), "budget": 2, "scope": "trajectory"}, "budget", ("type", "none", "range", "zero", lambda kw: [torch.full((kw["sizes"].shape[0],), -1), torch.ones(kw["sizes"].shape[0] + 1, dtype=torch.int64), torch.tensor([2.0] * kw["sizes"].shape[0])])),
    ("pps/valid", pps_sample, lambda t, n: {"sizes": _weights(t, n), "budget": 2, "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("pps/scope", pps_sample, lambda t, n: {"sizes": _weights(t, n), "budget": 2, "scope": "batch"}, "scope", ("type", "none", lambda kw: ["Batch", "chunk"])),
    ("pps/generator", pps_sample, lambda t, n: {"sizes": _weights(t, n), "budget": 2, "generator": torch.Generator()}, "generator", ("type",)),
    ("csn/logp", chunk_score_norm, lambda t, n: {"logp": -_weights(t, n)[..., None].expand(t, n, 3).clone(), "mask": _valid(t, n)[..., None].expand(t, n, 3).clone()}, "logp", ("nan", "dtype:bool", "dtype:int", *SHAPE, lambda kw: [-kw["logp"]])),
    ("csn/mask", chunk_score_norm, lambda t, n: {"logp": -_weights(t, n)[..., None].expand(t, n, 3).clone(), "mask": _valid(t, n)[..., None].expand(t, n, 3).clone()}, "mask", ("dtype:int", "dtype:float", "rank", "size", "type")),
    # selection
    ("from_mask/mask", Selection.from_mask, lambda t, n: {"mask": _valid(t, n)}, "mask", ("dtype:int", "dtype:float", "rank", "type", "none")),
    ("from_mask/valid", Selection.from_mask, lambda t, n: {"mask": _valid(t, n), "valid": _valid(t, n)}, "valid", ("dtype:int", "rank", "size", "type", "empty", lambda kw: [torch.zeros_like(kw["valid"])])),
    ("from_mask/k", Selection.from_mask, lambda t, n: {"mask": _valid(t, n), "k": n}, "k", ("type", "range", "zero", lambda kw: [1] if kw["mask"].shape[1] > 2 else [])),
    ("rows/index", lambda sel, index: sel.rows(index, validate_args=True), lambda t, n: {"sel": _sel(t, n), "index": 0}, "index", ("type", "none", "range", lambda kw: [kw["sel"].num_traj, torch.tensor([kw["sel"].num_traj]), torch.tensor([-1]), torch.tensor([0.0]), torch.ones(kw["sel"].num_traj + 1, dtype=torch.bool), slice(None, None, -1)])),
    ("cat/selections", Selection.cat, lambda t, n: {"selections": [_sel(t, n), _sel(t, n)]}, "selections", ("type", "none", lambda kw: [[], [kw["selections"][0], "x"], [_sel(1, 3), _sel(1, 4)], [_sel(1, 3), Selection.from_mask(torch.ones(1, 3, dtype=torch.bool), k=5)], kw["selections"][0]])),
    ("flat_index/size", lambda sel, size: sel.flat_index(size), lambda t, n: {"sel": _sel(t, n), "size": 1}, "size", ("type", "range")),
    ("packed_traj/size", lambda sel, size: sel.packed_traj_index(size), lambda t, n: {"sel": _sel(t, n), "size": 1}, "size", ("type", "range")),
    # shrinking
    ("shrink/selection", shrink, lambda t, n: {"validate_args": True, "tree": {"x": torch.ones(t, n)}, "selection": _sel(t, n)}, "selection", (_bad_selections,)),
    ("shrink/size", shrink, lambda t, n: {"validate_args": True, "tree": {"x": torch.ones(t, n)}, "selection": _sel(t, n), "size": int(_sel(t, n).counts.sum())}, "size", ("type", "range", lambda kw: [kw["size"] + 1])),
    ("shrink/tree", shrink, lambda t, n: {"tree": {"x": torch.ones(t, n)}, "selection": _sel(t, n)}, "tree", (lambda kw: [{"x": torch.ones(t_ + 1, 2)} for t_ in [kw["selection"].num_traj]] + [torch.ones(())],)),
    ("unshrink/selection", unshrink, lambda t, n: {"validate_args": True, "tree": torch.ones(int(_sel(t, n).counts.sum())), "selection": _sel(t, n)}, "selection", (_bad_selections,)),
    ("unshrink/fill", unshrink, lambda t, n: {"tree": torch.ones(int(_sel(t, n).counts.sum())), "selection": _sel(t, n)}, "fill", (lambda kw: ["x", None, [1.0], torch.tensor(1.0)],)),
    ("unshrink/tree", unshrink, lambda t, n: {"validate_args": True, "tree": torch.ones(int(_sel(t, n).counts.sum())), "selection": _sel(t, n)}, "tree", (lambda kw: [torch.ones(kw["tree"].shape[0] + 1), torch.ones(())],)),
    # scores
    ("sfv/features", success_failure_variance, lambda t, n: {"validate_args": True, **{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "features", ("nan", "inf", "dtype:bool", "dtype:int", "type", "none", "empty", lambda kw: [kw["features"][None], kw["features"].reshape(-1)])),
    ("sfv/phases", success_failure_variance, lambda t, n: {"validate_args": True, **{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "phases", ("negative", "dtype:bool", "dtype:float", *SHAPE, "empty", lambda kw: [kw["phases"] + 3])),
    ("sfv/success", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "success", ("dtype:int", "dtype:float", *SHAPE, "empty")),
    ("sfv/group", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "group", ("dtype:bool", "dtype:float", *SHAPE, "empty")),
    ("sfv/group_dense", success_failure_variance, lambda t, n: {"validate_args": True, **{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3, "num_groups": 1}, "group", ("negative", lambda kw: [kw["group"] + 1])),
    ("sfv/valid", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("sfv/num_phases", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "num_phases", ("type", "none", "range", "zero")),
    ("sfv/num_groups", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3, "num_groups": 1}, "num_groups", ("type", "range", "zero")),
    ("sfv/weighting", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "weighting", ("type", "none", lambda kw: ["Uniform", "mean"])),
    ("buffer/num_phases", PhaseScoreBuffer, lambda t, n: {"num_phases": 3}, "num_phases", ("type", "none", "range", "zero")),
    ("buffer/refresh_every", PhaseScoreBuffer, lambda t, n: {"num_phases": 3, "refresh_every": 2}, "refresh_every", ("type", "none", "range", "zero")),
    ("buffer/p_min", PhaseScoreBuffer, lambda t, n: {"num_phases": 3, "p_min": 0.1}, "p_min", ("type", "none", "range", lambda kw: [0.0, 1.5])),
    ("buffer/power", PhaseScoreBuffer, lambda t, n: {"num_phases": 3, "power": 1.0}, "power", ("type", "none", "range", lambda kw: [0.0])),
    ("buffer/window", PhaseScoreBuffer, lambda t, n: {"num_phases": 3, "window": "steps"}, "window", ("type", "none", lambda kw: ["Steps", "mean"])),
    ("buffer/min_groups", PhaseScoreBuffer, lambda t, n: {"num_phases": 3, "min_groups": 2.0}, "min_groups", ("type", "none", "range")),
    ("buffer/process_group", PhaseScoreBuffer, lambda t, n: {"num_phases": 3}, "process_group", ("type", lambda kw: [object(), 0])),
    ("buffer.update/scores", lambda buf, **kw: buf.update(**kw), lambda t, n: {"validate_args": True, "buf": _buffer(), "scores": torch.tensor([0.5, 1.0, 0.0]), "defined": torch.ones(3, dtype=torch.bool)}, "scores", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("buffer.update/defined", lambda buf, **kw: buf.update(**kw), lambda t, n: {"buf": _buffer(), "scores": torch.tensor([0.5, 1.0, 0.0]), "defined": torch.ones(3, dtype=torch.bool)}, "defined", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("buffer.update/weight", lambda buf, **kw: buf.update(**kw), lambda t, n: {"validate_args": True, "buf": _buffer(), "scores": torch.tensor([0.5, 1.0, 0.0]), "weight": torch.ones(3)}, "weight", (*F, "dtype:bool", "dtype:int", "rank", "size", "type", "empty")),
    ("buffer.load/state", lambda buf, state: buf.load_state_dict(state), lambda t, n: {"buf": _buffer(), "state": _buffer_state()}, "state", (_bad_buffer_states,)),
    # allocation
    ("keep/scores", keep_probabilities, lambda t, n: {"validate_args": True, "scores": _weights(t, 3), "defined": torch.ones(t, 3, dtype=torch.bool)}, "scores", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("keep/scores_alone", keep_probabilities, lambda t, n: {"scores": _weights(t, 3)}, "scores", ("empty", lambda kw: [torch.zeros(())])),
    ("keep/defined", keep_probabilities, lambda t, n: {"scores": _weights(t, 3), "defined": torch.ones(t, 3, dtype=torch.bool)}, "defined", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("keep/p_min", keep_probabilities, lambda t, n: {"scores": _weights(t, 3)}, "p_min", ("type", "none", "range", lambda kw: [0.0, 1.5])),
    ("keep/power", keep_probabilities, lambda t, n: {"scores": _weights(t, 3)}, "power", ("type", "none", "range", lambda kw: [0.0])),
    ("neyman/budget", neyman_allocation, lambda t, n: {"budget": 4, "sizes": torch.full((t, 3), n), "stds": _weights(t, 3)}, "budget", ("type", "none", "range", "zero", lambda kw: [torch.full((kw["sizes"].shape[0],), -1), torch.ones(kw["sizes"].shape[0] + 1, dtype=torch.int64), torch.tensor(2.0)])),
    ("neyman/sizes", neyman_allocation, lambda t, n: {"budget": 4, "sizes": torch.full((t, 3), n), "stds": _weights(t, 3)}, "sizes", ("negative", "dtype:bool", "dtype:float", *SHAPE, "empty")),
    ("neyman/stds", neyman_allocation, lambda t, n: {"budget": 4, "sizes": torch.full((t, 3), n), "stds": _weights(t, 3)}, "stds", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("neyman/lower", neyman_allocation, lambda t, n: {"budget": 4, "sizes": torch.full((t, 3), n), "stds": _weights(t, 3), "lower": 0}, "lower", ("type", "none", "range", lambda kw: [torch.full((kw["sizes"].shape[0], 3), -1), torch.zeros(3, dtype=torch.int64), torch.zeros(kw["sizes"].shape, dtype=torch.float32), 5])),
    ("neyman_c/budget", neyman_allocation_continuous, lambda t, n: {"budget": 4.0, "sizes": torch.full((t, 3), float(n)), "stds": _weights(t, 3)}, "budget", ("type", "none", "range", "zero", lambda kw: [torch.tensor(-1.0), torch.tensor(math.nan), torch.ones(9), torch.tensor(True)])),
    ("neyman_c/sizes", neyman_allocation_continuous, lambda t, n: {"budget": 4.0, "sizes": torch.full((t, 3), float(n)), "stds": _weights(t, 3)}, "sizes", (*F, "dtype:bool", *SHAPE, "empty")),
    ("neyman_c/stds", neyman_allocation_continuous, lambda t, n: {"budget": 4.0, "sizes": torch.full((t, 3), float(n)), "stds": _weights(t, 3)}, "stds", (*F, "dtype:bool", *SHAPE, "empty")),
    ("knee/scores", suggest_budget, lambda t, n: {"scores": _weights(t, n), "valid": _valid(t, n)}, "scores", (*F, "dtype:bool", *SHAPE, "empty", lambda kw: [torch.zeros_like(kw["scores"])])),
    ("knee/valid", suggest_budget, lambda t, n: {"scores": _weights(t, n), "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty", lambda kw: [torch.zeros_like(kw["valid"])])),
    # phases
    ("gcf/gripper", gripper_close_fraction, lambda t, n: {"gripper": torch.randn(t, n, 4), "valid": _valid(t, n)}, "gripper", ("dtype:bool", "rank", "type", "none", "empty", lambda kw: [kw["gripper"][:, :-1]])),
    ("gcf/valid", gripper_close_fraction, lambda t, n: {"gripper": torch.randn(t, n, 4), "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("gcf/close", gripper_close_fraction, lambda t, n: {"gripper": torch.randn(t, n, 4)}, "close", ("type", "none", lambda kw: ["open", "Positive"])),
    ("gcf/close_threshold", gripper_close_fraction, lambda t, n: {"gripper": torch.randn(t, n, 4), "close_threshold": 0.0}, "close_threshold", ("type", lambda kw: [math.nan, math.inf, torch.tensor(0.5)])),
    ("gcf/close_threshold_required", gripper_close_fraction, lambda t, n: {"gripper": torch.randn(t, n, 4), "close": "threshold", "close_threshold": 0.5}, "close_threshold", ("none",)),
    ("lgp/close_fraction", label_gripper_phases, lambda t, n: {"validate_args": True, "close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "close_fraction", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty", lambda kw: [kw["close_fraction"] + 1.5])),
    ("lgp/valid", label_gripper_phases, lambda t, n: {"close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    *[
        (f"lgp/{name}", label_gripper_phases, lambda t, n: {"close_fraction": torch.rand(t, n)}, name, ("type", "none", "range", lambda kw: [1.5]))
        for name in ("sustained", "active", "pre_min", "tail_max")
    ],
    ("lgp/window", label_gripper_phases, lambda t, n: {"close_fraction": torch.rand(t, n), "window": 3}, "window", ("type", "none", "range")),
    ("onset/close_fraction", label_grasp_onset, lambda t, n: {"validate_args": True, "close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "close_fraction", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty", lambda kw: [kw["close_fraction"] + 1.5])),
    ("onset/valid", label_grasp_onset, lambda t, n: {"close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("onset/lead", label_grasp_onset, lambda t, n: {"close_fraction": torch.rand(t, n), "lead": 2}, "lead", ("type", "none", "range")),
    ("onset/active", label_grasp_onset, lambda t, n: {"close_fraction": torch.rand(t, n), "active": 0.5}, "active", ("type", "none", "range", lambda kw: [1.5])),
    ("lts/valid", label_time_segments, lambda t, n: {"valid": _valid(t, n), "num_segments": 3}, "valid", ("dtype:float", "rank", "type", "none", lambda kw: [torch.tensor([-1, 2])])),
    ("lts/num_segments", label_time_segments, lambda t, n: {"valid": _valid(t, n), "num_segments": 3}, "num_segments", ("type", "none", "range", "zero")),
    ("lts/num_chunks", label_time_segments, lambda t, n: {"valid": torch.tensor([2, 3]), "num_segments": 3, "num_chunks": 4}, "num_chunks", ("type", "range", lambda kw: [2])),
    # masker (constructor, then its labelling and scoring configurations)
    *[
        (f"masker/{name}", ProbabilisticChunkMasker, lambda t, n, name=name, value=value: {"budget": 3, name: value}, name, classes)
        for name, value, classes in (
            ("budget", 3, ("type", "none", "range", "zero")),
            ("num_phases", 5, ("type", "none", "range", "zero")),
            ("inclusion", False, ("type", "none", lambda kw: [1, 0])),
            ("validate_args", True, ("type", "none", lambda kw: [1])),
            ("global_rng", False, ("type", "none")),
            ("seed", 0, ("type", "range", lambda kw: [True, 1.0, 2.5, torch.tensor(1.0), torch.Generator().get_state()])),
        )
    ],
    *[
        (f"scoring/{name}", lambda **kw: ProbabilisticChunkMasker(3, scoring=PhaseScoring(**kw)), lambda t, n, name=name, value=value: {name: value}, name, classes)
        for name, value, classes in (
            ("refresh_every", 5, ("type", "none", "range", "zero")),
            ("p_min", 0.1, ("type", "none", "range", lambda kw: [0.0, 2.0])),
            ("power", 1.0, ("type", "none", "range", lambda kw: [0.0])),
            ("weighting", "uniform", ("type", "none", lambda kw: ["Balance"])),
            ("process_group", None, ("type", lambda kw: [object()])),
        )
    ],
    *[
        (f"labelling/{name}", lambda **kw: ProbabilisticChunkMasker(3, labelling=PhaseLabelling(**kw)), lambda t, n, name=name, value=value: {name: value}, name, classes)
        for name, value, classes in (
            ("close", "positive", ("type", "none", lambda kw: ["open"])),
            ("close_threshold", 0.0, ("type", lambda kw: [math.nan, math.inf])),
            ("labeler", None, (lambda kw: [1, "labeler"],)),
        )
    ],
    *[
        (f"select/{name}", lambda masker, **kw: masker.select(**kw), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0), **_rollouts(t, n)}, name, classes)
        for name, classes in (
            ("actions", ("dtype:bool", "dtype:int", "rank", "type", "none", "empty")),
            ("success", ("dtype:int", "dtype:float", *SHAPE, "empty")),
            ("group", ("dtype:bool", "dtype:float", *SHAPE, "empty")),
            ("valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
        )
    ],
    ("select/actions_values", lambda masker, **kw: masker.select(**kw), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0, validate_args=True), **_rollouts(t, n)}, "actions", ("nan", "inf")),
    ("update/phases", lambda masker, **kw: masker.update(**kw), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0, validate_args=True), **_rollouts(t, n), "phases": _phases(max(t, 2), n)}, "phases", ("negative", "dtype:bool", "dtype:float", "rank", "size", "type", "empty", lambda kw: [kw["phases"] + NUM_PHASES])),
    ("select/gripper", lambda masker, **kw: masker.select(**kw), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0), **_rollouts(t, n), "gripper": torch.randn(max(t, 2), n, 2)}, "gripper", ("dtype:bool", "rank", "type", "empty", lambda kw: [kw["gripper"][:, :-1]])),
    ("select/num_groups", lambda masker, **kw: masker.select(**kw), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0), **_rollouts(t, n), "num_groups": 1}, "num_groups", ("type", "range", "zero")),
    ("masker.load/state", lambda masker, state: masker.load_state_dict(state), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0), "state": _masker_state()}, "state", (_bad_masker_states,)),
]


def _default(fn, arg):
    try:
        default = inspect.signature(fn).parameters[arg].default
    except (KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default


def _call(fn, build, shape, arg, bad):
    def call():
        kwargs = build(*shape)  # fresh: a call may consume state (buffers, maskers)
        kwargs[arg] = bad
        return fn(**kwargs)

    return call


SHAPES = ((1, 2), (3, 5))


def _expand(rows):
    """One `(id, call, error, match)` case per bad value of each row, at each shape in `SHAPES`."""
    out = []
    for row_id, fn, build, arg, classes in rows:
        match = re.escape(f"`{arg}")
        count = 0
        for t, n in SHAPES:
            kwargs = build(t, n)
            valid = kwargs[arg] if arg in kwargs else _default(fn, arg)
            for kind in classes:
                values = list(kind(kwargs)) if callable(kind) else bad_values(kind, valid)
                label = kind if isinstance(kind, str) else "custom"
                for i, bad in enumerate(values):
                    case_id = f"{row_id}/{label}/{i}@{t}x{n}"
                    out.append((case_id, _call(fn, build, (t, n), arg, bad), (ValueError, TypeError), match))
                    count += 1
        if count == 0:
            raise ValueError(f"fuzz row {row_id!r} produced no bad values")
    return out


CASES = EXPLICIT + _expand(FUZZ)


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- degenerate inputs


def _all_padding_rollouts(dtype=torch.float32):
    batch = _rollouts(4, 6)
    batch["actions"] = batch["actions"].to(dtype)
    batch["valid"] = batch["valid"].clone()
    batch["valid"][1] = False  # one all-padding trajectory
    batch["actions"][1] = math.nan  # whose contents are garbage
    return batch


DEGENERATE = [
    ("pl/all_padding_row", plackett_luce_sample, lambda: {"weights": torch.ones(3, 5), "budget": 2, "valid": torch.tensor([[False] * 5, [True] * 5, [True, False, False, False, False]])}),
    ("pl/k_exceeds_available", plackett_luce_sample, lambda: {"weights": torch.tensor([[0.0, 1.0, 0.0, 2.0]]), "budget": 6}),
    ("pl/bf16", plackett_luce_sample, lambda: {"weights": torch.rand(3, 8).bfloat16(), "budget": 3}),
    ("incl/all_padding_row", inclusion_probabilities, lambda: {"weights": torch.ones(2, 5), "budget": 2, "valid": torch.tensor([[False] * 5, [True] * 5])}),
    ("incl/bf16", inclusion_probabilities, lambda: {"weights": torch.rand(3, 6).bfloat16() + 0.1, "budget": 2}),
    ("sfv/all_success", success_failure_variance, lambda: {"features": torch.randn(4, 3, 2), "phases": torch.zeros(4, 3, dtype=torch.int64), "success": torch.ones(4, dtype=torch.bool), "group": torch.zeros(4, dtype=torch.int64), "num_phases": 2, "weighting": "balance"}),
    ("sfv/single_member_groups", success_failure_variance, lambda: {"features": torch.randn(4, 3, 2), "phases": torch.zeros(4, 3, dtype=torch.int64), "success": torch.tensor([True, False, True, False]), "group": torch.arange(4), "num_phases": 2}),
    ("sfv/bf16_with_padding", success_failure_variance, lambda: {"features": _all_padding_rollouts(torch.bfloat16)["actions"], "phases": _phases(4, 6), "success": torch.tensor([True, False, True, False]), "group": torch.zeros(4, dtype=torch.int64), "num_phases": 3, "valid": _all_padding_rollouts()["valid"]}),
    ("sfv/empty_group_id", success_failure_variance, lambda: {"features": torch.randn(2, 3, 2), "phases": torch.zeros(2, 3, dtype=torch.int64), "success": torch.tensor([True, False]), "group": torch.tensor([2, 2]), "num_phases": 2, "num_groups": 4}),
    ("keep/nothing_defined", keep_probabilities, lambda: {"scores": torch.full((2, 3), math.nan), "defined": torch.zeros(2, 3, dtype=torch.bool)}),
    ("keep/bf16", keep_probabilities, lambda: {"scores": torch.rand(2, 3).bfloat16()}),
    ("neyman/zero_sizes", neyman_allocation, lambda: {"budget": 3, "sizes": torch.zeros(2, 3, dtype=torch.int64), "stds": torch.zeros(2, 3)}),
    ("neyman_c/zero_sizes", neyman_allocation_continuous, lambda: {"budget": 3, "sizes": torch.zeros(2, 3), "stds": torch.ones(2, 3)}),
    ("neyman_c/huge_stds", neyman_allocation_continuous, lambda: {"budget": 12, "sizes": torch.tensor([20.0, 10.0, 30.0], dtype=torch.float64), "stds": torch.tensor([1e300, 4e300, 5e299], dtype=torch.float64)}),
    ("neyman_c/huge_sizes_and_stds", neyman_allocation_continuous, lambda: {"budget": 1e150, "sizes": torch.tensor([2e200, 1e200], dtype=torch.float64), "stds": torch.tensor([1e200, 3e200], dtype=torch.float64)}),
    ("neyman_c/no_phases", neyman_allocation_continuous, lambda: {"budget": 3, "sizes": torch.zeros(2, 0), "stds": torch.zeros(2, 0)}),
    ("knee/constant", suggest_budget, lambda: {"scores": torch.ones(3, 5)}),
    ("lgp/all_padding", label_gripper_phases, lambda: {"close_fraction": torch.full((2, 4), math.nan), "valid": torch.zeros(2, 4, dtype=torch.bool)}),
    ("gcf/bf16", gripper_close_fraction, lambda: {"gripper": torch.randn(2, 3, 4).bfloat16()}),
    ("shrink/empty_selection", shrink, lambda: {"tree": {"x": torch.randn(2, 3)}, "selection": Selection.from_mask(torch.zeros(2, 3, dtype=torch.bool))}),
    ("unshrink/empty", unshrink, lambda: {"tree": torch.zeros(0, 2), "selection": Selection.from_mask(torch.zeros(2, 3, dtype=torch.bool))}),
    ("select/all_padding_bf16", lambda **kw: ProbabilisticChunkMasker(4, seed=0, inclusion=True).select(**kw), lambda: _all_padding_rollouts(torch.bfloat16)),
    ("select/all_success", lambda **kw: ProbabilisticChunkMasker(4, seed=0).select(**kw), lambda: {**_rollouts(4, 6), "success": torch.ones(4, dtype=torch.bool)}),
    ("staleness/no_chunks", staleness_filter, lambda: {"versions": torch.zeros(4, 0, dtype=torch.long), "current_version": 5, "max_staleness": 2, "validate_args": True}),
    ("cosine/huge", gradient_cosine, lambda: {"a": [_X * 1e200, None], "b": [_X.flip(0) * 1e200, None]}),
    ("cosine/tiny", gradient_cosine, lambda: {"a": _X * 1e-200, "b": _X.flip(0) * 1e-200}),
    ("cosine/empty_entries", gradient_cosine, lambda: {"a": [torch.zeros(0), _X], "b": [torch.zeros(0), _X]}),
    ("phase_shares/all_zero_parts", phase_shares, lambda: {"full": torch.randn(5, 4, dtype=torch.float64), "parts": torch.zeros(5, 2, 4, dtype=torch.float64)}),
    ("stats/paired_huge", paired_difference, lambda: {"a": [1e200, -1e200, 1e200, -1e200], "b": [0.5, 0.55, 0.47, 0.5]}),
    ("stats/binomial_without_scipy", lambda **kw: _without_scipy(lambda: binomial_interval(**kw)), lambda: {"successes": 3, "trials": 10}),
]


@pytest.mark.usefixtures("_plain_pass_only")
@pytest.mark.parametrize("case", DEGENERATE, ids=[c[0] for c in DEGENERATE])
def test_degenerate_but_legal_input_gives_finite_output(case):
    _, fn, build = case
    check_finite_output(fn, build())


@pytest.mark.usefixtures("_plain_pass_only")
def test_degenerate_outputs_are_correct():
    # All-padding trajectory: nothing selected, num_chunks 0, and the masker reports PAD.
    batch = _all_padding_rollouts(torch.bfloat16)
    masker = ProbabilisticChunkMasker(4, seed=0, inclusion=True)
    info = masker.update(**batch)
    sel = masker.draw(info.phases, valid=batch["valid"])
    assert not sel.mask[1].any() and sel.num_chunks[1] == 0
    assert (info.phases[1] == -1).all()
    assert (sel.counts[[0, 2, 3]] == 4).all()
    # k > available: every positive-weight chunk, flagged rest.
    sel = plackett_luce_sample(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), 6)
    assert sel.indices.tolist() == [[1, 3, 0, 0, 0, 0]] and sel.counts.tolist() == [2]
    # All success / single-member groups: nothing defined, scores 0.
    out = success_failure_variance(
        torch.randn(4, 3, 2), torch.zeros(4, 3, dtype=torch.int64), torch.ones(4, dtype=torch.bool),
        torch.zeros(4, dtype=torch.int64), num_phases=2,
    )
    assert not out.defined.any() and (out.scores == 0).all()
    # An absent dense group id is an undefined row.
    out = success_failure_variance(
        torch.randn(2, 3, 2), torch.zeros(2, 3, dtype=torch.int64), torch.tensor([True, False]),
        torch.tensor([2, 2]), num_phases=2, num_groups=4,
    )
    assert out.group_defined.tolist() == [[False, False], [False, False], [True, False], [False, False]]
    # Nothing defined: uniform keep probabilities.
    assert (keep_probabilities(torch.zeros(3), torch.zeros(3, dtype=torch.bool)) == 1).all()


def test_documented_results_of_the_sweep_defects():
    # A trajectory with no chunk is dropped (it was an IndexError).
    for versions in (torch.zeros(4, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)):
        keep = staleness_filter(versions, 5, 2)
        assert keep.dtype == torch.bool and keep.shape == (versions.shape[0],) and not keep.any()
    # Without validate_args nothing reads the versions: a newer one has negative staleness, kept
    # in both forms alike.
    assert staleness_filter(torch.tensor([7, 1]), 5, 2).tolist() == [True, False]
    assert staleness_filter(torch.tensor([[7, 7], [1, 7]]), 5, 2).tolist() == [True, False]
    # The 1e200 pairs: a finite answer (the 0.5-scale offsets are below float64's resolution).
    d = paired_difference([1e200, -1e200, 1e200, -1e200], [0.5, 0.55, 0.47, 0.5])
    assert d.mean == 0.0 and d.sd == pytest.approx(2e200 / math.sqrt(3), rel=1e-12)
    assert d.low == pytest.approx(-d.high) and math.isfinite(d.low)
    # All-zero parts: nothing to split, every share 0 (documented).
    shares = phase_shares(torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, 2, 4, dtype=torch.float64))
    for field in shares:
        assert field.tolist() == [0.0, 0.0]
    # A negative tensor total without validate_args is not read: it spends nothing.
    got = advantage_aware_budgets(torch.ones(3), torch.tensor([4, 4, 4]), 2, total_budget=torch.tensor(-3))
    assert got.tolist() == [0, 0, 0]
    # Non-finite gradients without validate_args give NaN, never a silent finite number.
    assert math.isnan(gradient_cosine(_X.clone().fill_(math.inf), _X).item())
    # The largest answer pairs_for_halfwidth gives is still found quickly and exactly.
    n = pairs_for_halfwidth(1e6, 0.0213)
    assert 2**52 < n <= 2**53


def test_import_and_binomial_interval_work_without_scipy():
    code = (
        "import sys; sys.modules['scipy'] = None\n"
        "import chunkmask\n"
        "from chunkmask.eval import binomial_interval, paired_difference\n"
        "assert 0 < binomial_interval(3, 10).low < 0.3 < binomial_interval(3, 10).high < 0.7\n"
        "try:\n"
        "    paired_difference([1.0, 2.0], [0.0, 0.5])\n"
        "except ImportError as exc:\n"
        "    assert 'pip install scipy' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no ImportError without scipy')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_binomial_interval_matches_scipy_normal_quantile():
    sps = pytest.importorskip("scipy.stats")
    for k, n, c in ((37, 120, 0.95), (0, 50, 0.9), (50, 50, 0.99), (1, 3, 0.5)):
        z = sps.norm.ppf(0.5 + c / 2)
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        ci = binomial_interval(k, n, confidence=c)
        want_low = 0.0 if k == 0 else max(0.0, centre - half)
        want_high = 1.0 if k == n else min(1.0, centre + half)
        assert (ci.low, ci.high) == pytest.approx((want_low, want_high), rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------- numeric properties

_moderate = st.one_of(
    st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3)
)  # no subnormals: scaling by 2**k stays exact
_vectors = st.integers(1, 8).flatmap(
    lambda n: st.tuples(st.lists(_moderate, min_size=n, max_size=n), st.lists(_moderate, min_size=n, max_size=n))
)


@settings(max_examples=60, deadline=None)
@given(_vectors, st.integers(-900, 900), st.integers(-900, 900))
def test_gradient_cosine_is_scale_free(ab, ka, kb):
    a = torch.tensor(ab[0], dtype=torch.float64)
    b = torch.tensor(ab[1], dtype=torch.float64)
    base = gradient_cosine(a, b)
    scaled = gradient_cosine(a * 2.0**ka, b * 2.0**kb)  # exact scaling: the same cosine exactly
    assert torch.isfinite(scaled) and -1.0 <= scaled.item() <= 1.0
    assert scaled.item() == base.item()
    # against the plain formula at the moderate scale
    na, nb = a.norm().item(), b.norm().item()
    want = 0.0 if na == 0 or nb == 0 else max(-1.0, min(1.0, (a @ b).item() / (na * nb)))
    assert base.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(_vectors, st.sampled_from([1e-250, 1e-200, 1e-100, 1e100, 1e200, 1e250]))
def test_gradient_cosine_huge_and_tiny_decimal_scales(ab, s):
    a = torch.tensor(ab[0], dtype=torch.float64)
    b = torch.tensor(ab[1], dtype=torch.float64)
    got = gradient_cosine([a * s, None], [b * s, None])
    assert torch.isfinite(got) and -1.0 <= got.item() <= 1.0
    assert got.item() == pytest.approx(gradient_cosine(a, b).item(), rel=1e-9, abs=1e-12)


_positive = st.floats(1e-3, 1e3)
_phase_rows = st.integers(1, 5).flatmap(
    lambda p: st.tuples(
        st.lists(st.one_of(st.just(0.0), _positive), min_size=p, max_size=p),
        st.lists(st.one_of(st.just(0.0), _positive), min_size=p, max_size=p),
    )
)


@settings(max_examples=60, deadline=None)
@given(_phase_rows, st.floats(0.5, 5e3), st.integers(0, 300))
def test_neyman_continuous_is_finite_and_sums_to_the_budget_for_huge_stds(row, budget, e):
    sizes = torch.tensor(row[0], dtype=torch.float64)
    stds = torch.tensor(row[1], dtype=torch.float64)
    base = neyman_allocation_continuous(budget, sizes, stds)
    got = neyman_allocation_continuous(budget, sizes, stds * 10.0**e)  # N sigma up to 1e306
    assert bool(torch.isfinite(got).all())
    assert bool((got >= 0).all()) and bool((got <= sizes * (1 + 1e-12)).all())
    want_total = min(budget, float(sizes.sum()))
    assert float(got.sum()) == pytest.approx(want_total, rel=1e-9, abs=1e-9)
    torch.testing.assert_close(got, base, rtol=1e-9, atol=1e-9)


_pairs = st.integers(2, 8).flatmap(
    lambda n: st.tuples(st.lists(_moderate, min_size=n, max_size=n), st.lists(_moderate, min_size=n, max_size=n))
)


@settings(max_examples=60, deadline=None)
@given(_pairs, st.integers(-900, 900))
def test_paired_difference_is_equivariant_under_exact_scaling(ab, k):
    a, b = ab
    base = paired_difference(a, b)
    s = 2.0**k
    got = paired_difference([x * s for x in a], [y * s for y in b])
    for field in ("mean", "low", "high", "se", "sd"):
        assert math.isfinite(getattr(got, field))
        assert getattr(got, field) == getattr(base, field) * s


@settings(max_examples=60, deadline=None)
@given(_pairs, st.floats(-1e3, 1e3))
def test_paired_difference_is_invariant_under_a_common_shift(ab, c):
    a, b = ab
    base = paired_difference(a, b)
    got = paired_difference([x + c for x in a], [y + c for y in b])
    # rounding a + c and b + c moves each difference by at most an ulp of 2e3 or so
    tol = 1e-9
    assert got.mean == pytest.approx(base.mean, abs=tol)
    assert got.sd == pytest.approx(base.sd, abs=tol)
    assert got.high - got.low == pytest.approx(base.high - base.low, abs=20 * tol)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-1e300, 1e300), min_size=n, max_size=n),
    st.lists(st.floats(-1e300, 1e300), min_size=n, max_size=n),
)))
def test_paired_difference_is_finite_for_huge_values(ab):
    d = paired_difference(*ab)
    assert all(math.isfinite(v) for v in (d.mean, d.low, d.high, d.se, d.sd))
    assert d.low <= d.mean <= d.high and d.se >= 0


# ------------------------------------------------------------------ losses, aggregation, advantages, self-BC
# Every public function of these modules, driven through the classes of bad input by name: each
# must raise a ValueError or TypeError naming the argument (value checks on), never another
# exception, NaN or silent acceptance; degenerate legal inputs give finite values and gradients.
pytestmark = pytest.mark.filterwarnings("ignore")

NAN = float("nan")


def unchecked(fn):
    """The function without the run-time jaxtyping wrapper the test hook may add."""
    return getattr(fn, "__wrapped__", fn)


# ----------------------------------------------------------------------------- valid calls


def sel_2x3():
    return cm.Selection.from_mask(torch.tensor([[True, False, True], [False, True, False]]))


def packed_policy_kwargs():
    return dict(
        logp=-torch.rand(3, 2),
        old_logp=-torch.rand(3, 2),
        advantages=torch.tensor([1.0, -1.0, 0.5]),
        selection=sel_2x3(),
        mask=torch.tensor([[True, True], [True, False], [True, True]]),
    )


def padded_kwargs(*names):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(2, 4, generator=g) for n in names}


CALLS = {
    "aggregate_loss": (
        cm.aggregate_loss,
        lambda: dict(
            loss=torch.randn(3, 4),
            mask=torch.ones(3, 4, dtype=torch.bool),
            segment=torch.tensor([0, 0, 1]),
            num_segments=2,
            weights=torch.ones(3),
            batch_num_tokens=12,
            global_batch_size=2,
            loss_scale_factor=8,
            dp_size=1,
        ),
    ),
    "masked_grpo_loss": (
        cm.masked_grpo_loss,
        lambda: dict(
            **packed_policy_kwargs(),
            entropy=torch.rand(3, 2),
            ref_logp=-torch.rand(3, 2),
            entropy_coef=0.01,
            kl_coef=0.1,
            clip_low=0.2,
            clip_high=0.28,
            dual_clip=3.0,
            dp_size=1,
            batch_num_tokens=5,
        ),
    ),
    "masked_grpo_loss_ht": (
        cm.masked_grpo_loss,
        lambda: dict(
            **{
                **packed_policy_kwargs(),
                "selection": with_packed_inclusion(
                    packed_policy_kwargs()["selection"], torch.tensor([0.5, 0.9, 0.25])
                ),
            },
            estimator="horvitz_thompson",
        ),
    ),
    "chunked_ppo_loss": (
        cm.chunked_ppo_loss,
        lambda: dict(
            **padded_kwargs("logp", "old_logp", "advantages"),
            mask=torch.ones(2, 4, dtype=torch.bool),
            log_ratio_clamp=20.0,
            global_batch_size=2,
        ),
    ),
    "value_loss": (
        cm.value_loss,
        lambda: dict(
            **padded_kwargs("values", "returns", "old_values"),
            mask=torch.ones(2, 4, dtype=torch.bool),
            clip=0.2,
            huber_delta=10.0,
        ),
    ),
    "bc_loss": (
        cm.bc_loss,
        lambda: dict(logp=-torch.rand(3), selection=sel_2x3(), event_size=2),
    ),
    "clipped_surrogate": (
        cm.clipped_surrogate,
        lambda: dict(**padded_kwargs("logp", "old_logp", "advantages"), dual_clip=2.0),
    ),
    "group_relative_advantages": (
        cm.group_relative_advantages,
        lambda: dict(
            rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]),
            group=torch.tensor([0, 0, 1, 1]),
            valid=torch.ones(4, dtype=torch.bool),
            eps=1e-6,
        ),
    ),
    "chunk_rewards": (
        cm.advantages.chunk_rewards,
        lambda: dict(
            rewards=torch.rand(2, 3, 4), mask=torch.ones(2, 3, 4, dtype=torch.bool), gamma=0.9
        ),
    ),
    "chunk_gae": (
        cm.chunk_gae,
        lambda: dict(
            **padded_kwargs("rewards", "values", "next_values"),
            valid=torch.ones(2, 4, dtype=torch.bool),
            terminated=torch.zeros(2, 4, dtype=torch.bool),
            truncated=torch.zeros(2, 4, dtype=torch.bool),
            bootstrap_value=torch.zeros(2),
            chunk_steps=torch.full((2, 4), 3),
            gamma=0.99,
            lam=0.95,
            chunk_size=3,
        ),
    ),
    "whiten_advantages": (
        cm.advantages.whiten_advantages,
        lambda: dict(advantages=torch.randn(2, 4), mask=torch.ones(2, 4, dtype=torch.bool), eps=1e-8),
    ),
    "chunk_log_prob": (
        cm.chunk_log_prob,
        lambda: dict(logp=-torch.rand(2, 3, 4), mask=torch.ones(2, 3, 4, dtype=torch.bool)),
    ),
    "loss_normalizers": (
        cm.loss_normalizers,
        lambda: dict(selection=sel_2x3(), mask=torch.ones(3, 2, dtype=torch.bool)),
    ),
}

# Arguments whose NaN/Inf entries are legal data (they are masked out, or are losses themselves).
NAN_OK = {"mask", "valid", "terminated", "truncated", "selection", "segment"}
# Arguments that must be non-negative.
NORMALISERS = {"batch_num_tokens", "global_batch_size", "loss_scale_factor"}
NONNEGATIVE = {"weights", "inclusion", "batch_num_tokens", "global_batch_size", "loss_scale_factor",
               "chunk_steps", "eps", "huber_delta", "clip", "event_size", "dp_size", "chunk_size"}


def classes(name, value):
    """The classes of `tests/_fuzz.py` (plus scalar NaN/Inf and Selection/option cases) that must
    be rejected for an argument whose valid value is `value`."""
    if isinstance(value, torch.Tensor):
        kinds = ["type", "dtype", "rank", "size"]
        if value.dtype.is_floating_point and name not in NAN_OK:
            kinds += ["nan", "inf"]
        if name in NONNEGATIVE:
            kinds.append("negative")
        return kinds
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ["type", "range", "scalar-nan"] if name in NONNEGATIVE else ["type", "scalar-nan"]
    if isinstance(value, cm.Selection):
        return ["selection-tuple"]
    if isinstance(value, str):
        return ["option"]
    return ["type"]


def bad_values_of(name, value):
    out = []
    for kind in classes(name, value):
        if kind == "scalar-nan":
            out += [(kind, math.nan), (kind, math.inf)]
        elif kind == "selection-tuple":
            out.append((kind, tuple(value)))
        elif kind == "option":
            out.append((kind, "no-such-option"))
        else:
            bads = bad_values(kind, value)
            if name in NORMALISERS and kind == "type":  # a float count is fine
                bads = [b for b in bads if not isinstance(b, float)]
            out += [(kind, bad) for bad in bads]
    return out


LOSS_CASES = [
    (call, name, i)
    for call, (_, build) in CALLS.items()
    for name, value in build().items()
    for i, _ in enumerate(bad_values_of(name, value))
]


# Flat case names as the grouped options spell them in messages.
ALIASES = {
    "clip_low": "clip.low", "clip_high": "clip.high", "dual_clip": "clip.dual",
    "log_ratio_clamp": "clip.log_ratio_clamp", "entropy": "regularizers.entropy",
    "ref_logp": "regularizers.ref_logp", "entropy_coef": "regularizers.entropy_coef",
    "kl_coef": "regularizers.kl_coef", "kl_type": "regularizers.kl_type",
    "inclusion": "selection.inclusion", "clip": "value_clip",
}
LOSSES = {"masked_grpo_loss", "masked_grpo_loss_ht", "chunked_ppo_loss", "value_loss", "bc_loss",
          "clipped_surrogate"}


def checked(call, fn):
    """`fn` with its value checks on (`validate_args=True`) and, for a loss, the flat options."""
    fn = unchecked(fn)
    takes = "validate_args" in inspect.signature(fn).parameters

    def run(**kw):
        if takes:
            kw = {"validate_args": True, **kw}
        if call in LOSSES:
            if call == "value_loss" and "clip" in kw:
                kw["value_clip"] = kw.pop("clip")
            kw = loss_kwargs(**kw)
        return fn(**kw)

    run.__name__ = run.__qualname__ = call
    return run


def run_bad(call, name, i):
    fn, build = CALLS[call]
    kwargs = build()
    kind, bad = bad_values_of(name, kwargs[name])[i]
    if (call, name, kind) in LEGAL:
        return
    # a `selection` mismatch may name the packed tensor it disagrees with
    names = ("logp",) if name == "selection" else ()
    if name in ALIASES:
        names = (*names, ALIASES[name])
    check_rejects(checked(call, fn), kwargs, name, bad, names=names)


def test_the_valid_calls_pass():
    for call, (fn, build) in CALLS.items():
        out = checked(call, fn)(**build())
        leaves = out if isinstance(out, tuple) else (out,)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                assert torch.isfinite(leaf).all(), call


# Some classes are legal for some arguments.
LEGAL = {
    ("group_relative_advantages", "rewards", "dtype"),  # int and bool rewards are legal
    ("chunk_rewards", "rewards", "dtype"),
    ("chunk_gae", "next_values", "nan"),  # read only where `truncated`: none here
    ("chunk_gae", "next_values", "inf"),
    ("loss_normalizers", "mask", "size"),  # a wider token axis is just more tokens per chunk
}


@settings(deadline=None, max_examples=400)
@given(case=st.sampled_from(LOSS_CASES))
def test_bad_input_is_named(case):
    run_bad(*case)


def test_every_case_runs_once():
    """The property test samples; this pass runs every case, so none can hide."""
    failures = []
    for case in LOSS_CASES:
        try:
            run_bad(*case)
        except (AssertionError, pytest.fail.Exception) as err:
            failures.append(str(err).splitlines()[0])
    assert not failures, "\n".join(failures)
    assert len(LOSS_CASES) > 250


def test_legal_variants_are_accepted():
    fn, build = CALLS["group_relative_advantages"]
    kwargs = build()
    kwargs["rewards"] = kwargs["rewards"].to(torch.int64)
    assert torch.isfinite(unchecked(fn)(**kwargs)).all()


# ----------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("mode", cm.aggregation.AGGREGATION_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_and_bf16_losses_are_finite(mode, dtype):
    kwargs = packed_policy_kwargs()
    for key in ("logp", "old_logp"):
        kwargs[key] = kwargs[key].to(dtype).requires_grad_(key == "logp")
    kwargs["advantages"] = kwargs["advantages"].to(dtype)
    for mask in (kwargs["mask"], torch.zeros(3, 2, dtype=torch.bool)):
        out = cm.masked_grpo_loss(**{**kwargs, "mask": mask}, loss_agg_mode=mode)
        assert all(torch.isfinite(v).all() for v in out)
        (grad,) = torch.autograd.grad(out.loss, kwargs["logp"])
        assert torch.isfinite(grad).all()
    values = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    none = torch.zeros(2, 4, dtype=torch.bool)
    for loss in (
        cm.value_loss(values, returns=values.detach(), mask=none, loss_agg_mode=mode),
        cm.bc_loss(values, mask=none, loss_agg_mode=mode),
        cm.chunked_ppo_loss(values, old_logp=values.detach(), advantages=values.detach(), mask=none, loss_agg_mode=mode).loss,
    ):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, values)
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_advantages_of_degenerate_groups_have_zero_value_and_gradient(eps, scale_by_std):
    # all successes, all failures, a single member, a mixed group
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0], requires_grad=True)
    group = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    adv = cm.group_relative_advantages(rewards, group, eps=eps, scale_by_std=scale_by_std)
    assert adv[:5].tolist() == [0.0] * 5
    assert adv[5] < 0 < adv[6]
    (grad,) = torch.autograd.grad((adv * torch.arange(7.0)).sum(), rewards)
    assert torch.isfinite(grad).all()
    assert grad[:5].tolist() == [0.0] * 5


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_whitening_constant_or_single_input_is_finite(eps):
    for x in (torch.ones(3), torch.tensor([2.0]), torch.zeros(0)):
        out = cm.advantages.whiten_advantages(x, eps=eps)
        assert torch.isfinite(out).all()
        if x.numel():
            assert out.abs().max() == 0.0
    out = cm.advantages.whiten_advantages(torch.tensor([1.0, 3.0]), eps=0.0)
    assert out.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


# ----------------------------------------------------------------------------- self-BC objects


def entry():
    return {"obs": torch.zeros(3, 2)}


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda b: b.add(entry(), steps="5"), "steps"),
        (lambda b: b.add(entry(), steps=5.0), "steps"),
        (lambda b: b.add(entry(), steps=True), "steps"),
        (lambda b: b.add(entry(), steps=-1), "steps"),
        (lambda b: b.add(entry(), steps=5, success="yes"), "success"),
        (lambda b: b.add(entry(), steps=5, success=1), "success"),
        (lambda b: b.add(entry(), steps=5, task=None), "task"),
        (lambda b: b.add(entry(), steps=5, task=0.5), "task"),
        (lambda b: b.add(entry(), steps=5, task=torch.zeros(2)), "task"),
        (lambda b: b.add(None, steps=5), "trajectory"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=[1, 0], steps=[3, 4]),
         "success[0]"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=[True, False], steps=[3.5, 4]),
         "steps[0]"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=torch.ones(2),
                               steps=[3, 4]), "success"),
        (lambda b: b.add_batch({"obs": torch.zeros(2, 3)}, success=[True, True],
                               steps=torch.ones(2)), "steps"),
        (lambda b: b.gather([0.5]), "indices"),
        (lambda b: b.gather([-1]), "indices"),
        (lambda b: b.gather([7]), "indices"),
        (lambda b: b.gather(torch.tensor([0.0])), "indices"),
        (lambda b: b.sample(0), "batch_size"),
        (lambda b: b.load_state_dict({**b.state_dict(), "counter": NAN}), "state['counter']"),
        (lambda b: b.load_state_dict({**b.state_dict(), "counter": 0}), "state['counter']"),
        (lambda b: b.load_state_dict({**b.state_dict(), "info": [(True, NAN, 0, 0)]}),
         "state['info'][0].steps"),
        (lambda b: b.load_state_dict({**b.state_dict(), "info": [(True, -3, 0, 0)]}),
         "state['info'][0].steps"),
        (lambda b: b.load_state_dict({**b.state_dict(), "info": [None]}), "state['info'][0]"),
        (lambda b: b.load_state_dict([]), "state"),
    ],
)
def test_success_buffer_bad_input_is_named(call, arg):
    buf = cm.selfbc.SuccessBuffer(capacity=4)
    buf.add(entry(), steps=5)
    with pytest.raises((ValueError, TypeError), match=f"`{re.escape(arg)}`"):
        call(buf)
    assert len(buf) == 1 and buf.info[0].steps == 5  # a refused call leaves the buffer as it was


@pytest.mark.parametrize("policy", [cm.selfbc.AdmitSuccessful(), cm.selfbc.EvictSlowest(), cm.selfbc.EvictOldest()])
@pytest.mark.parametrize(
    ("args", "arg"),
    [
        ((None, []), "candidate"),
        ((cm.selfbc.EntryInfo(True, 1, 0, 0), None), "entries"),
        ((cm.selfbc.EntryInfo(True, 1, 0, 0), [None]), "entries[0]"),
        ((cm.selfbc.EntryInfo("yes", 1, 0, 0), []), "candidate.success"),
        ((cm.selfbc.EntryInfo(True, 1.5, 0, 0), []), "candidate.steps"),
    ],
)
def test_buffer_policies_name_bad_arguments(policy, args, arg):
    extra = (4,) if isinstance(policy, cm.selfbc.AdmitSuccessful) else ()
    with pytest.raises(TypeError, match=f"`{re.escape(arg)}`"):
        policy(*args, *extra)


@pytest.mark.parametrize(
    ("rule", "state", "arg"),
    [
        (cm.selfbc.SuccessRateBCWeight(), {"average": NAN, "steps": 0}, "state['average']"),
        (cm.selfbc.SuccessRateBCWeight(), {"average": 1.5, "steps": 0}, "state['average']"),
        (cm.selfbc.SuccessRateBCWeight(), {"average": 0.5, "steps": -1}, "state['steps']"),
        (cm.selfbc.SuccessRateBCWeight(), {"average": 0.5, "steps": 1.5}, "state['steps']"),
        (cm.selfbc.LossBalanceBCWeight(), {"ppo_average": NAN, "bc_average": 1.0, "steps": 1},
         "state['ppo_average']"),
        (cm.selfbc.LossBalanceBCWeight(), {"ppo_average": 1.0, "bc_average": -1.0, "steps": 1},
         "state['bc_average']"),
        (cm.selfbc.SuccessRateBCWeight(), [], "state"),
        (cm.selfbc.ProductBCWeight(cm.selfbc.ConstantBCWeight()), [], "state"),
    ],
)
def test_bc_weight_state_loaders_reject_bad_values(rule, state, arg):
    before = rule.state_dict()
    with pytest.raises((ValueError, TypeError), match=f"`{re.escape(arg)}`"):
        rule.load_state_dict(state)
    assert rule.state_dict() == before
