"""examples/libero: the `--smoke` run, resume, the KV-cache sampler and the gripper convention.

Skipped without the `libero` extra (transformers, peft). Uses the stand-in environment, so that
the result does not depend on whether LIBERO happens to be installed.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "libero"
KEYS = {
    "rollout_s",
    "update_s",
    "chunks_executed",
    "chunks_backpropagated",
    "peak_memory_bytes",
    "selected_per_phase",
    "success",
    "keep_probabilities",
    "eval_success",
}


def _load(name: str):
    sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location(f"libero_example_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load("train")
envs = _load("libero_envs")
vla = _load("vla_policy")

SMOKE = ["--smoke", "--env", "stand-in", "--no-progress"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    returned = train.main([*SMOKE, "--out", str(out)])
    return out, returned


def test_smoke_writes_metrics_and_backpropagates_about_b_over_n(smoke_run):
    out, returned = smoke_run
    records = _records(out / "metrics.jsonl")
    assert len(records) == 2 and records == json.loads(json.dumps(returned))
    assert KEYS <= set(records[-1]) and KEYS - {"eval_success"} <= set(records[0])
    budget, n = records[0]["budget"], records[0]["max_chunks"]
    assert (budget, n) == (2, 8)
    for r in records:
        assert r["env"] == "stand-in" and 0.0 <= r["success"] <= 1.0
        assert r["rollout_s"] > 0 and r["update_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["chunks_executed"] > 0
        assert r["chunks_backpropagated"] <= budget * r["kept_trajectories"]
        assert r["chunks_backpropagated"] == sum(r["selected_per_phase"])
        ratio = r["chunks_backpropagated"] / r["chunks_executed"]
        assert budget / n <= ratio <= 1.5 * budget / n  # B/N, a bit more for short episodes
        assert len(r["keep_probabilities"]) == 5 and max(r["keep_probabilities"]) == 1.0
        # Behaviour log-probs were computed by the same weights: the first ratio is 1.
        assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["global_batch_size"] == r["kept_trajectories"]
        assert r["batch_num_tokens"] == 56 * r["chunks_backpropagated"]
    assert records[0]["param_checksum"] != records[1]["param_checksum"]  # LoRA was updated
    assert (out / "checkpoint.pt").exists()


def test_resume_continues_exactly(smoke_run, tmp_path):
    out, _ = smoke_run
    straight = _records(out / "metrics.jsonl")
    train.main([*SMOKE, "--out", str(tmp_path), "--steps", "1"])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and set(state) >= {"lora", "optimizer", "masker", "step"}
    assert all("lora_" in name for name in state["lora"])
    train.main([*SMOKE, "--out", str(tmp_path), "--steps", "2", "--resume"])
    resumed = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2]
    skip = {"rollout_s", "update_s", "step_s", "eval_s", "peak_memory_bytes"}
    for a, b in zip(straight, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - skip:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
            else:
                assert a[key] == b[key], key


def test_autoregressive_kv_cache_matches_teacher_forcing():
    torch.manual_seed(0)
    codec = train.ActionTokenizer()
    policy = vla.build_smoke_policy(
        codec, image_size=32, prompt_len=12, lora_r=4, lora_alpha=4, decode="autoregressive"
    )
    env = envs.StandInVecEnv("spatial", 3, image_size=32)
    obs = env.reset([0, 1, 2], [0, 0, 0])
    obs["instruction"][1] = "short"  # left padding differs across rows
    inputs = policy.prepare(obs, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    tokens, logp = policy.sample(inputs, temperature=1.6, generator=gen)
    assert tokens.shape == (3, 56) and bool((tokens >= 31744).all() & (tokens < 32000).all())
    again, _ = policy.log_prob(inputs, tokens, temperature=1.6)
    torch.testing.assert_close(again, logp, atol=1e-4, rtol=1e-4)
    greedy, _ = policy.sample(inputs, temperature=1.6, greedy=True)
    assert torch.equal(greedy, policy.sample(inputs, temperature=1.6, greedy=True)[0])


def test_gripper_convention_is_converted_once():
    # Model side: 0 = close, 1 = open. LIBERO: -1 = open, +1 = close.
    g = np.array([0.0, 0.2, 0.5, 0.51, 1.0])
    assert envs.model_to_env_gripper(g).tolist() == [1.0, 1.0, 1.0, -1.0, -1.0]
    assert envs.model_to_env_gripper(torch.tensor([0.0, 1.0])).tolist() == [1.0, -1.0]
    policy = vla.build_smoke_policy(
        train.ActionTokenizer(), image_size=32, prompt_len=8, lora_r=4, lora_alpha=4
    )
    codec = policy.codec
    chunk = torch.zeros(1, 8, 7)
    chunk[0, :4, 6], chunk[0, 4:, 6] = -1.0, 1.0  # normalised: g = 0 (close), then 1 (open)
    norm, env_actions = policy.actions(codec.encode(chunk).view(1, 56))
    assert env_actions[0, :4, 6].tolist() == [1.0] * 4  # close -> +1
    assert env_actions[0, 4:, 6].tolist() == [-1.0] * 4  # open -> -1
    torch.testing.assert_close(norm, codec.decode(codec.encode(chunk)), atol=0, rtol=0)


def test_stand_in_has_libero_spaces_and_a_scripted_rule():
    env = envs.StandInVecEnv("goal", 2, image_size=16, max_steps=300)
    obs = env.reset([3, 4], [0, 1])
    assert obs["image"].shape == (2, 16, 16, 3) and obs["image"].dtype == np.uint8
    assert obs["wrist"].shape == (2, 16, 16, 3) and obs["state"].shape == (2, 8)
    assert obs["instruction"][0] == envs.STANDIN_INSTRUCTIONS[3]
    # Drive env 0 straight to its goal with the gripper closed: success; env 1 stays put.
    active = np.array([True, True])
    for _ in range(40):
        to_goal = np.clip((env.goal[0] - env.eef[0]) / 0.04, -1, 1)
        actions = np.zeros((2, 7))
        actions[0, :3], actions[:, 6] = to_goal, envs.ENV_GRIPPER_CLOSE
        _, done = env.step(actions, active)
        if done[0]:
            break
    assert done[0] and not done[1]
    assert envs.MAX_STEPS == {"spatial": 220, "object": 280, "goal": 300, "10": 520}
    with pytest.raises(ValueError, match="`suite` must be one of"):
        envs.StandInVecEnv("90", 1)
    with pytest.raises(ValueError, match="`env` must be one of"):
        envs.make_env("spatial", 1, env="gym")


def test_quat2axisangle():
    assert np.allclose(envs.quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)
    half = np.sqrt(0.5)
    assert np.allclose(envs.quat2axisangle(np.array([0.0, 0.0, half, half])), [0, 0, np.pi / 2])
