import json
import math

import pytest
import torch

pytest.importorskip("gymnasium")  # the `testbed` extra

from chunkmask.testbed.__main__ import main  # noqa: E402
from chunkmask.testbed.demo import STUDY_ARMS, STUDY_FINDING, DemoConfig  # noqa: E402
from chunkmask.testbed.env import PickPlaceConfig, PickPlaceVectorEnv, sample_initial_states  # noqa: E402
from chunkmask.testbed.expert import collect_demonstrations  # noqa: E402
from chunkmask.testbed.policy import TokenChunkPolicy, actions_to_tokens, tokens_to_actions  # noqa: E402
from chunkmask.testbed.rollout import rollout  # noqa: E402
from chunkmask.testbed.sft import behaviour_cloning  # noqa: E402
from chunkmask.testbed.trainer import TrainConfig, train  # noqa: E402

ENV = PickPlaceConfig(max_steps=32)  # 4 chunks of 8 steps


def _policy(seed=0):
    torch.manual_seed(seed)
    env = PickPlaceVectorEnv(1, ENV)
    return TokenChunkPolicy(env.layout, num_tasks=1, d_model=16, depth=1, heads=2)


def _cfg(selector, **kw):
    base = dict(
        selector=selector,
        steps=2,
        prompts_per_step=2,
        group_size=3,
        budget=2,
        eval_episodes=2,
        mini_batch=3,
        lr=1e-3,
        eval_every=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_tokens_round_trip():
    a = torch.linspace(-1, 1, 256)
    assert torch.equal(actions_to_tokens(tokens_to_actions(torch.arange(256))), torch.arange(256))
    assert (tokens_to_actions(actions_to_tokens(a)) - a).abs().max() < 1e-5


def test_rollout_records_valid_chunks_and_logp():
    policy = _policy()
    env = PickPlaceVectorEnv(4, ENV)
    states = sample_initial_states(2, config=ENV, generator=torch.Generator().manual_seed(0))
    batch = rollout(policy, env, states.repeat_interleave(2), generator=torch.Generator())
    assert batch.tokens.shape == (4, 4, 40) and batch.actions.shape == (4, 4, 8, 5)
    assert bool(batch.valid[:, 0].all())
    # Recorded behaviour log-probs match the policy's log-probs of the tokens.
    logp, _ = policy.log_prob(batch.obs[batch.valid], batch.tokens[batch.valid])
    torch.testing.assert_close(logp, batch.logp[batch.valid], atol=1e-4, rtol=1e-4)
    again = rollout(
        policy, env, states.repeat_interleave(2), generator=torch.Generator().manual_seed(3)
    )
    assert not torch.equal(again.tokens, batch.tokens)


def test_sft_reduces_loss():
    demos = collect_demonstrations(4, seed=0, config=ENV, successful_only=False)
    policy = _policy()
    losses = behaviour_cloning(policy, demos, steps=15, batch_size=32, lr=3e-3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("selector", "steps"),
    [
        ("full", 2),
        ("pcm", 2),
        ("random", 1),
        ("top_phase", 1),
        ("entropy_topk", 1),
        ("pods", 1),
        ("token_entropy", 1),
        ("neyman", 1),
    ],
)
def test_rl_steps_run_with_finite_losses(selector, steps, tmp_path):
    policy = _policy()
    log = tmp_path / "log.jsonl"
    result = train(policy, _cfg(selector, steps=steps), env_config=ENV, log_path=log)
    assert len(result.records) == steps
    for r in result.records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert 0.0 <= r["eval_success"] <= 1.0
        assert len(r["selected_per_phase"]) == 5 and len(r["V_c"]) == 5
        # The per-phase allocation (from the masker's PhaseUpdate) accounts for every chunk.
        n = r["num_traj"]
        assert sum(r["selected_per_phase"]) * n == pytest.approx(r["chunks_updated"])
        assert sum(r["available_per_phase"]) * n == pytest.approx(r["chunks_executed"])
        assert (r["keep_probabilities"] is None) == (selector != "pcm")
        if selector in ("full", "token_entropy"):
            assert r["chunks_updated"] == r["chunks_executed"]
        elif selector == "pods":  # 2 of each group's 3 rollouts, all their chunks
            assert 0 < r["chunks_updated"] < r["chunks_executed"]
        else:
            assert r["chunks_updated"] <= 2 * 6
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(steps))
    if selector == "pcm":
        assert len(lines[0]["keep_probabilities"]) == 5
        assert result.masker_state is not None


