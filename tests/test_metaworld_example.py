"""End-to-end `--quick` run of examples/metaworld_chunked_ppo.py (skipped without the extra)."""

import importlib.util
import json
from pathlib import Path

import pytest

for _module in ("metaworld", "gymnasium", "matplotlib", "tqdm"):  # the `metaworld` extra
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load(ROOT / "examples" / "metaworld_chunked_ppo.py")
study = _load(ROOT / "benchmarks" / "chunked_ppo_study.py")


def test_quick_run_all_variants(tmp_path, monkeypatch):
    real = ex.run_episodes

    def with_a_success(env, policy, cfg, num, *, deterministic, gen=None):
        # The 2-second SFT of --quick never succeeds; mark the first training episode of each
        # rollout successful so that the buffer, the BC loss and the weight rule all run.
        out = real(env, policy, cfg, num, deterministic=deterministic, gen=gen)
        if not deterministic:
            out["success"][0] = True
        return out

    monkeypatch.setattr(ex, "run_episodes", with_a_success)
    results = ex.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    run_dir = tmp_path / "pick-place-v3" / "seed0"
    assert (run_dir / "sft.pt").exists() and (run_dir / "curves.png").stat().st_size > 0
    for variant in ex.VARIANTS:
        saved = json.loads((run_dir / f"{variant}.json").read_text())
        assert saved["variant"] == variant
        assert 0.0 <= saved["final"]["success"] <= 1.0
        assert len(saved["history"]) == 2 and saved["wall_clock_s"] > 0
        assert saved["update_s"] > 0 and saved["rollout_s"] > 0
    hist = results["ppo_sbc"]["history"]
    assert hist[-1]["buffer"] >= 1 and hist[-1]["bc_gn"] > 0
    pcm = results["ppo_sbc_pcm"]["history"]
    assert all(h["chunks_updated"] <= h["chunks"] for h in pcm)
    assert all(h["chunks_updated"] <= 2 * 2 for h in pcm)  # budget 2 x 2 episodes
    # resumable: a second call reuses the SFT checkpoint and the finished variants
    again = ex.run_task_seed(ex.quick_config(ex.Config()), ["ppo"], run_dir, progress=False)
    for key in ("success", "per_episode_success", "per_episode_steps"):
        assert again["ppo"]["final"][key] == results["ppo"]["final"][key]
    assert again["sft"]["per_episode_steps"] == results["sft"]["per_episode_steps"]
    # The study driver aggregates exactly what the example wrote.
    docs = tmp_path / "docs"
    study.main(["--aggregate", "--results", str(tmp_path), "--docs", str(docs),
                "--summary", str(docs / "chunked_ppo.json"), "--tasks", "pick-place-v3"])
    summary = json.loads((docs / "chunked_ppo.json").read_text())["tasks"]["pick-place-v3"]
    assert list(summary) == ["sft", *ex.VARIANTS]
    assert summary["ppo"]["success"] == results["ppo"]["final"]["success"]


def test_expert_lookup_and_bad_variant():
    assert type(ex.expert_policy("pick-place-v3")).__name__ == "SawyerPickPlaceV3Policy"
    with pytest.raises(ValueError, match="`task` has no scripted expert"):
        ex.expert_policy("no-such-task-v3")
    with pytest.raises(ValueError, match="`variant` must be one of"):
        ex.post_train(None, "grpo", ex.Config(), None, None, None, {})
    with pytest.raises(ValueError, match="`bc_weight` must be one of"):
        ex.make_bc_weight(ex.Config(bc_weight="x"))


# --------------------------------------------------------------------------------------------
# Demonstrations, variants and weight rules


def test_demos_get_the_expert_horizon_not_the_episode_cap():
    # drawer-close-v3's expert needs more than the quick run's 60 steps: the demos are collected
    # with MetaWorld's own horizon, and a too-short cap fails with a message that says so.
    env = ex.make_env("drawer-close-v3", 2000, ex.EXPERT_HORIZON)
    demos = ex.collect_demos(env, "drawer-close-v3", 1)
    assert len(demos) == 1 and len(demos[0]["actions"]) > 60
    with pytest.raises(RuntimeError, match=r"succeeded in 0 of 2 tries within 60 steps"):
        ex.collect_demos(env, "drawer-close-v3", 1, 60, max_tries=2)
    with pytest.raises(ValueError, match="`num` must be a positive int"):
        ex.collect_demos(env, "drawer-close-v3", 0)


def test_quick_run_on_drawer_close():
    results = ex.main(["--quick", "--task", "drawer-close-v3", "--variants", "ppo", "--no-progress"])
    assert results["sft"]["demo_steps"][0] > 60
    hist = results["ppo"]["history"]
    assert results["ppo"]["env_steps"] == hist[-1]["env_steps"] > hist[0]["env_steps"] > 0


