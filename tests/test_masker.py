import pytest
import torch

import chunkmask
from _sync import SyncRecorder as _SyncRecorder
from chunkmask import NUM_PHASES, PhaseLabelling, PhaseScoring, ProbabilisticChunkMasker
from chunkmask.pcm import Phase

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


def per_phase(phases, mask):
    return torch.stack([(mask & (phases == c)).sum() for c in range(NUM_PHASES)])


def run(masker, *, advantages=None, phases=None, **batch):
    """One training step of the masker: `update` then `draw`; returns (selection, PhaseUpdate)."""
    info = masker.update(phases=phases, **batch)
    sel = masker.draw(info.phases, valid=batch.get("valid"), advantages=advantages)
    return sel, info


@pytest.mark.parametrize("device", DEVICES)
def test_select_respects_budget_padding_and_reports_consistent_diagnostics(device):
    batch = rollouts(device=device)
    masker = ProbabilisticChunkMasker(budget=5, seed=0)
    sel, info = run(masker, **batch)
    valid = batch["valid"]
    assert isinstance(sel, chunkmask.Selection)
    assert torch.equal(sel.counts, valid.sum(1).clamp_max(5))
    chosen = sel.chunk_mask()
    assert not (chosen & ~valid).any()
    assert int(info.selected_per_phase(sel).sum()) == int(chosen.sum())
    assert int(info.available_per_phase.sum()) == int(valid.sum())
    assert (info.phases[~valid] == Phase.PAD).all() and (info.phases[valid] >= 0).all()
    keep = info.keep_probabilities
    assert keep.shape == (NUM_PHASES,) and (keep >= 0.1 - 1e-6).all() and (keep <= 1 + 1e-6).all()
    expected_w = torch.where(valid, keep[info.phases.clamp_min(0)], 0.0)
    assert sel.inclusion is None and sel.packed_inclusion() is None
    torch.testing.assert_close(masker.weights(info.phases, valid), expected_w)
    assert torch.equal(info.selected_per_phase(sel), per_phase(info.phases, chosen))


def test_masker_is_exactly_the_composition_of_the_primitives():
    batch = rollouts(seed=3)
    masker = ProbabilisticChunkMasker(budget=4, seed=11, scoring=PhaseScoring(refresh_every=2))
    buffer = chunkmask.pcm.PhaseScoreBuffer(NUM_PHASES, refresh_every=2, p_min=0.1)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        batch = rollouts(seed=step)
        sel, info = run(masker, **batch)
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
    a = ProbabilisticChunkMasker(budget=3, seed=5, scoring=PhaseScoring(refresh_every=2))
    b = ProbabilisticChunkMasker(budget=3, seed=5, scoring=PhaseScoring(refresh_every=2))
    for step in range(3):
        sa, _ = run(a, **rollouts(seed=step))
        sb, _ = run(b, **rollouts(seed=step))
        assert torch.equal(sa.indices, sb.indices)
    state = a.state_dict()
    c = ProbabilisticChunkMasker(budget=3, seed=999, scoring=PhaseScoring(refresh_every=2))
    c.load_state_dict(state)
    for step in range(3, 7):
        sa, ia = run(a, **rollouts(seed=step))
        sc, ic = run(c, **rollouts(seed=step))
        assert torch.equal(sa.indices, sc.indices)
        torch.testing.assert_close(ia.keep_probabilities, ic.keep_probabilities)


def test_nan_in_padded_actions_changes_nothing():
    batch = rollouts(seed=7)
    dirty = dict(batch)
    dirty["actions"] = batch["actions"].clone()
    dirty["actions"][~batch["valid"]] = float("nan")
    dirty["actions"][~batch["valid"], :, -1] = -1.0  # keep the gripper channel's padding sane
    s1, i1 = run(ProbabilisticChunkMasker(budget=4, seed=1), **batch)
    s2, i2 = run(ProbabilisticChunkMasker(budget=4, seed=1), **dirty)
    assert torch.equal(s1.indices, s2.indices)
    torch.testing.assert_close(i1.scores, i2.scores)