def test_pcm_sends_fewer_chunks_into_the_forward_pass():
    def counted(selector):
        policy = _policy()
        seen = []

        def hook(module, args, output):
            if torch.is_grad_enabled():  # the actor update, not the no-grad rollouts
                seen.append(args[0].shape[0])

        policy.register_forward_hook(hook)
        records = train(policy, _cfg(selector, steps=1), env_config=ENV).records
        return sum(seen), records[0]

    full, full_rec = counted("full")
    pcm, pcm_rec = counted("pcm")
    assert full == full_rec["chunks_executed"] == full_rec["chunks_updated"]
    assert pcm == pcm_rec["chunks_updated"] <= 2 * 6 < full


def test_resume_continues_steps(tmp_path):
    policy = _policy()
    first = train(policy, _cfg("pcm", steps=1), env_config=ENV)
    second = train(
        policy,
        _cfg("pcm", steps=2),
        env_config=ENV,
        start_step=1,
        optimizer_state=first.optimizer_state,
        masker_state=first.masker_state,
    )
    assert [r["step"] for r in second.records] == [1]


@pytest.mark.parametrize(
    ("selector", "estimator"), [("pcm", "masked"), ("neyman", "horvitz_thompson"), ("full", "masked")]
)
def test_a_run_in_one_step_segments_equals_one_run(selector, estimator):
    """What the interleaved study relies on: resuming step by step changes nothing."""
    kw = dict(steps=3, refresh_every=1, estimator=estimator, eval_every=10)
    whole = _policy()
    one = train(whole, _cfg(selector, **kw), env_config=ENV).records
    parts, records, opt, masker = _policy(), [], None, None
    for step in range(3):
        res = train(parts, _cfg(selector, **{**kw, "steps": step + 1}), env_config=ENV,
                    start_step=step, optimizer_state=opt, masker_state=masker)
        records += res.records
        opt, masker = res.optimizer_state, res.masker_state
    for a, b in zip(whole.state_dict().values(), parts.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ra, rb in zip(one, records, strict=True):
        for key in ("loss", "chunks_updated", "V_c", "selected_per_phase"):
            assert ra[key] == rb[key], key
    if selector == "pcm":  # the draws continue the carried generator, not a fresh one
        fresh = train(_policy(), _cfg(selector, **{**kw, "steps": 1}), env_config=ENV)
        assert not torch.equal(fresh.masker_state["generator"], masker["generator"])


def test_neyman_arm_selects_budget_chunks_with_exact_inclusion():
    records = train(
        _policy(), _cfg("neyman", steps=1, estimator="horvitz_thompson"), env_config=ENV
    ).records
    assert math.isfinite(records[0]["loss"])
    assert 0 < records[0]["chunks_updated"] <= 2 * 6  # B = 2 of each of 6 trajectories


def test_horvitz_thompson_estimator_runs():
    for selector in ("pcm", "full"):
        records = train(
            _policy(), _cfg(selector, steps=1, estimator="horvitz_thompson"), env_config=ENV
        ).records
        assert math.isfinite(records[0]["loss"])
    with pytest.raises(ValueError, match="horvitz_thompson"):
        train(_policy(), _cfg("random", estimator="horvitz_thompson"), env_config=ENV)


def test_main_job_quick_writes_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["--out", str(tmp_path), "--quick", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"] == list(STUDY_ARMS) == ["grpo", "pcm", "pps_ht"]
    for key in ("speedup_to_threshold", "threshold"):
        assert key in summary
    for name in summary["runs"]:
        for key in ("final_success", "time_to_threshold_s", "update_share"):
            assert key in summary[name]
        assert (tmp_path / f"{name}.jsonl").stat().st_size > 0
    for key in ("speedup_to_threshold", "step_speedup", "final_success_gap_pp"):
        assert key in summary["pcm"] and key in summary["pps_ht"]
    assert summary["step_speedup"] == summary["pcm"]["step_speedup"]
    # the summary says in one line what the project's study found
    assert summary["study_finding"] == STUDY_FINDING
    printed = capsys.readouterr().out
    assert f"study found: {STUDY_FINDING}" in printed
    assert sum("study found" in line for line in printed.splitlines()) == 1


def test_main_job_quick_v2_regime_and_arm_subset(tmp_path):
    pytest.importorskip("matplotlib")
    argv = ["--out", str(tmp_path), "--quick", "--no-progress", "--regime", "v2", "--arms", "pcm"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"] == ["grpo", "pcm"] and "pcm_ht" not in summary
    assert not (tmp_path / "pcm_ht.jsonl").exists()
    for name in ("success_vs_step", "success_vs_wallclock", "phase_allocation", "captured_v"):
        assert (tmp_path / f"testbed_{name}.png").stat().st_size > 0


def test_main_job_rejects_unknown_arm(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--quick", "--arms", "pcm,nope"])
    assert "--arms: unknown ['nope']" in capsys.readouterr().err


def test_study_regime_is_the_v3_study_regime():
    """`DemoConfig.study` (the main job) and the study's own configuration agree."""
    import importlib
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        study = importlib.import_module("evidence_v3").study_config(0)
    finally:
        _sys.path.pop(0)
    demo = DemoConfig.study()
    for field in ("demos", "expert_noise", "sft_steps", "d_model", "depth", "max_steps", "speed",
                  "num_objects", "distraction"):
        assert getattr(demo, field) == getattr(study, field), field
    for field in ("prompts_per_step", "group_size", "mini_batch", "prompt_pool", "lr",
                  "dynamic_sampling", "temperature", "clip_low", "clip_high", "loss_agg_mode"):
        assert getattr(demo.train, field) == getattr(study.train, field), field
    assert demo.train.budget == 5  # the study's ~19% arms


@pytest.mark.parametrize(
    ("arms", "match"),
    [
        ({"pcm": {"selector": "pcm"}}, r"`arms` must be a dict of runs that includes 'grpo'"),
        ({"grpo": {}, "x": {"selectr": "pcm"}}, r"`arms\['x'\]` must be .* \(unknown: \['selectr'\]\)"),
        ({"grpo": {}, "x": "pcm"}, r"`arms\['x'\]` must be a dict of TrainConfig fields, got 'pcm'"),
        ({"grpo": {}, "x": {"selector": "nope"}}, r"`selector` must be one of"),
    ],
)
def test_demo_config_rejects_bad_arms(arms, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(arms=arms)


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("selector", "nope", ValueError, r"`selector` must be one of .*'nope'"),
        ("estimator", "exact", ValueError, r"`estimator` must be one of .*'exact'"),
        ("budget", 0, ValueError, r"`budget` must be > 0, got 0"),
        ("steps", 2.0, TypeError, r"`steps` must be an int, got float"),
        ("group_size", -1, ValueError, r"`group_size` must be > 0, got -1"),
        ("mini_batch", 0, ValueError, r"`mini_batch` must be > 0, got 0"),
        ("seed", -1, ValueError, r"`seed` must be >= 0, got -1"),
        ("lr", 0.0, ValueError, r"`lr` must lie in \(0.0, inf\), got 0.0"),
        ("temperature", -1.0, ValueError, r"`temperature` must lie in \(0.0, inf\), got -1.0"),
        ("entropy_coef", -0.1, ValueError, r"`entropy_coef` must lie in \[0.0, inf\), got -0.1"),
        ("clip_low", 1.0, ValueError, r"`clip_low` must lie in \[0.0, 1.0\), got 1.0"),
        ("p_min", 1.5, ValueError, r"`p_min` must lie in \[0.0, 1.0\], got 1.5"),
        ("grad_clip", float("nan"), ValueError, r"`grad_clip` must be finite, got nan"),
        ("pods_keep", 0, ValueError, r"`pods_keep` must be > 0, got 0"),
        ("token_fraction", 0.0, ValueError, r"`token_fraction` must lie in \(0.0, 1.0\], got 0.0"),
        ("token_fraction", 1.5, ValueError, r"`token_fraction` must lie in \(0.0, 1.0\], got 1.5"),
        ("phase_rule", "time", ValueError, r"`phase_rule` must be one of .*'time'"),
        ("score_window", "mean", ValueError, r"`score_window` must be one of .*'mean'"),
        ("min_groups", -1.0, ValueError, r"`min_groups` must lie in \[0.0, inf\), got -1.0"),
        ("score_until_onset", 1, TypeError, r"`score_until_onset` must be a bool"),
        ("score_until_onset", True, ValueError, r"`score_until_onset` needs `phase_rule='onset'`"),
    ],
)
def test_train_config_bad_field_names_it(field, value, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**{field: value})
    cfg = TrainConfig()
    setattr(cfg, field, value)  # mutated after construction: train() checks again
    with pytest.raises(error, match=match):
        train(_policy(), cfg, env_config=ENV)


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("demos", 0, ValueError, r"`demos` must be > 0, got 0"),
        ("sft_steps", 1.5, TypeError, r"`sft_steps` must be an int, got float"),
        ("expert_noise", -0.1, ValueError, r"`expert_noise` must lie in \[0.0, inf\), got -0.1"),
        ("sft_smoothing", -1.0, ValueError, r"`sft_smoothing` must lie in \[0.0, inf\), got -1.0"),
        ("threshold_frac", 0.0, ValueError, r"`threshold_frac` must lie in \(0.0, 1.0\], got 0.0"),
        ("train", {"steps": 2}, TypeError, r"`train` must be a TrainConfig, got dict"),
        ("num_objects", 0, ValueError, r"`num_objects` must be > 0, got 0"),
        ("distraction", 1.5, ValueError, r"`distraction` must lie in \[0.0, 1.0\], got 1.5"),
        ("speed", 0.0, ValueError, r"`speed` must lie in \(0.0, inf\), got 0.0"),
    ],
)
def test_demo_config_bad_field_names_it(field, value, error, match):

    with pytest.raises(error, match=match):
        DemoConfig(**{field: value})


def test_sft_expert_and_policy_bad_arguments_name_them():
    from chunkmask.testbed.expert import ScriptedExpert

    demos = collect_demonstrations(1, seed=0, config=ENV, successful_only=False)
    policy = _policy()
    with pytest.raises(ValueError, match=r"`smoothing` must lie in \[0.0, inf\), got -1.0"):
        behaviour_cloning(policy, demos, steps=1, smoothing=-1.0)
    with pytest.raises(ValueError, match=r"`steps` must be > 0, got 0"):
        behaviour_cloning(policy, demos, steps=0)
    with pytest.raises(ValueError, match=r"`lr` must lie in \(0.0, inf\), got 0.0"):
        behaviour_cloning(policy, demos, steps=1, lr=0.0)
    empty = demos._replace(obs=demos.obs[:0], actions=demos.actions[:0])
    with pytest.raises(ValueError, match="`demos` must hold at least one chunk, got 0"):
        behaviour_cloning(policy, empty, steps=1)
    with pytest.raises(ValueError, match=r"`noise` must lie in \[0.0, inf\), got -0.2"):
        collect_demonstrations(1, noise=-0.2, config=ENV)
    with pytest.raises(ValueError, match="`num_episodes` must be > 0, got 0"):
        collect_demonstrations(0, config=ENV)
    with pytest.raises(ValueError, match=r"`distraction` must lie in \[0.0, 1.0\], got -0.5"):
        collect_demonstrations(1, config=ENV, distraction=-0.5)
    with pytest.raises(ValueError, match=r"`grip_flip` must lie in \[0.0, 1.0\], got 2.0"):
        ScriptedExpert(1, ENV, grip_flip=2.0)
    with pytest.raises(ValueError, match="`num_envs` must be > 0, got 0"):
        ScriptedExpert(0, ENV)
    env = PickPlaceVectorEnv(1, ENV)
    with pytest.raises(ValueError, match=r"`d_model` must be divisible by `heads`=3, got 16"):
        TokenChunkPolicy(env.layout, num_tasks=1, d_model=16, depth=1, heads=3)
    with pytest.raises(ValueError, match="`horizon` must be > 0, got 0"):
        TokenChunkPolicy(env.layout, num_tasks=1, horizon=0, d_model=16, depth=1, heads=2)
    obs = torch.zeros(2, env.layout.dim)
    with pytest.raises(ValueError, match=r"`temperature` must lie in \(0.0, inf\), got 0.0"):
        policy.sample(obs, temperature=0.0)
    with pytest.raises(ValueError, match=r"`temperature` must lie in \(0.0, inf\), got -1.0"):
        policy.log_prob(obs, torch.zeros(2, 40, dtype=torch.long), temperature=-1.0)


def _designed_batch():
    """A real rollout batch whose outcomes are then set: group 0 all succeed, group 1 is mixed."""
    from chunkmask.testbed.trainer import held_out_states

    policy = _policy()
    env = PickPlaceVectorEnv(6, ENV)
    batch = rollout(policy, env, held_out_states(2, ENV).repeat_interleave(3),
                    generator=torch.Generator().manual_seed(0))
    batch = batch._replace(
        success=torch.tensor([True, True, True, True, False, False]),
        valid=torch.ones_like(batch.valid),
    )
    return policy, batch, torch.tensor([0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize(
    ("selector", "aa", "want"),
    [
        ("full", False, [0, 0, 0, 4, 4, 4]),  # dynamic sampling drops group 0
        ("pcm", False, [0, 0, 0, 2, 2, 2]),
        ("random", False, [0, 0, 0, 2, 2, 2]),
        # B per trajectory that reaches the update: the dropped rows' chunks are not moved.
        ("pcm", True, [0, 0, 0, 2, 2, 2]),
        ("random", True, [0, 0, 0, 2, 2, 2]),
    ],
)
def test_dynamic_sampling_and_advantage_aware_budgets(selector, aa, want):
    from chunkmask.testbed.trainer import make_masker, update

    policy, batch, group = _designed_batch()
    cfg = _cfg(selector, dynamic_sampling=True, advantage_aware=aa, mini_batch=6)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    out = update(policy, optimizer, batch, group, cfg, masker=make_masker(cfg),
                 generator=torch.Generator().manual_seed(1))
    assert out["selection"].counts.tolist() == want
    assert out["chunks"] == sum(want)
    assert math.isfinite(out["loss"])


def test_advantage_aware_needs_a_budgeted_selector():
    with pytest.raises(ValueError, match=r"`advantage_aware` applies to selector 'pcm' or 'random'"):
        TrainConfig(selector="full", advantage_aware=True)
    with pytest.raises(TypeError, match=r"`dynamic_sampling` must be a bool"):
        TrainConfig(dynamic_sampling=1)


def _captured_update(monkeypatch, cfg, batch, group, policy):
    """Run one `update`, recording what reaches `masked_grpo_loss`."""
    from chunkmask.testbed import trainer

    seen = {}
    real = trainer.masked_grpo_loss

    def spy(logp, *, old_logp, advantages, selection=None, mask=None, **kw):
        entropy = kw["regularizers"].entropy.detach()
        seen.update(logp=logp.detach(), adv=advantages, mask=mask, entropy=entropy)
        return real(logp, old_logp=old_logp, advantages=advantages, selection=selection,
                    mask=mask, **kw)

    monkeypatch.setattr(trainer, "masked_grpo_loss", spy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    out = trainer.update(policy, optimizer, batch, group, cfg, masker=trainer.make_masker(cfg),
                         generator=torch.Generator().manual_seed(1))
    return out, seen


def test_pods_updates_the_most_diverse_rollouts_with_their_own_advantages(monkeypatch):
    policy, batch, group = _designed_batch()  # group 0: 3 successes; group 1: 1 of 3
    out, seen = _captured_update(
        monkeypatch, _cfg("pods", pods_keep=2, mini_batch=6), batch, group, policy
    )
    # Two rollouts per group; group 1 (rewards 1, 0, 0) keeps its success and one failure, so the
    # advantages recomputed on the kept pair are +-1/std({1, 0}) = +-0.7071; group 0 has none.
    counts = out["selection"].counts
    assert counts.tolist()[:3].count(4) == 2 and counts.tolist()[3:].count(4) == 2
    assert counts[3] == 4  # the success
    kept = counts > 0
    assert bool((batch.success[3:][kept[3:]]).any()) and bool((~batch.success[3:][kept[3:]]).any())
    want = torch.tensor([0.0, 0.0, 0.70710678, -0.70710678]).repeat_interleave(4)
    torch.testing.assert_close(seen["adv"].float().reshape(-1), want, atol=1e-5, rtol=0)
    assert seen["mask"] is None
    # With dynamic sampling the all-success group is dropped too.
    out, _ = _captured_update(
        monkeypatch, _cfg("pods", pods_keep=2, mini_batch=6, dynamic_sampling=True),
        batch, group, policy,
    )
    assert out["selection"].counts.tolist()[:3] == [0, 0, 0]
    assert out["selection"].counts.tolist()[3:] == counts.tolist()[3:]


def test_token_entropy_keeps_the_highest_entropy_fifth_of_tokens(monkeypatch):
    policy, batch, group = _designed_batch()
    out, seen = _captured_update(
        monkeypatch, _cfg("token_entropy", mini_batch=6), batch, group, policy
    )
    mask, logp = seen["mask"], seen["logp"]
    assert out["chunks"] == 24 and mask.shape == logp.shape == (24, 40)
    assert int(mask.sum()) == 192  # a fifth of 24 x 40
    # Every kept token is at least as uncertain as every dropped one (the loss's own entropies).
    entropy = seen["entropy"]
    assert entropy[mask].min() >= entropy[~mask].max()
    assert out["selection"].counts.tolist() == [4] * 6


def test_cause_scored_pcm_runs_and_floors_the_phases_after_the_onset(monkeypatch):
    cfg = _cfg("pcm", phase_rule="onset", score_until_onset=True, score_window="weighted",
               min_groups=1.0, mini_batch=6)
    policy, batch, group = _designed_batch()  # group 1 has mixed outcomes: V_c is defined
    out, _ = _captured_update(monkeypatch, cfg, batch, group, policy)
    info = out["info"]
    assert info.keep_probabilities.shape == (4,)  # approach, onset, hold, after
    assert bool(info.defined[:2].any())
    assert info.keep_probabilities[2:].tolist() == pytest.approx([cfg.p_min, cfg.p_min])
    assert math.isfinite(out["loss"]) and out["chunks"] == int(out["selection"].counts.sum())
    # The whole loop runs with it, and logs four phases.
    records = train(_policy(), _cfg("pcm", steps=1, phase_rule="onset", score_until_onset=True),
                    env_config=ENV).records
    assert len(records[0]["keep_probabilities"]) == len(records[0]["V_c"]) == 4


def _mixed_outcomes(monkeypatch):
    """Every third rollout succeeds: a tiny random policy never does, so set the outcomes."""
    from chunkmask.testbed import trainer

    real = trainer.rollout

    def mixed(*args, **kw):
        batch = real(*args, **kw)
        return batch._replace(success=torch.arange(batch.success.shape[0]) % 3 == 0)

    monkeypatch.setattr(trainer, "rollout", mixed)


@pytest.mark.parametrize(
    ("selector", "extra"),
    [
        ("pcm", {}),
        ("pcm", {"estimator": "horvitz_thompson"}),
        ("pcm", {"advantage_aware": True}),
        ("random", {"mini_batch": 6}),  # one mini-batch: the shuffle draws no longer matter
    ],
)
def test_budget_at_least_the_chunk_count_is_full_grpo_bit_for_bit(selector, extra, monkeypatch):
    """The regression test of the evidence study: with B >= N every chunk is kept, and the
    trainer must then be exactly GRPO (same parameters after several steps, bit for bit)."""
    _mixed_outcomes(monkeypatch)
    kw = dict(steps=3, dynamic_sampling=True, eval_every=10, **extra)
    full_kw = {k: v for k, v in kw.items() if k != "advantage_aware"}
    start = _policy()
    full = _policy()
    full_records = train(full, _cfg("full", **full_kw), env_config=ENV).records
    masked = _policy()
    records = train(masked, _cfg(selector, budget=4, **kw), env_config=ENV).records  # N = 4
    for r, f in zip(records, full_records, strict=True):
        assert r["chunks_updated"] == f["chunks_updated"] == r["chunks_executed"] > 0
    for (name, a), b in zip(full.named_parameters(), masked.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in
               zip(full.parameters(), start.parameters(), strict=True))


def test_online_probe_logs_the_cosine_and_changes_nothing(monkeypatch):
    _mixed_outcomes(monkeypatch)
    # B >= N: the masked gradient is the full one, cosine 1; logged every second step only.
    records = train(_policy(), _cfg("pcm", budget=4, steps=3, probe_every=2, eval_every=10),
                    env_config=ENV).records
    assert [("probe_cosine" in r) for r in records] == [True, False, True]
    assert records[0]["probe_cosine"] == pytest.approx(1.0, abs=1e-6)
    # One chunk of four: a different direction; the probe does not change the training itself.
    probed, plain = _policy(), _policy()
    rec = train(probed, _cfg("random", budget=1, steps=2, probe_every=1, eval_every=10),
                env_config=ENV).records
    train(plain, _cfg("random", budget=1, steps=2, eval_every=10), env_config=ENV)
    assert all(-1.0 <= r["probe_cosine"] < 0.99 for r in rec)
    for a, b in zip(probed.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="`probe_every` must be >= 0, got -1"):
        TrainConfig(probe_every=-1)


def test_pps_selector_is_unbiased_and_equals_full_grpo_when_it_draws_everything(monkeypatch):
    _mixed_outcomes(monkeypatch)
    kw = dict(steps=2, eval_every=10, mini_batch=6)
    full = _policy()
    train(full, _cfg("full", **kw), env_config=ENV)
    pps = _policy()
    records = train(pps, _cfg("pps", budget=4, estimator="horvitz_thompson", **kw),
                    env_config=ENV).records  # K = 4 x 6 >= every chunk: pi = 1 where A != 0
    assert all(r["chunks_updated"] == r["chunks_executed"] for r in records)
    for a, b in zip(full.parameters(), pps.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # A small budget draws about B chunks per trajectory over the batch, none where A = 0.
    rec = train(_policy(), _cfg("pps", budget=1, estimator="horvitz_thompson", **kw),
                env_config=ENV).records
    assert all(r["chunks_updated"] == 6 for r in rec)  # exactly K = 1 x 6


def test_distracted_demonstrations_put_the_wrong_object_in_the_bin():
    """With distraction 1 every episode places the other object: no episode succeeds, yet the
    demonstrator's own object ends in the bin, so the episodes count as demonstrations."""
    cfg = PickPlaceConfig(num_objects=2)
    clean = collect_demonstrations(16, config=cfg, seed=4, noise=0.0)
    assert float(clean.success.float().mean()) == 1.0
    wrong = collect_demonstrations(16, config=cfg, seed=4, noise=0.0, distraction=1.0,
                                   successful_only=False)
    assert not bool(wrong.success.any())
    kept = collect_demonstrations(16, config=cfg, seed=4, noise=0.0, distraction=1.0)
    assert kept.obs.shape[0] > 0.8 * wrong.obs.shape[0]  # nearly every own placement succeeded
    half = collect_demonstrations(64, config=cfg, seed=4, noise=0.0, distraction=0.5,
                                  successful_only=False)
    assert 0.3 < float(half.success.float().mean()) < 0.7


def test_prompt_pool_fixes_the_task_states():
    from chunkmask.testbed.trainer import prompt_pool_states

    cfg = _cfg("full", steps=2, prompt_pool=3, prompts_per_step=2, seed=5)
    pool = prompt_pool_states(cfg, ENV)
    assert pool.num == 3
    again = prompt_pool_states(cfg, ENV)
    assert all(torch.equal(a, b) for a, b in zip(pool, again, strict=True))  # seeded
    other = prompt_pool_states(_cfg("full", prompt_pool=3, prompts_per_step=2, seed=6), ENV)
    assert not torch.equal(pool.obj_pos, other.obj_pos)
    # every step's prompts are distinct states of the pool
    from chunkmask.testbed.trainer import _step_prompts

    for step in range(4):
        prompts = _step_prompts(cfg, step, ENV, pool)
        rows = [int((pool.obj_pos == p).all(-1).all(-1).nonzero()[0]) for p in prompts.obj_pos]
        assert len(set(rows)) == 2
    records = train(_policy(), cfg, env_config=ENV).records
    assert [r["step"] for r in records] == [0, 1]
    with pytest.raises(ValueError, match=r"`prompt_pool` must be > 0, got 0"):
        prompt_pool_states(_cfg("full"), ENV)  # a run without a pool has no pool states
    with pytest.raises(ValueError, match=r"`prompt_pool` must be 0 or at least `prompts_per_step`=2, got 1"):
        train(_policy(), _cfg("full", prompt_pool=1, prompts_per_step=2), env_config=ENV)


def test_main_job_agrees_with_the_study_report():
    """`STUDY_ARMS`' third arm is the report's `main_job_variant` (same rule, same budget), and
    every number in `STUDY_FINDING` is the report's, rounded as printed."""
    import importlib
    import sys as _sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    report = json.loads((root / "docs" / "reproduction.json").read_text())
    _sys.path.insert(0, str(root / "benchmarks"))
    try:
        study = importlib.import_module("evidence_v3")
    finally:
        _sys.path.pop(0)
    variant = report["main_job_variant"]
    name = list(STUDY_ARMS)[2]
    assert variant == f"{name}_19"
    arm = dict(study.ARMS[variant])
    budget = arm.pop("budget", None)
    assert STUDY_ARMS[name] == arm and budget == DemoConfig.study().train.budget
    assert list(STUDY_ARMS)[:2] == ["grpo", "pcm"] and STUDY_ARMS["pcm"] == {"selector": "pcm"}
    arms, explore = report["arms"], report["exploratory"]["matched_time"]
    assert report["n"] == 20 and f"{report['n']} paired seeds" in STUDY_FINDING
    assert not any(arms[a]["equivalent_holm"] for a in study.MASKED)
    assert "no masked arm is equivalent" in STUDY_FINDING
    for number in (
        f"+{arms['grpo']['gain_vs_sft_pp']:.1f} pp",
        f"{-arms['pcm_19']['diff_vs_grpo_pp']:.1f} pp below",
        f"{-arms[variant]['diff_vs_grpo_pp']:.1f} pp below",
        "[{:.1f}, {:.1f}]".format(*arms[variant]["diff_ci95_pp"]),
        f"{explore[variant]['diff_pp']:.1f} pp [{explore[variant]['diff_ci95_pp'][0]:.1f}, "
        f"{explore[variant]['diff_ci95_pp'][1]:+.1f}]",
        f"PCM {explore['pcm_19']['diff_pp']:.1f} pp",
    ):
        assert number in STUDY_FINDING, number
