import pytest
import torch

import chunkmask
from chunkmask import NUM_PHASES, Phase, ProbabilisticChunkMasker

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rollouts(seed=0, traj=12, n=16, h=4, d=3, group_size=4, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, n + 1, (traj,), generator=g)
    valid = torch.arange(n)[None, :] < lengths[:, None]
    actions = torch.randn(traj, n, h, d, generator=g)
    start = (lengths.float() * 0.3).long()
    stop = (lengths.float() * 0.7).long()
    closed = (torch.arange(n)[None, :] >= start[:, None]) & (torch.arange(n)[None, :] < stop[:, None])
    actions[..., -1] = torch.where(closed, 1.0, -1.0)[..., None]
    success = torch.rand(traj, generator=g) < 0.5
    success[::group_size] = True
    success[1::group_size] = False  # every group mixed
    group = torch.arange(traj) // group_size
    return {k: v.to(device) for k, v in dict(actions=actions, success=success, group=group, valid=valid).items()}


@pytest.mark.parametrize("device", DEVICES)
def test_select_respects_budget_padding_and_reports_consistent_diagnostics(device):
    batch = rollouts(device=device)
    masker = ProbabilisticChunkMasker(budget=5, seed=0)
    sel, info = masker.select(**batch)
    valid = batch["valid"]
    assert isinstance(sel, chunkmask.Selection)
    assert torch.equal(sel.counts, valid.sum(1).clamp_max(5))
    chosen = sel.chunk_mask()
    assert not (chosen & ~valid).any()
    assert int(info.selected_per_phase.sum()) == int(chosen.sum())
    assert int(info.available_per_phase.sum()) == int(valid.sum())
    assert (info.phases[~valid] == Phase.PAD).all() and (info.phases[valid] >= 0).all()
    keep = info.keep_probabilities
    assert keep.shape == (NUM_PHASES,) and (keep >= 0.1 - 1e-6).all() and (keep <= 1 + 1e-6).all()
    expected_w = torch.where(valid, keep[info.phases.clamp_min(0)], 0.0)
    torch.testing.assert_close(info.weights, expected_w)
    assert info.inclusion is None


def test_masker_is_exactly_the_composition_of_the_primitives():
    batch = rollouts(seed=3)
    masker = ProbabilisticChunkMasker(budget=4, seed=11, refresh_every=2)
    buffer = chunkmask.PhaseScoreBuffer(NUM_PHASES, refresh_every=2, p_min=0.1)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        batch = rollouts(seed=step)
        sel, info = masker.select(**batch)
        frac = chunkmask.gripper_close_fraction(batch["actions"][..., -1], batch["valid"], close="positive")
        phases = chunkmask.label_gripper_phases(frac, batch["valid"])
        var = chunkmask.success_failure_variance(
            batch["actions"], phases, batch["success"], batch["group"], num_phases=NUM_PHASES, valid=batch["valid"]
        )
        keep = buffer.update(var.scores, var.defined)
        weights = torch.where(batch["valid"], keep[phases.clamp_min(0)], 0.0)
        ref = chunkmask.plackett_luce_sample(weights, 4, valid=batch["valid"], generator=gen)
        assert torch.equal(info.phases, phases)
        torch.testing.assert_close(info.scores, var.scores)
        torch.testing.assert_close(info.keep_probabilities, keep)
        assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.mask, ref.mask)


def test_same_seed_same_selection_and_state_round_trip():
    a = ProbabilisticChunkMasker(budget=3, seed=5, refresh_every=2)
    b = ProbabilisticChunkMasker(budget=3, seed=5, refresh_every=2)
    for step in range(3):
        sa, _ = a.select(**rollouts(seed=step))
        sb, _ = b.select(**rollouts(seed=step))
        assert torch.equal(sa.indices, sb.indices)
    state = a.state_dict()
    c = ProbabilisticChunkMasker(budget=3, seed=999, refresh_every=2)
    c.load_state_dict(state)
    for step in range(3, 7):
        sa, ia = a.select(**rollouts(seed=step))
        sc, ic = c.select(**rollouts(seed=step))
        assert torch.equal(sa.indices, sc.indices)
        torch.testing.assert_close(ia.keep_probabilities, ic.keep_probabilities)


def test_nan_in_padded_actions_changes_nothing():
    batch = rollouts(seed=7)
    dirty = dict(batch)
    dirty["actions"] = batch["actions"].clone()
    dirty["actions"][~batch["valid"]] = float("nan")
    dirty["actions"][~batch["valid"], :, -1] = -1.0  # keep the gripper channel's padding sane
    s1, i1 = ProbabilisticChunkMasker(budget=4, seed=1).select(**batch)
    s2, i2 = ProbabilisticChunkMasker(budget=4, seed=1).select(**dirty)
    assert torch.equal(s1.indices, s2.indices)
    torch.testing.assert_close(i1.scores, i2.scores)