def test_explicit_phases_custom_labeler_gripper_and_inclusion():
    batch = rollouts(seed=2)
    traj, n = batch["valid"].shape
    phases = torch.where(batch["valid"], torch.arange(n)[None, :].expand(traj, n) % 2, -1)
    masker = ProbabilisticChunkMasker(budget=4, num_phases=2, seed=0, inclusion=True)
    sel, info = run(masker, phases=phases, **batch)
    assert torch.equal(info.phases, phases)
    pi = chunkmask.pcm.inclusion_probabilities(masker.weights(info.phases), 4, valid=batch["valid"])
    assert sel.inclusion.shape == (traj, 4) and sel.inclusion.dtype == torch.float64
    torch.testing.assert_close(pi.sum(1), sel.counts.to(torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(sel.packed_inclusion(), pi[sel.chunk_mask()])
    assert (sel.inclusion[~sel.mask] == 1).all()
    sel.check(values=True)

    def labeler(gripper, valid):
        return torch.where(valid, 0, -1)

    _, info2 = run(ProbabilisticChunkMasker(budget=2, num_phases=1, labelling=PhaseLabelling(labeler=labeler), seed=0), **batch)
    assert (info2.phases[batch["valid"]] == 0).all()
    # An explicit gripper overrides the last action dim; convention "zero" means 0 closes.
    gripper01 = (batch["actions"][..., -1] < 0).float()
    _, a = run(ProbabilisticChunkMasker(budget=2, seed=0), **batch)
    _, b = run(ProbabilisticChunkMasker(budget=2, seed=0, labelling=PhaseLabelling(close="zero")), gripper=gripper01, **batch)
    assert torch.equal(a.phases, b.phases)


def test_all_success_and_all_failure_batches_are_defined():
    batch = rollouts(seed=4)
    for outcome in (True, False):
        batch["success"] = torch.full_like(batch["success"], outcome)
        sel, info = run(ProbabilisticChunkMasker(budget=3, seed=0), **batch)
        assert not info.defined.any()
        assert torch.isfinite(info.keep_probabilities).all()
        assert torch.equal(sel.counts, batch["valid"].sum(1).clamp_max(3))


def test_masker_errors():
    with pytest.raises(ValueError, match="`budget` must be > 0, got 0"):
        ProbabilisticChunkMasker(budget=0)
    with pytest.raises(TypeError, match="`budget` must be an int"):
        ProbabilisticChunkMasker(budget=2.5)
    with pytest.raises(ValueError, match="`p_min`"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(p_min=1.5))
    with pytest.raises(ValueError, match="`weighting`.*'uniform'.*got 'mean'"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(weighting="mean"))
    with pytest.raises(TypeError, match="`labeler` must be callable"):
        ProbabilisticChunkMasker(budget=2, labelling=PhaseLabelling(labeler=3))
    with pytest.raises(TypeError, match="`seed` must be a non-negative int or a torch.Generator"):
        ProbabilisticChunkMasker(budget=2, seed="0")
    with pytest.raises(TypeError, match="`scoring` must be a chunkmask.PhaseScoring, got dict"):
        ProbabilisticChunkMasker(budget=2, scoring={"p_min": 0.2})
    with pytest.raises(TypeError, match="`labelling` must be a chunkmask.PhaseLabelling, got str"):
        ProbabilisticChunkMasker(budget=2, labelling="gripper")
    with pytest.raises(ValueError, match="`close`"):
        ProbabilisticChunkMasker(budget=2, labelling=PhaseLabelling(close="sideways"))
    masker = ProbabilisticChunkMasker(budget=2)
    with pytest.raises(ValueError, match="`gripper` or `actions`"):
        masker.label()
    with pytest.raises(ValueError, match="`actions` must have 4 dimensions"):
        run(masker, actions=torch.zeros(2, 3, 4), success=torch.ones(2, dtype=torch.bool), group=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`valid` must have shape \(2, 3\)"):
        run(masker, actions=torch.zeros(2, 3, 4, 2), success=torch.ones(2, dtype=torch.bool),
                      group=torch.zeros(2, dtype=torch.long), valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="missing keys"):
        masker.load_state_dict({"budget": 2})
    other = ProbabilisticChunkMasker(budget=2, num_phases=3).state_dict()
    with pytest.raises(ValueError, match=r"`state\['num_phases'\]`.*5, got 3"):
        masker.load_state_dict(other)
    with pytest.raises(TypeError, match="`state` must be a dict"):
        masker.load_state_dict([1])


# ----------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("global_rng", [False, True])
def test_select_makes_no_host_sync_when_asked(global_rng):
    batch = rollouts()
    kwargs = {"seed": 0} if not global_rng else {}
    masker = ProbabilisticChunkMasker(
        budget=5, scoring=PhaseScoring(refresh_every=2), validate_args=False,
        global_rng=global_rng, **kwargs
    )
    with _SyncRecorder() as rec:
        for _ in range(3):  # initialise, hold, refresh
            run(masker, **batch, num_groups=3)
    assert rec.ops == []
    # The recorder does see the syncs of the other paths.
    with _SyncRecorder() as rec:
        run(masker, **batch)
    assert "_unique2" in " ".join(rec.ops)
    checked = ProbabilisticChunkMasker(budget=5, seed=0, validate_args=True)
    with _SyncRecorder() as rec:
        run(checked, **batch, num_groups=3)
    assert "_local_scalar_dense" in " ".join(rec.ops)


def test_select_compiles_fullgraph_and_matches_eager():
    # Note: dynamo captures `torch.unique` as a dynamic-shape op, so fullgraph compilation alone
    # does not prove the absence of syncs; the dispatch recorder above does.
    batch = rollouts()

    def go(compiled):
        torch._dynamo.reset()
        torch.manual_seed(3)
        masker = ProbabilisticChunkMasker(
            budget=5, scoring=PhaseScoring(refresh_every=2), validate_args=False, global_rng=True
        )

        def step(actions, success, group, valid):
            sel, info = run(
                masker, actions=actions, success=success, group=group, valid=valid, num_groups=3
            )
            return sel.indices, sel.mask, info.keep_probabilities, info.phases

        if compiled:
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        return [step(**batch) for _ in range(4)]

    eager, compiled = go(False), go(True)
    for a, b in zip(eager, compiled, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)


def test_compiled_update_does_not_recompile_per_step():
    """The buffer's step counters are tensors: steps 1..6 (init, hold, refresh) share one graph."""
    batch = rollouts()
    torch._dynamo.reset()
    masker = ProbabilisticChunkMasker(budget=5, scoring=PhaseScoring(refresh_every=2), seed=0)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    update = torch.compile(masker.update, fullgraph=True, backend=backend)
    eager = ProbabilisticChunkMasker(budget=5, scoring=PhaseScoring(refresh_every=2), seed=0)
    for _ in range(6):
        got = update(**batch, num_groups=3)
        want = eager.update(**batch, num_groups=3)
        torch.testing.assert_close(got.keep_probabilities, want.keep_probabilities)
    assert len(frames) == 1
    assert int(masker.buffer.num_updates) == 6


def test_draw_is_pure_and_update_advances_once():
    batch = rollouts(seed=5)
    masker = ProbabilisticChunkMasker(budget=4, seed=0, scoring=PhaseScoring(refresh_every=1))
    info = masker.update(**batch)
    state = masker.state_dict()["buffer"]
    keep = masker.keep_probabilities
    draws = [masker.draw(info.phases, valid=batch["valid"]) for _ in range(3)]
    after = masker.state_dict()["buffer"]
    for key, value in state.items():
        torch.testing.assert_close(after[key], value)
    torch.testing.assert_close(masker.keep_probabilities, keep)
    assert int(masker.buffer.num_updates) == 1
    assert any(not torch.equal(draws[0].indices, d.indices) for d in draws[1:])  # RNG advances
    # select is update then draw: it advances the buffer by exactly one step.
    twin = ProbabilisticChunkMasker(budget=4, seed=0, scoring=PhaseScoring(refresh_every=1))
    sel = twin.select(**batch)
    assert int(twin.buffer.num_updates) == 1
    assert torch.equal(sel.indices, draws[0].indices)


def test_num_groups_equals_unique_path():
    batch = rollouts()
    a = ProbabilisticChunkMasker(budget=5, seed=0)
    b = ProbabilisticChunkMasker(budget=5, seed=0)
    for _ in range(3):
        sa, ia = run(a, **batch)
        sb, ib = run(b, **batch, num_groups=3)
        assert torch.equal(sa.indices, sb.indices)
        torch.testing.assert_close(ia.scores, ib.scores)
    checked = ProbabilisticChunkMasker(budget=5, seed=0, validate_args=True)
    with pytest.raises(ValueError, match=r"`group` must hold ids in \[0, 2\) \(`num_groups`\)"):
        run(checked, **batch, num_groups=2)


# ----------------------------------------------------------------------------- argument errors


def test_phases_padding_is_pad_in_info():
    batch = rollouts()
    phases = torch.where(batch["valid"], 1, 77)  # caller's padding value is garbage
    _, info = run(ProbabilisticChunkMasker(budget=4, seed=0), **batch, phases=phases)
    assert (info.phases[~batch["valid"]] == int(Phase.PAD)).all()
    assert (info.phases[batch["valid"]] == 1).all()
    assert info.phases.dtype == torch.int64


def test_errors_name_the_argument_the_user_passed():
    batch = rollouts()
    actions = batch["actions"].clone()
    actions[0, 0, 0, 0] = float("nan")
    masker = ProbabilisticChunkMasker(budget=4, seed=0, validate_args=True)
    with pytest.raises(ValueError, match=r"`actions` must be finite"):
        run(masker, **{**batch, "actions": actions})
    with pytest.raises(ValueError, match=r"`phases` must have shape \(12, 16\) \(the first two sizes of `actions`\)"):
        run(masker, **batch, phases=torch.zeros(12, 15, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`close_threshold` must be finite, got nan"):
        ProbabilisticChunkMasker(budget=4, labelling=PhaseLabelling(close_threshold=float("nan")))
    with pytest.raises(ValueError, match=r"`close_threshold` must be given"):
        ProbabilisticChunkMasker(budget=4, labelling=PhaseLabelling(close="threshold"))
    for seed in (1.5, 2.0, True):
        with pytest.raises(TypeError, match=r"`seed` must be a non-negative int or a torch.Generator"):
            ProbabilisticChunkMasker(budget=4, seed=seed)
    with pytest.raises(ValueError, match=r"`seed` must be >= 0, got -1"):
        ProbabilisticChunkMasker(budget=4, seed=-1)
    with pytest.raises(TypeError, match=r"`inclusion` must be a bool"):
        ProbabilisticChunkMasker(budget=4, inclusion="yes")
    with pytest.raises(ValueError, match=r"`seed` must be None when `global_rng=True`"):
        ProbabilisticChunkMasker(budget=4, global_rng=True, seed=torch.Generator())
    with pytest.raises(TypeError, match=r"`process_group` must be a torch.distributed.ProcessGroup"):
        ProbabilisticChunkMasker(budget=4, scoring=PhaseScoring(process_group="world"))
    with pytest.raises(TypeError, match=r"`labeler\(gripper, valid\)` must have an int dtype"):
        run(ProbabilisticChunkMasker(budget=4, labelling=PhaseLabelling(labeler=lambda g, v: g)), **batch)


def test_load_state_dict_rejects_bad_states():
    batch = rollouts()
    masker = ProbabilisticChunkMasker(budget=4, seed=0)
    run(masker, **batch)
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
    from chunkmask.pcm import NUM_ONSET_PHASES, OnsetPhase, label_grasp_onset

    def labeler(gripper, valid):
        frac = chunkmask.gripper_close_fraction(gripper, valid, close="positive")
        return label_grasp_onset(frac, valid, lead=2)

    scored = (OnsetPhase.APPROACH, OnsetPhase.ONSET)
    masker = ProbabilisticChunkMasker(
        budget=4, num_phases=NUM_ONSET_PHASES, labelling=PhaseLabelling(labeler=labeler), seed=3,
        scoring=PhaseScoring(scored_phases=scored, refresh_every=2, window="weighted", min_groups=2),
    )
    buffer = chunkmask.pcm.PhaseScoreBuffer(NUM_ONSET_PHASES, refresh_every=2, window="weighted",
                                        min_groups=2)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        batch = rollouts(seed=step)
        sel, info = run(masker, **batch)
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
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(scored_phases=[5]))
    with pytest.raises(ValueError, match=r"`scored_phases` must hold at least one id"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(scored_phases=[]))
    with pytest.raises(ValueError, match="`scored_phases` must be >= 0, got -1"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(scored_phases=[0, -1]))
    with pytest.raises(TypeError, match="`scored_phases` must be a sequence of phase ids, got int"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(scored_phases=1))
    with pytest.raises(TypeError, match="`scored_phases` must be an int, got float"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(scored_phases=[1.0]))
    with pytest.raises(ValueError, match="`window` must be one of"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(window="mean"))
    with pytest.raises(ValueError, match=r"`min_groups` must lie in \[0.0, inf\)"):
        ProbabilisticChunkMasker(budget=2, scoring=PhaseScoring(min_groups=-2))


def test_readme_loop_runs_as_written():
    """The README's PCM loop is the API: every line runs verbatim on synthetic rollouts."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## PCM in a GRPO loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    batch = rollouts(seed=1)
    traj, n = batch["valid"].shape

    weight = torch.zeros((), requires_grad=True)

    class Policy:
        def log_prob(self, obs, tokens):
            return obs.sum(-1) * weight - tokens.float().mean(-1)

    namespace = {
        "rewards": batch["success"].float(), "group": batch["group"], "actions": batch["actions"],
        "valid": batch["valid"], "obs": torch.randn(traj, n, 3), "old_logp": torch.zeros(traj, n),
        "tokens": torch.zeros(traj, n, 6, dtype=torch.long), "policy": Policy(),
    }
    exec(code, namespace)  # noqa: S102
    sel = namespace["sel"]
    assert isinstance(sel, chunkmask.Selection)
    assert torch.equal(sel.counts, batch["valid"].sum(1).clamp_max(12))
    assert namespace["logp"].shape == (sel.num_selected(),)
    assert int(namespace["masker"].buffer.num_updates) == 1
    assert weight.grad is not None and torch.isfinite(weight.grad)  # the loss line ran backward


def test_advantage_aware_total_is_budget_per_trajectory_that_reaches_the_update():
    """B x (trajectories with A != 0 and a valid chunk), never B x the rolled-out ones.

    The old accounting spent sum_i min(B, T_i) over all 8 rollouts (32 chunks) on the 3 that
    reach the update; the right total is 4 x 3 = 12, with the short row's unused chunks passed on.
    """
    from chunkmask import ChunkBudget

    g = torch.Generator().manual_seed(4)
    actions = torch.randn(8, 20, 2, 3, generator=g)
    success = torch.tensor([True, False, True, True, True, False, False, False])
    group = torch.arange(8) // 2
    adv = torch.tensor([0.7, -0.7, 0.0, 0.0, 0.7, -0.7, 0.0, 0.0])
    valid = torch.ones(8, 20, dtype=torch.bool)
    valid[4, 2:] = False  # a short informative trajectory: 2 chunks
    valid[5] = False  # informative, but dropped (e.g. by a filter) before the update
    masker = ProbabilisticChunkMasker(budget=ChunkBudget(4, advantage_aware=True), seed=0)
    info = masker.update(actions=actions, success=success, group=group, valid=valid)
    sel = masker.draw(info.phases, valid=valid, advantages=adv)
    assert sel.counts.tolist() == [5, 5, 0, 0, 2, 0, 0, 0]
    assert int(sel.counts.sum()) == 4 * 3
    # Without A = 0 rows and with every row full length it is exactly the fixed budget.
    info = masker.update(actions=actions, success=success, group=group)
    sel = masker.draw(info.phases, advantages=adv.abs() + 1)
    assert sel.counts.tolist() == [4] * 8