def test_variant_names_and_weight_rules():
    assert ex.split_variant("ppo_sbc") == ("ppo_sbc", None)
    assert ex.split_variant("ppo_sbc_pcm+product") == ("ppo_sbc_pcm", "product")
    assert ex.split_variant("ppo_sbc+balance") == ("ppo_sbc", "loss_balance")
    for bad in ("ppo+constant", "grpo", "ppo_sbc+nope"):
        with pytest.raises(ValueError, match="`(variant|bc_weight)` must be one of"):
            ex.split_variant(bad)
    kinds = {r: type(ex.make_bc_weight(ex.Config(bc_weight=r))).__name__ for r in ex.BC_WEIGHT_RULES}
    assert kinds == {"constant": "ConstantBCWeight", "success_rate": "SuccessRateBCWeight",
                     "loss_balance": "LossBalanceBCWeight", "product": "ProductBCWeight"}


def test_resuming_with_another_config_is_refused(tmp_path):
    cfg = ex.quick_config(ex.Config())
    ex.write_json(tmp_path / "ppo.json", {"base_config": {**ex.dataclasses.asdict(cfg), "lr": 1.0}})
    assert ex.config_mismatch({"lr": 1.0, "seed": cfg.seed}, cfg) == ["lr"]
    with pytest.raises(ValueError, match=r"different config \(fields \['lr'\]\)"):
        ex.run_task_seed(cfg, ["ppo"], None, progress=False, results_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# The study driver: run, resume, aggregate


def test_study_runs_resumes_and_aggregates(tmp_path, monkeypatch):
    calls = []

    def in_process(cmd, check):
        # The driver's command line, run by the example's own CLI in this process.
        assert Path(cmd[1]) == ROOT / "examples" / "metaworld_chunked_ppo.py" and check
        calls.append(cmd)
        ex.main(cmd[2:])

    monkeypatch.setattr(study.subprocess, "run", in_process)
    runs, results, docs = tmp_path / "runs", tmp_path / "res", tmp_path / "docs"
    argv = ["--tasks", "pick-place-v3", "--seeds", "0", "--variants", "ppo", "--bc-weight",
            "constant", "--out", str(runs), "--results", str(results), "--quick", "--no-progress",
            "--set", "iterations=1", "eval_every=1"]
    study.main(argv)
    assert [c[c.index("--variants") + 1] for c in calls] == ["ppo", "ppo_sbc+constant"]
    seed_dir = results / "pick-place-v3" / "seed0"
    assert sorted(p.name for p in seed_dir.iterdir()) == ["ppo.json", "ppo_sbc+constant.json",
                                                          "sft.json"]
    assert (runs / "pick-place-v3" / "seed0" / "sft.pt").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in seed_dir.iterdir()}
    study.main(argv)  # resumes: every unit is done, nothing runs
    assert len(calls) == 2
    assert {p.name: p.stat().st_mtime_ns for p in seed_dir.iterdir()} == stamps
    # a second shard of a larger study runs only its own units
    study.main([*argv[:3], "1", *argv[4:], "--shard", "1/2"])
    assert [c[c.index("--seed") + 1] for c in calls[2:]] == ["1"]
    out = study.main(["--aggregate", "--results", str(results), "--docs", str(docs),
                      "--tasks", "pick-place-v3"])
    saved = json.loads(results.with_suffix(".json").read_text())  # the default --summary
    task = saved["tasks"]["pick-place-v3"]
    assert list(task) == ["sft", "ppo", "ppo_sbc+constant"]
    both = task["ppo_sbc+constant"]
    assert task["ppo"]["per_seed"]["seeds"] == [0] and both["per_seed"]["seeds"] == [0, 1]
    assert {"success_ci95", "steps_all_ci95", "steps_to_success_ci95"} <= set(both)
    assert both["paired"]["vs_sft"]["success"]["n"] == 2 and both["success_ci95"] is not None
    assert out["tasks"]["pick-place-v3"]["ppo"]["success"] == task["ppo"]["success"]
    assert (docs / "img" / "chunked_ppo_pick-place-v3.png").stat().st_size > 0


def _record(success, steps, cap=150, **extra):
    """A fake record: per-episode outcomes -> the `final` block the example writes."""
    final = {"per_episode_success": success, "per_episode_steps": steps,
             **ex.episode_summary(success, steps)}
    curve = [{"iteration": 0, "success": 0.0, "steps_all": cap},
             {"iteration": 5, "success": final["success"], "steps_all": final["steps_all"]}]
    return {"final": final, "curve": curve, **extra}