def test_explicit_phases_custom_labeler_gripper_and_inclusion():
    batch = rollouts(seed=2)
    traj, n = batch["valid"].shape
    phases = torch.where(batch["valid"], torch.arange(n)[None, :].expand(traj, n) % 2, -1)
    masker = ProbabilisticChunkMasker(budget=4, num_phases=2, seed=0, inclusion=True)
    sel, info = masker.select(phases=phases, **batch)
    assert torch.equal(info.phases, phases)
    assert info.inclusion.shape == (traj, n)
    torch.testing.assert_close(info.inclusion.sum(1), sel.counts.to(torch.float64), atol=1e-6, rtol=0)

    def labeler(gripper, valid):
        return torch.where(valid, 0, -1)

    _, info2 = ProbabilisticChunkMasker(budget=2, num_phases=1, labeler=labeler, seed=0).select(**batch)
    assert (info2.phases[batch["valid"]] == 0).all()
    # An explicit gripper overrides the last action dim; convention "zero" means 0 closes.
    gripper01 = (batch["actions"][..., -1] < 0).float()
    _, a = ProbabilisticChunkMasker(budget=2, seed=0).select(**batch)
    _, b = ProbabilisticChunkMasker(budget=2, seed=0, close="zero").select(gripper=gripper01, **batch)
    assert torch.equal(a.phases, b.phases)


def test_all_success_and_all_failure_batches_are_defined():
    batch = rollouts(seed=4)
    for outcome in (True, False):
        batch["success"] = torch.full_like(batch["success"], outcome)
        sel, info = ProbabilisticChunkMasker(budget=3, seed=0).select(**batch)
        assert not info.defined.any()
        assert torch.isfinite(info.keep_probabilities).all()
        assert torch.equal(sel.counts, batch["valid"].sum(1).clamp_max(3))


def test_masker_errors():
    with pytest.raises(ValueError, match="`budget` must be > 0, got 0"):
        ProbabilisticChunkMasker(budget=0)
    with pytest.raises(TypeError, match="`budget` must be an int"):
        ProbabilisticChunkMasker(budget=2.5)
    with pytest.raises(ValueError, match="`p_min`"):
        ProbabilisticChunkMasker(budget=2, p_min=1.5)
    with pytest.raises(ValueError, match="`weighting`.*'uniform'.*got 'mean'"):
        ProbabilisticChunkMasker(budget=2, weighting="mean")
    with pytest.raises(TypeError, match="`labeler` must be callable"):
        ProbabilisticChunkMasker(budget=2, labeler=3)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator"):
        ProbabilisticChunkMasker(budget=2, generator=0)
    with pytest.raises(ValueError, match="`close`"):
        ProbabilisticChunkMasker(budget=2, close="sideways")
    masker = ProbabilisticChunkMasker(budget=2)
    with pytest.raises(ValueError, match="`gripper` or `actions`"):
        masker.label()
    with pytest.raises(ValueError, match="`actions` must have 4 dimensions"):
        masker.select(actions=torch.zeros(2, 3, 4), success=torch.ones(2, dtype=torch.bool), group=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`valid` must have shape \(2, 3\)"):
        masker.select(actions=torch.zeros(2, 3, 4, 2), success=torch.ones(2, dtype=torch.bool),
                      group=torch.zeros(2, dtype=torch.long), valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="missing keys"):
        masker.load_state_dict({"budget": 2})
    other = ProbabilisticChunkMasker(budget=2, num_phases=3).state_dict()
    with pytest.raises(ValueError, match=r"`state\['num_phases'\]`.*5, got 3"):
        masker.load_state_dict(other)
    with pytest.raises(TypeError, match="`state` must be a dict"):
        masker.load_state_dict([1])


# ----------------------------------------------------------------------------- host syncs


_SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "is_nonzero", "equal")


