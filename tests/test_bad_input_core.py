"""Bad and degenerate input across the public API of the core modules.

Each row of `CASES` names a public function, a builder of valid keyword arguments for a drawn
`(traj, chunk)` shape, one argument and the classes of bad values (see `tests/_fuzz.py`) that
must be rejected with a `ValueError` or `TypeError` naming that argument. `DEGENERATE` lists
legal corner cases that must return finite outputs.

These tests assert our own error messages, so they run in the plain pass only (the jaxtyping
pass stops wrongly typed arguments before our checks word the error).
"""

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _fuzz import bad_values, check_finite_output, check_rejects
from chunkmask import (
    NUM_PHASES,
    PhaseScoreBuffer,
    ProbabilisticChunkMasker,
    Selection,
    chunk_score_norm,
    gripper_close_fraction,
    inclusion_probabilities,
    keep_probabilities,
    label_grasp_onset,
    label_gripper_phases,
    label_time_segments,
    neyman_allocation,
    neyman_allocation_continuous,
    plackett_luce_sample,
    pps_inclusion,
    pps_sample,
    shrink,
    stratified_sample,
    success_failure_variance,
    suggest_budget,
    top_phase_sample,
    topk_sample,
    uniform_sample,
    unshrink,
)


@pytest.fixture(autouse=True)
def _plain_pass_only(request):
    try:
        typed = bool(request.config.getoption("jaxtyping_packages"))
    except ValueError:
        typed = False
    if typed:
        pytest.skip("asserts our own error messages; runs in the plain (unchecked) pass")


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
CASES = [
    # sampling
    ("pl/weights", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "k": 2, "valid": _valid(t, n)}, "weights", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("pl/k", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "k": 2}, "k", ("type", "none", "range", "zero")),
    ("pl/valid", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "k": 2, "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("pl/generator", plackett_luce_sample, lambda t, n: {"weights": _weights(t, n), "k": 2, "generator": torch.Generator()}, "generator", ("type",)),
    ("incl/weights", inclusion_probabilities, lambda t, n: {"weights": _weights(t, n), "k": 2, "valid": _valid(t, n)}, "weights", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("incl/k", inclusion_probabilities, lambda t, n: {"weights": _weights(t, n), "k": 2}, "k", ("type", "none", "range", "zero")),
    ("incl/num_nodes", inclusion_probabilities, lambda t, n: {"weights": _weights(t, n), "k": 2, "num_nodes": 8}, "num_nodes", ("type", "none", "range", "zero")),
    ("strat/phases", stratified_sample, lambda t, n: {"phases": _phases(t, n), "allocation": torch.tensor([1, 1, 1]), "valid": _valid(t, n)}, "phases", ("dtype:bool", "dtype:float", *SHAPE, "empty")),
    ("strat/allocation", stratified_sample, lambda t, n: {"phases": _phases(t, n), "allocation": torch.tensor([1, 1, 1])}, "allocation", ("negative", "dtype:bool", "dtype:float", "type", "none", "empty", lambda kw: [torch.tensor([1]), torch.zeros(3, dtype=torch.int64), torch.ones(1, 1, 3, dtype=torch.int64)])),
    ("strat/generator", stratified_sample, lambda t, n: {"phases": _phases(t, n), "allocation": torch.tensor([1, 1, 1])}, "generator", ("type",)),
    ("uniform/valid", uniform_sample, lambda t, n: {"valid": _valid(t, n), "k": 2}, "valid", ("dtype:int", "dtype:float", "rank", "type", "none")),
    ("uniform/k", uniform_sample, lambda t, n: {"valid": _valid(t, n), "k": 2}, "k", ("type", "none", "range", "zero")),
    ("top/phases", top_phase_sample, lambda t, n: {"phases": _phases(t, n), "scores": torch.tensor([0.1, 0.5, 0.2]), "k": 2, "valid": _valid(t, n)}, "phases", ("dtype:bool", "dtype:float", *SHAPE, "empty", lambda kw: [kw["phases"] + 5])),
    ("top/scores", top_phase_sample, lambda t, n: {"phases": _phases(t, n), "scores": torch.tensor([0.1, 0.5, 0.2]), "k": 2}, "scores", ("nan", "dtype:bool", "type", "none", "empty", lambda kw: [kw["scores"][:1], kw["scores"][None, None]])),
    ("top/k", top_phase_sample, lambda t, n: {"phases": _phases(t, n), "scores": torch.tensor([0.1, 0.5, 0.2]), "k": 2}, "k", ("type", "none", "range", "zero")),
    ("topk/scores", topk_sample, lambda t, n: {"scores": _weights(t, n), "k": 2, "valid": _valid(t, n)}, "scores", ("nan", "dtype:bool", *SHAPE, "empty")),
    ("topk/k", topk_sample, lambda t, n: {"scores": _weights(t, n), "k": 2}, "k", ("type", "none", "range", "zero")),
    ("pps_incl/sizes", pps_inclusion, lambda t, n: {"sizes": _weights(t, n), "total": 2, "valid": _valid(t, n)}, "sizes", (*F, "dtype:bool", "dtype:int", "size", "type", "none", lambda kw: [kw["sizes"][0, 0]])),
    ("pps_incl/total", pps_inclusion, lambda t, n: {"sizes": _weights(t, n), "total": 2}, "total", ("type", "none", "range", lambda kw: [torch.full((kw["sizes"].shape[0],), -1), torch.ones(kw["sizes"].shape[0] + 1, dtype=torch.int64), torch.tensor([2.0] * kw["sizes"].shape[0])])),
    ("pps_incl/valid", pps_inclusion, lambda t, n: {"sizes": _weights(t, n), "total": 2, "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
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
    ("rows/index", lambda sel, index: sel.rows(index), lambda t, n: {"sel": _sel(t, n), "index": 0}, "index", ("type", "none", "range", lambda kw: [kw["sel"].num_traj, torch.tensor([kw["sel"].num_traj]), torch.tensor([-1]), torch.tensor([0.0]), torch.ones(kw["sel"].num_traj + 1, dtype=torch.bool), slice(None, None, -1)])),
    ("cat/selections", Selection.cat, lambda t, n: {"selections": [_sel(t, n), _sel(t, n)]}, "selections", ("type", "none", lambda kw: [[], [kw["selections"][0], "x"], [_sel(1, 3), _sel(1, 4)], [_sel(1, 3), Selection.from_mask(torch.ones(1, 3, dtype=torch.bool), k=5)], kw["selections"][0]])),
    ("flat_index/size", lambda sel, size: sel.flat_index(size), lambda t, n: {"sel": _sel(t, n), "size": 1}, "size", ("type", "range")),
    ("packed_traj/size", lambda sel, size: sel.packed_traj_index(size), lambda t, n: {"sel": _sel(t, n), "size": 1}, "size", ("type", "range")),
    # shrinking
    ("shrink/selection", shrink, lambda t, n: {"tree": {"x": torch.ones(t, n)}, "selection": _sel(t, n)}, "selection", (_bad_selections,)),
    ("shrink/size", shrink, lambda t, n: {"tree": {"x": torch.ones(t, n)}, "selection": _sel(t, n), "size": int(_sel(t, n).counts.sum())}, "size", ("type", "range", lambda kw: [kw["size"] + 1])),
    ("shrink/tree", shrink, lambda t, n: {"tree": {"x": torch.ones(t, n)}, "selection": _sel(t, n)}, "tree", (lambda kw: [{"x": torch.ones(t_ + 1, 2)} for t_ in [kw["selection"].num_traj]] + [torch.ones(())],)),
    ("unshrink/selection", unshrink, lambda t, n: {"tree": torch.ones(int(_sel(t, n).counts.sum())), "selection": _sel(t, n)}, "selection", (_bad_selections,)),
    ("unshrink/fill", unshrink, lambda t, n: {"tree": torch.ones(int(_sel(t, n).counts.sum())), "selection": _sel(t, n)}, "fill", (lambda kw: ["x", None, [1.0], torch.tensor(1.0)],)),
    ("unshrink/tree", unshrink, lambda t, n: {"tree": torch.ones(int(_sel(t, n).counts.sum())), "selection": _sel(t, n)}, "tree", (lambda kw: [torch.ones(kw["tree"].shape[0] + 1), torch.ones(())],)),
    # scores
    ("sfv/features", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "features", ("nan", "inf", "dtype:bool", "dtype:int", "type", "none", "empty", lambda kw: [kw["features"][None], kw["features"].reshape(-1)])),
    ("sfv/phases", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "phases", ("negative", "dtype:bool", "dtype:float", *SHAPE, "empty", lambda kw: [kw["phases"] + 3])),
    ("sfv/success", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "success", ("dtype:int", "dtype:float", *SHAPE, "empty")),
    ("sfv/group", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3}, "group", ("dtype:bool", "dtype:float", *SHAPE, "empty")),
    ("sfv/group_dense", success_failure_variance, lambda t, n: {**{k: v for k, v in _rollouts(t, n).items() if k != "actions"}, "features": _rollouts(t, n)["actions"], "phases": _phases(max(t, 2), n), "num_phases": 3, "num_groups": 1}, "group", ("negative", lambda kw: [kw["group"] + 1])),
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
    ("buffer.update/scores", lambda buf, **kw: buf.update(**kw), lambda t, n: {"buf": _buffer(), "scores": torch.tensor([0.5, 1.0, 0.0]), "defined": torch.ones(3, dtype=torch.bool)}, "scores", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
    ("buffer.update/defined", lambda buf, **kw: buf.update(**kw), lambda t, n: {"buf": _buffer(), "scores": torch.tensor([0.5, 1.0, 0.0]), "defined": torch.ones(3, dtype=torch.bool)}, "defined", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("buffer.update/weight", lambda buf, **kw: buf.update(**kw), lambda t, n: {"buf": _buffer(), "scores": torch.tensor([0.5, 1.0, 0.0]), "weight": torch.ones(3)}, "weight", (*F, "dtype:bool", "dtype:int", "rank", "size", "type", "empty")),
    ("buffer.load/state", lambda buf, state: buf.load_state_dict(state), lambda t, n: {"buf": _buffer(), "state": _buffer_state()}, "state", (_bad_buffer_states,)),
    # allocation
    ("keep/scores", keep_probabilities, lambda t, n: {"scores": _weights(t, 3), "defined": torch.ones(t, 3, dtype=torch.bool)}, "scores", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty")),
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
    ("lgp/close_fraction", label_gripper_phases, lambda t, n: {"close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "close_fraction", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty", lambda kw: [kw["close_fraction"] + 1.5])),
    ("lgp/valid", label_gripper_phases, lambda t, n: {"close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    *[
        (f"lgp/{name}", label_gripper_phases, lambda t, n: {"close_fraction": torch.rand(t, n)}, name, ("type", "none", "range", lambda kw: [1.5]))
        for name in ("sustained", "active", "pre_min", "tail_max")
    ],
    ("lgp/window", label_gripper_phases, lambda t, n: {"close_fraction": torch.rand(t, n), "window": 3}, "window", ("type", "none", "range")),
    ("onset/close_fraction", label_grasp_onset, lambda t, n: {"close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "close_fraction", (*F, "dtype:bool", "dtype:int", *SHAPE, "empty", lambda kw: [kw["close_fraction"] + 1.5])),
    ("onset/valid", label_grasp_onset, lambda t, n: {"close_fraction": torch.rand(t, n), "valid": _valid(t, n)}, "valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
    ("onset/lead", label_grasp_onset, lambda t, n: {"close_fraction": torch.rand(t, n), "lead": 2}, "lead", ("type", "none", "range")),
    ("onset/active", label_grasp_onset, lambda t, n: {"close_fraction": torch.rand(t, n), "active": 0.5}, "active", ("type", "none", "range", lambda kw: [1.5])),
    ("lts/valid", label_time_segments, lambda t, n: {"valid": _valid(t, n), "num_segments": 3}, "valid", ("dtype:float", "rank", "type", "none", lambda kw: [torch.tensor([-1, 2])])),
    ("lts/num_segments", label_time_segments, lambda t, n: {"valid": _valid(t, n), "num_segments": 3}, "num_segments", ("type", "none", "range", "zero")),
    ("lts/num_chunks", label_time_segments, lambda t, n: {"valid": torch.tensor([2, 3]), "num_segments": 3, "num_chunks": 4}, "num_chunks", ("type", "range", lambda kw: [2])),
    # masker
    *[
        (f"masker/{name}", ProbabilisticChunkMasker, lambda t, n, name=name, value=value: {"budget": 3, name: value}, name, classes)
        for name, value, classes in (
            ("budget", 3, ("type", "none", "range", "zero")),
            ("num_phases", 5, ("type", "none", "range", "zero")),
            ("refresh_every", 5, ("type", "none", "range", "zero")),
            ("p_min", 0.1, ("type", "none", "range", lambda kw: [0.0, 2.0])),
            ("power", 1.0, ("type", "none", "range", lambda kw: [0.0])),
            ("weighting", "uniform", ("type", "none", lambda kw: ["Balance"])),
            ("close", "positive", ("type", "none", lambda kw: ["open"])),
            ("close_threshold", 0.0, ("type", lambda kw: [math.nan, math.inf])),
            ("labeler", None, (lambda kw: [1, "labeler"],)),
            ("inclusion", False, ("type", "none", lambda kw: [1, 0])),
            ("validate_args", True, ("type", "none", lambda kw: [1])),
            ("global_rng", False, ("type", "none")),
            ("seed", 0, ("type", "range", lambda kw: [True, 1.0, 2.5, torch.tensor(1.0)])),
            ("generator", None, ("type", lambda kw: [torch.Generator().get_state()])),
            ("process_group", None, ("type", lambda kw: [object()])),
        )
    ],
    *[
        (f"select/{name}", lambda masker, **kw: masker.select(**kw), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0), **_rollouts(t, n)}, name, classes)
        for name, classes in (
            ("actions", ("nan", "inf", "dtype:bool", "dtype:int", "rank", "type", "none", "empty")),
            ("success", ("dtype:int", "dtype:float", *SHAPE, "empty")),
            ("group", ("dtype:bool", "dtype:float", *SHAPE, "empty")),
            ("valid", ("dtype:int", "dtype:float", "rank", "size", "type", "empty")),
        )
    ],
    ("select/phases", lambda masker, **kw: masker.select(**kw), lambda t, n: {"masker": ProbabilisticChunkMasker(3, seed=0), **_rollouts(t, n), "phases": _phases(max(t, 2), n)}, "phases", ("negative", "dtype:bool", "dtype:float", "rank", "size", "type", "empty", lambda kw: [kw["phases"] + NUM_PHASES])),
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


def _values(fn, classes, kwargs, arg):
    valid = kwargs[arg] if arg in kwargs else _default(fn, arg)
    for kind in classes:
        yield list(kind(kwargs)) if callable(kind) else bad_values(kind, valid)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@settings(max_examples=3, deadline=None)
@given(shape=st.tuples(st.integers(1, 4), st.integers(2, 7)))
def test_bad_input_is_rejected_naming_the_argument(case, shape):
    _, fn, build, arg, classes = case
    names = {
        "state": ("state",),
        "tree": ("tree",),
        "selections": ("selections",),
        "valid": ("valid",),
    }.get(arg, ())
    checked = 0
    for values in _values(fn, classes, build(*shape), arg):
        for bad in values:
            kwargs = build(*shape)  # fresh: a call may consume state (buffers, maskers)
            check_rejects(fn, kwargs, arg, bad, names=names)
            checked += 1
    assert checked > 0


# ----------------------------------------------------------------------------- degenerate inputs


def _all_padding_rollouts(dtype=torch.float32):
    batch = _rollouts(4, 6)
    batch["actions"] = batch["actions"].to(dtype)
    batch["valid"] = batch["valid"].clone()
    batch["valid"][1] = False  # one all-padding trajectory
    batch["actions"][1] = math.nan  # whose contents are garbage
    return batch


DEGENERATE = [
    ("pl/all_padding_row", plackett_luce_sample, lambda: {"weights": torch.ones(3, 5), "k": 2, "valid": torch.tensor([[False] * 5, [True] * 5, [True, False, False, False, False]])}),
    ("pl/k_exceeds_available", plackett_luce_sample, lambda: {"weights": torch.tensor([[0.0, 1.0, 0.0, 2.0]]), "k": 6}),
    ("pl/bf16", plackett_luce_sample, lambda: {"weights": torch.rand(3, 8).bfloat16(), "k": 3}),
    ("incl/all_padding_row", inclusion_probabilities, lambda: {"weights": torch.ones(2, 5), "k": 2, "valid": torch.tensor([[False] * 5, [True] * 5])}),
    ("incl/bf16", inclusion_probabilities, lambda: {"weights": torch.rand(3, 6).bfloat16() + 0.1, "k": 2}),
    ("sfv/all_success", success_failure_variance, lambda: {"features": torch.randn(4, 3, 2), "phases": torch.zeros(4, 3, dtype=torch.int64), "success": torch.ones(4, dtype=torch.bool), "group": torch.zeros(4, dtype=torch.int64), "num_phases": 2, "weighting": "balance"}),
    ("sfv/single_member_groups", success_failure_variance, lambda: {"features": torch.randn(4, 3, 2), "phases": torch.zeros(4, 3, dtype=torch.int64), "success": torch.tensor([True, False, True, False]), "group": torch.arange(4), "num_phases": 2}),
    ("sfv/bf16_with_padding", success_failure_variance, lambda: {"features": _all_padding_rollouts(torch.bfloat16)["actions"], "phases": _phases(4, 6), "success": torch.tensor([True, False, True, False]), "group": torch.zeros(4, dtype=torch.int64), "num_phases": 3, "valid": _all_padding_rollouts()["valid"]}),
    ("sfv/empty_group_id", success_failure_variance, lambda: {"features": torch.randn(2, 3, 2), "phases": torch.zeros(2, 3, dtype=torch.int64), "success": torch.tensor([True, False]), "group": torch.tensor([2, 2]), "num_phases": 2, "num_groups": 4}),
    ("keep/nothing_defined", keep_probabilities, lambda: {"scores": torch.full((2, 3), math.nan), "defined": torch.zeros(2, 3, dtype=torch.bool)}),
    ("keep/bf16", keep_probabilities, lambda: {"scores": torch.rand(2, 3).bfloat16()}),
    ("neyman/zero_sizes", neyman_allocation, lambda: {"budget": 3, "sizes": torch.zeros(2, 3, dtype=torch.int64), "stds": torch.zeros(2, 3)}),
    ("neyman_c/zero_sizes", neyman_allocation_continuous, lambda: {"budget": 3, "sizes": torch.zeros(2, 3), "stds": torch.ones(2, 3)}),
    ("knee/constant", suggest_budget, lambda: {"scores": torch.ones(3, 5)}),
    ("lgp/all_padding", label_gripper_phases, lambda: {"close_fraction": torch.full((2, 4), math.nan), "valid": torch.zeros(2, 4, dtype=torch.bool)}),
    ("gcf/bf16", gripper_close_fraction, lambda: {"gripper": torch.randn(2, 3, 4).bfloat16()}),
    ("shrink/empty_selection", shrink, lambda: {"tree": {"x": torch.randn(2, 3)}, "selection": Selection.from_mask(torch.zeros(2, 3, dtype=torch.bool))}),
    ("unshrink/empty", unshrink, lambda: {"tree": torch.zeros(0, 2), "selection": Selection.from_mask(torch.zeros(2, 3, dtype=torch.bool))}),
    ("select/all_padding_bf16", lambda **kw: ProbabilisticChunkMasker(4, seed=0, inclusion=True).select(**kw), lambda: _all_padding_rollouts(torch.bfloat16)),
    ("select/all_success", lambda **kw: ProbabilisticChunkMasker(4, seed=0).select(**kw), lambda: {**_rollouts(4, 6), "success": torch.ones(4, dtype=torch.bool)}),
]


@pytest.mark.parametrize("case", DEGENERATE, ids=[c[0] for c in DEGENERATE])
def test_degenerate_but_legal_input_gives_finite_output(case):
    _, fn, build = case
    check_finite_output(fn, build())


def test_degenerate_outputs_are_correct():
    # All-padding trajectory: nothing selected, num_chunks 0, and the masker reports PAD.
    batch = _all_padding_rollouts(torch.bfloat16)
    sel, info = ProbabilisticChunkMasker(4, seed=0, inclusion=True).select(**batch)
    assert not sel.mask[1].any() and sel.num_chunks[1] == 0
    assert (info.phases[1] == -1).all() and (info.inclusion[1] == 0).all()
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