def test_aggregation_matches_a_hand_computation(tmp_path):
    results, docs = tmp_path / "res", tmp_path / "docs"
    # Four goals per seed. SFT succeeds on goals 0-1 (seed 0, 1) and 0 (seed 2); ppo_sbc on more.
    sft = {0: _record([1, 1, 0, 0], [60, 80, 150, 150]),
           1: _record([1, 1, 0, 0], [70, 90, 150, 150]),
           2: _record([1, 0, 0, 0], [50, 150, 150, 150])}
    sbc = {0: _record([1, 1, 1, 0], [40, 60, 80, 150], wall_clock_s=10.0, env_steps=100),
           1: _record([1, 1, 1, 1], [50, 70, 90, 110], wall_clock_s=20.0, env_steps=200),
           2: _record([1, 1, 0, 0], [45, 65, 150, 150], wall_clock_s=30.0, env_steps=300)}
    for name, recs in (("sft", sft), ("ppo_sbc", sbc)):
        for seed, rec in recs.items():
            ex.write_json(results / "pick-place-v3" / f"seed{seed}" / f"{name}.json", rec)
    out = study.main(["--aggregate", "--results", str(results), "--docs", str(docs),
                      "--tasks", "pick-place-v3"])
    r = out["tasks"]["pick-place-v3"]["ppo_sbc"]
    t2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom
    # success per seed 0.75, 1.0, 0.5: mean 0.75, sd 0.25
    assert r["success"] == pytest.approx(0.75)
    assert r["success_ci95"] == pytest.approx([0.75 - t2 * 0.25 / 3**0.5, 0.75 + t2 * 0.25 / 3**0.5])
    # steps to success over successes: 60, 80, 55 -> mean 65, sd sqrt(175)
    assert r["per_seed"]["steps_to_success"] == pytest.approx([60.0, 80.0, 55.0])
    half = t2 * 175**0.5 / 3**0.5
    assert r["steps_to_success_ci95"] == pytest.approx([65 - half, 65 + half])
    # steps with failures at the cap: 82.5, 80, 102.5
    assert r["per_seed"]["steps_all"] == pytest.approx([82.5, 80.0, 102.5])
    assert r["wall_clock_s"] == pytest.approx(20.0) and r["env_steps"] == pytest.approx(200.0)
    # over the tasks, paired against ppo_sbc per seed: sft - ppo_sbc = -0.25, -0.5, -0.25
    d = out["overall"]["sft"]["vs_ppo_sbc"]
    sd = ((1 / 12) ** 2 * 2 + (1 / 6) ** 2) ** 0.5 / 2**0.5
    assert d["n"] == 3 and d["mean"] == pytest.approx(-1 / 3)
    assert d["ci95"] == pytest.approx([-1 / 3 - t2 * sd / 3**0.5, -1 / 3 + t2 * sd / 3**0.5])
    assert "vs_ppo_sbc" not in out["overall"]["ppo_sbc"]
    # pooled Wilson interval over the 12 episodes (9 successes)
    assert r["success_pooled_wilson95"] == pytest.approx([0.4677, 0.9111], abs=1e-4)
    # paired vs SFT: success 0.25, 0.5, 0.25 -> mean 1/3, sd 0.144338
    p = r["paired"]["vs_sft"]
    assert p["success"]["mean"] == pytest.approx(1 / 3)
    h = t2 * (1 / 48) ** 0.5 / 3**0.5  # differences 0.25, 0.5, 0.25: variance 1/48
    assert p["success"]["ci95"] == pytest.approx([1 / 3 - h, 1 / 3 + h])
    # steps to success: sft 70, 80, 50 -> differences -10, 0, 5
    assert p["steps_to_success"]["mean"] == pytest.approx(-5 / 3)
    # goals both solve: seed 0 (40-60, 60-80) -20; seed 1 (50-70, 70-90) -20; seed 2 (45-50) -5
    assert p["steps_common"]["mean"] == pytest.approx(-15.0)
    h = t2 * 75**0.5 / 3**0.5
    assert p["steps_common"]["ci95"] == pytest.approx([-15 - h, -15 + h])
    # the learning curve's band at iteration 5 is the success CI
    band = r["curve"]["success"]
    assert band["mean"][-1] == pytest.approx(0.75) and band["low"][-1] == pytest.approx(r["success_ci95"][0])
    # success averaged over the (one) task, per seed
    assert out["overall"]["ppo_sbc"]["per_seed"] == pytest.approx([0.75, 1.0, 0.5])


def test_study_argument_errors():
    with pytest.raises(ValueError, match="`shard` must be 'i/n'"):
        study.parse_shard("2/2")
    with pytest.raises(ValueError, match="`--set` takes key=value"):
        study.parse_sets(["lr"])
    with pytest.raises(ValueError, match="`variants` must be drawn from"):
        study.study_variants(["grpo"], [], "success_rate")
    assert study.study_variants(["ppo_sbc"], ["constant", "success_rate"], "success_rate") == [
        "ppo_sbc", "ppo_sbc+constant"]
    assert study.units(["a", "b"], [0, 1], ["v"], "1/2") == [("b", 0, "v"), ("b", 1, "v")]