class _SyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op that reads tensor contents on the host.

    `.item()`, `int(t)`, `bool(t)` all dispatch `_local_scalar_dense`; `torch.unique`, `nonzero`
    and boolean-mask indexing have data-dependent output shapes (they sync on an accelerator).
    """

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(op in name for op in _SYNC_OPS):
            self.ops.append(name)
        if func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.ops.append("boolean-mask index")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("global_rng", [False, True])
def test_select_makes_no_host_sync_when_asked(global_rng):
    batch = rollouts()
    kwargs = {"seed": 0} if not global_rng else {}
    masker = ProbabilisticChunkMasker(
        budget=5, refresh_every=2, validate_args=False, global_rng=global_rng, **kwargs
    )
    with _SyncRecorder() as rec:
        for _ in range(3):  # initialise, hold, refresh
            masker.select(**batch, num_groups=3)
    assert rec.ops == []
    # The recorder does see the syncs of the other paths.
    with _SyncRecorder() as rec:
        masker.select(**batch)
    assert "_unique2" in " ".join(rec.ops)
    checked = ProbabilisticChunkMasker(budget=5, seed=0)
    with _SyncRecorder() as rec:
        checked.select(**batch, num_groups=3)
    assert "_local_scalar_dense" in " ".join(rec.ops)


def test_select_compiles_fullgraph_and_matches_eager():
    # Note: dynamo captures `torch.unique` as a dynamic-shape op, so fullgraph compilation alone
    # does not prove the absence of syncs; the dispatch recorder above does.
    batch = rollouts()

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(3)
        masker = ProbabilisticChunkMasker(
            budget=5, refresh_every=2, validate_args=False, global_rng=True
        )

        def step(actions, success, group, valid):
            sel, info = masker.select(
                actions=actions, success=success, group=group, valid=valid, num_groups=3
            )
            return sel.indices, sel.mask, info.keep_probabilities, info.phases

        if compiled:
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        return [step(**batch) for _ in range(4)]

    eager, compiled = run(False), run(True)
    for a, b in zip(eager, compiled, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)


def test_num_groups_equals_unique_path():
    batch = rollouts()
    a = ProbabilisticChunkMasker(budget=5, seed=0)
    b = ProbabilisticChunkMasker(budget=5, seed=0)
    for _ in range(3):
        sa, ia = a.select(**batch)
        sb, ib = b.select(**batch, num_groups=3)
        assert torch.equal(sa.indices, sb.indices)
        torch.testing.assert_close(ia.scores, ib.scores)
    with pytest.raises(ValueError, match=r"`group` must hold ids in \[0, 2\) \(`num_groups`\)"):
        a.select(**batch, num_groups=2)


# ----------------------------------------------------------------------------- argument errors


def test_phases_padding_is_pad_in_info():
    batch = rollouts()
    phases = torch.where(batch["valid"], 1, 77)  # caller's padding value is garbage
    _, info = ProbabilisticChunkMasker(budget=4, seed=0).select(**batch, phases=phases)
    assert (info.phases[~batch["valid"]] == int(Phase.PAD)).all()
    assert (info.phases[batch["valid"]] == 1).all()
    assert info.phases.dtype == torch.int64


def test_errors_name_the_argument_the_user_passed():
    batch = rollouts()
    actions = batch["actions"].clone()
    actions[0, 0, 0, 0] = float("nan")
    masker = ProbabilisticChunkMasker(budget=4, seed=0)
    with pytest.raises(ValueError, match=r"`actions` must be finite"):
        masker.select(**{**batch, "actions": actions})
    with pytest.raises(ValueError, match=r"`phases` must have shape \(12, 16\) \(the first two sizes of `actions`\)"):
        masker.select(**batch, phases=torch.zeros(12, 15, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`close_threshold` must be finite, got nan"):
        ProbabilisticChunkMasker(budget=4, close_threshold=float("nan"))
    with pytest.raises(ValueError, match=r"`close_threshold` must be given"):
        ProbabilisticChunkMasker(budget=4, close="threshold")
    for seed in (1.5, 2.0, True):
        with pytest.raises(TypeError, match=r"`seed` must be an int"):
            ProbabilisticChunkMasker(budget=4, seed=seed)
    with pytest.raises(ValueError, match=r"`seed` must be >= 0, got -1"):
        ProbabilisticChunkMasker(budget=4, seed=-1)
    with pytest.raises(TypeError, match=r"`inclusion` must be a bool"):
        ProbabilisticChunkMasker(budget=4, inclusion="yes")
    with pytest.raises(ValueError, match=r"`generator` must be None when `global_rng=True`"):
        ProbabilisticChunkMasker(budget=4, global_rng=True, generator=torch.Generator())
    with pytest.raises(TypeError, match=r"`process_group` must be a torch.distributed.ProcessGroup"):
        ProbabilisticChunkMasker(budget=4, process_group="world")
    with pytest.raises(TypeError, match=r"`labeler\(gripper, valid\)` must have an int dtype"):
        ProbabilisticChunkMasker(budget=4, labeler=lambda g, v: g).select(**batch)


def test_load_state_dict_rejects_bad_states():
    batch = rollouts()
    masker = ProbabilisticChunkMasker(budget=4, seed=0)
    masker.select(**batch)
    state = masker.state_dict()
    before = masker.keep_probabilities

    def broken(**changes):
        s = {**state, "buffer": {**state["buffer"]}}
        for key, value in changes.items():
            if key in s["buffer"]:
                s["buffer"][key] = value
            else:
                s[key] = value
        return s

    nan_keep = state["buffer"]["keep_probabilities"].clone()
    nan_keep[0] = float("nan")
    with pytest.raises(ValueError, match=r"`state\['keep_probabilities'\]` must be finite"):
        masker.load_state_dict(broken(keep_probabilities=nan_keep))
    with pytest.raises(ValueError, match=r"`state\['keep_probabilities'\]` must lie in \(0, 1\]"):
        masker.load_state_dict(broken(keep_probabilities=nan_keep.nan_to_num(2.0)))
    neg = state["buffer"]["window_sum"].clone()
    neg[1] = -1.0
    with pytest.raises(ValueError, match=r"`state\['window_sum'\]` must be finite and non-negative"):
        masker.load_state_dict(broken(window_sum=neg))
    with pytest.raises(TypeError, match=r"`state\['budget'\]` must be an int, got float"):
        masker.load_state_dict(broken(budget=4.7))
    with pytest.raises(TypeError, match=r"`state\['num_phases'\]` must be an int, got float"):
        masker.load_state_dict(broken(num_phases=5.0))
    with pytest.raises(TypeError, match=r"`state\['generator'\]` must be a torch.Tensor"):
        masker.load_state_dict(broken(generator=[1, 2]))
    with pytest.raises(ValueError, match=r"`state\['generator'\]` must be a state of this masker"):
        masker.load_state_dict(broken(generator=torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(TypeError, match=r"`state\['window_steps'\]` must be an int"):
        masker.load_state_dict(broken(window_steps=1.0))
    # Nothing was changed by the rejected loads.
    torch.testing.assert_close(masker.keep_probabilities, before)
    masker.load_state_dict(state)


def test_cause_scoring_is_the_composition_with_the_onset_labeler():
    """labeler=onset, scored_phases=(approach, onset), min_groups, weighted window: exactly the
    primitives composed by hand (the phases after the first attempt fall to p_min)."""
    from chunkmask import NUM_ONSET_PHASES, OnsetPhase, label_grasp_onset

    def labeler(gripper, valid):
        frac = chunkmask.gripper_close_fraction(gripper, valid, close="positive")
        return label_grasp_onset(frac, valid, lead=2)

    scored = (OnsetPhase.APPROACH, OnsetPhase.ONSET)
    masker = ProbabilisticChunkMasker(
        budget=4, num_phases=NUM_ONSET_PHASES, labeler=labeler, scored_phases=scored, seed=3,
        refresh_every=2, window="weighted", min_groups=2,
    )
    buffer = chunkmask.PhaseScoreBuffer(NUM_ONSET_PHASES, refresh_every=2, window="weighted",
                                        min_groups=2)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        batch = rollouts(seed=step)
        sel, info = masker.select(**batch)
        phases = labeler(batch["actions"][..., -1], batch["valid"])
        var = chunkmask.success_failure_variance(
            batch["actions"], phases, batch["success"], batch["group"],
            num_phases=NUM_ONSET_PHASES, valid=batch["valid"],
        )
        defined = var.defined & torch.tensor([True, True, False, False])
        keep = buffer.update(var.scores, defined, weight=var.group_defined.sum(0).float())
        assert torch.equal(info.phases, phases)
        torch.testing.assert_close(info.keep_probabilities, keep)
        assert info.keep_probabilities[2:].tolist() == pytest.approx([0.1, 0.1])
        weights = torch.where(batch["valid"], keep[phases.clamp_min(0)], 0.0)
        ref = chunkmask.plackett_luce_sample(weights, 4, valid=batch["valid"], generator=gen)
        assert torch.equal(sel.indices, ref.indices)


def test_scored_phases_and_robust_buffer_errors():
    with pytest.raises(ValueError, match=r"`scored_phases` must hold at least one id in \[0, 5\)"):
        ProbabilisticChunkMasker(budget=2, scored_phases=[5])
    with pytest.raises(ValueError, match=r"`scored_phases` must hold at least one id"):
        ProbabilisticChunkMasker(budget=2, scored_phases=[])
    with pytest.raises(ValueError, match="`scored_phases` must be >= 0, got -1"):
        ProbabilisticChunkMasker(budget=2, scored_phases=[0, -1])
    with pytest.raises(TypeError, match="`scored_phases` must be a sequence of phase ids, got int"):
        ProbabilisticChunkMasker(budget=2, scored_phases=1)
    with pytest.raises(TypeError, match="`scored_phases` must be an int, got float"):
        ProbabilisticChunkMasker(budget=2, scored_phases=[1.0])
    with pytest.raises(ValueError, match="`window` must be one of"):
        ProbabilisticChunkMasker(budget=2, window="mean")
    with pytest.raises(ValueError, match=r"`min_groups` must lie in \[0.0, inf\)"):
        ProbabilisticChunkMasker(budget=2, min_groups=-2)
