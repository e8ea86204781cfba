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
    # The results driver aggregates exactly what the example wrote.
    driver = _load(ROOT / "benchmarks" / "run_chunked_ppo.py")
    docs = tmp_path / "docs"
    args = ["--aggregate", "--out", str(tmp_path), "--docs", str(docs)]
    driver.main([*args, "--ablation-out", str(tmp_path / "no_ablation")])
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
