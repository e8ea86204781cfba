import math

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")  # the `testbed` extra

from chunkmask.testbed.env import (  # noqa: E402
    ACTION_DIM,
    InitialState,
    PickPlaceConfig,
    PickPlaceVectorEnv,
    sample_initial_states,
)
from chunkmask.testbed.expert import ScriptedExpert, collect_demonstrations  # noqa: E402

CFG = PickPlaceConfig()


def _state(ee=(0.0, 0.0, 0.0), ee_yaw=0.0, obj=(0.0, 0.0, 0.0), obj_yaw=0.0, bin_xy=(0.5, 0.5)):
    return InitialState(
        ee_pos=torch.tensor([ee]),
        ee_yaw=torch.tensor([ee_yaw]),
        obj_pos=torch.tensor([[obj]]),
        obj_yaw=torch.tensor([[obj_yaw]]),
        bin_pos=torch.tensor([bin_xy]),
        task=torch.tensor([0]),
    )


def _act(dx=0.0, dy=0.0, dz=0.0, dyaw=0.0, grip=-1.0):
    return torch.tensor([[dx, dy, dz, dyaw, grip]])


def _close(env, steps=4):
    for _ in range(steps):
        out = env.step(_act(grip=1.0))
    return out


def test_spaces_and_shapes():
    env = PickPlaceVectorEnv(3)
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, env.layout.dim) == env.observation_space.shape
    assert env.action_space.shape == (3, ACTION_DIM)
    assert env.single_action_space.contains(np.zeros(ACTION_DIM, dtype=np.float32))
    assert env.observation_space.contains(obs.numpy())
    assert env.metadata["autoreset_mode"].value == "Disabled"
    assert set(info) == {"success", "done", "grasped"}
    with pytest.raises(ValueError, match=r"`actions` must have shape \(3, 5\)"):
        env.step(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="`initial_state` must hold num_envs=3"):
        env.reset(options={"initial_state": sample_initial_states(2)})
    with pytest.raises(ValueError, match="`num_envs`"):
        PickPlaceVectorEnv(0)


def test_seeding_is_deterministic():
    actions = torch.rand(20, 4, ACTION_DIM, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def run(seed):
        env = PickPlaceVectorEnv(4)
        obs, _ = env.reset(seed=seed)
        trace = [obs]
        for a in actions:
            trace.append(env.step(a)[0])
        return torch.stack(trace)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_batched_equals_one_by_one():
    states = sample_initial_states(3, generator=torch.Generator().manual_seed(2))
    actions = torch.rand(30, 3, ACTION_DIM, generator=torch.Generator().manual_seed(3)) * 2 - 1
    env = PickPlaceVectorEnv(3)
    env.reset(options={"initial_state": states})
    batched = [env.step(a)[0] for a in actions][-1]
    for i in range(3):
        single = PickPlaceVectorEnv(1)
        one = InitialState(*(x[i : i + 1] for x in states))
        single.reset(options={"initial_state": one})
        last = [single.step(a[i : i + 1])[0] for a in actions][-1]
        torch.testing.assert_close(last[0], batched[i])


def test_spawn_respects_gaps():
    s = sample_initial_states(256, generator=torch.Generator().manual_seed(0))
    gap = (s.obj_pos[:, 0, :2] - s.bin_pos).norm(dim=1)
    assert bool((gap >= CFG.min_bin_gap).all())
    assert bool((s.obj_pos[..., 2] == 0).all())


def test_aligned_grasp_catches_and_carries():
    env = PickPlaceVectorEnv(1)
    env.reset(options={"initial_state": _state(ee_yaw=0.05, obj_yaw=0.0)})
    _close(env)
    assert env.held.item() == 0 and bool(env.grasped[0])
    for _ in range(10):
        env.step(_act(dz=1.0, dx=1.0, grip=1.0))
    torch.testing.assert_close(env.obj_pos[0, 0], env.ee_pos[0])


def test_misaligned_grasp_misses_and_bumps():
    # Yaw off by more than the tolerance: the close attempt misses.
    env = PickPlaceVectorEnv(1)
    env.reset(options={"initial_state": _state(ee_yaw=0.0, obj_yaw=0.5)})
    _close(env)
    assert env.held.item() == -1 and not bool(env.grasped[0])
    # Off-centre by more than the xy tolerance but close: the object is bumped away.
    env.reset(options={"initial_state": _state(ee=(0.05, 0.0, 0.0))})
    _close(env)
    assert env.held.item() == -1
    assert env.obj_pos[0, 0, 0].item() == pytest.approx(-CFG.bump_distance)
    # Half-turn symmetry: yaw pi/2 and -pi/2 + 0.05 are aligned.
    env.reset(options={"initial_state": _state(ee_yaw=math.pi / 2, obj_yaw=-math.pi / 2 + 0.05)})
    _close(env)
    assert env.held.item() == 0


def test_drop_in_transport_falls_where_opened():
    env = PickPlaceVectorEnv(1)
    env.reset(options={"initial_state": _state()})
    _close(env)
    for _ in range(20):
        env.step(_act(dx=-1.0, dz=1.0, grip=1.0))
    xy = env.ee_pos[0, :2].clone()
    env.step(_act(grip=-1.0))
    env.step(_act(grip=-1.0))
    assert env.held.item() == 0  # closure 0.5: still held
    env.step(_act(grip=-1.0))
    assert env.held.item() == -1  # closure below 0.5: dropped
    for _ in range(10):
        _, reward, terminated, truncated, _ = env.step(_act())
    torch.testing.assert_close(env.obj_pos[0, 0, :2], xy)
    assert env.obj_pos[0, 0, 2].item() == 0.0
    assert not bool(terminated) and reward.item() == 0.0


def _place(env, bin_xy, release_height=0.06):
    """Grasp at the origin, carry to `bin_xy`, release, rise; returns per-step outputs."""
    _close(env)
    outs = []
    target = torch.tensor([*bin_xy, release_height])
    for _ in range(400):
        delta = ((target - env.ee_pos[0]) / CFG.max_move).clamp(-1, 1)
        outs.append(env.step(_act(*delta.tolist(), grip=1.0)))
        if (target - env.ee_pos[0]).abs().max() < 1e-3:
            break
    for _ in range(4):
        outs.append(env.step(_act(grip=-1.0)))
    for _ in range(30):
        outs.append(env.step(_act(dz=1.0)))
        if bool(env.done[0]):
            break
    return outs


def test_success_terminates_in_bin():
    env = PickPlaceVectorEnv(1)
    env.reset(options={"initial_state": _state(bin_xy=(0.3, 0.2))})
    outs = _place(env, (0.3, 0.2))
    rewards = torch.stack([o[1] for o in outs])
    terminated = torch.stack([o[2] for o in outs])
    assert rewards.sum().item() == 1.0 and terminated.sum().item() == 1
    assert bool(env.success[0]) and bool(env.done[0])
    # Frozen after the end: no reward, no motion.
    before = env.ee_pos.clone()
    _, reward, terminated, truncated, _ = env.step(_act(dx=1.0))
    assert reward.item() == 0 and not bool(terminated) and not bool(truncated)
    torch.testing.assert_close(env.ee_pos, before)


def test_release_off_target_fails():
    env = PickPlaceVectorEnv(1)
    env.reset(options={"initial_state": _state(bin_xy=(0.3, 0.2))})
    _place(env, (0.3 + 2.5 * CFG.bin_half_size, 0.2))
    assert not bool(env.success[0]) and not bool(env.done[0])
    assert env.obj_pos[0, 0, 2].item() == 0.0


def test_time_limit_truncates():
    env = PickPlaceVectorEnv(2, PickPlaceConfig(max_steps=5))
    env.reset(seed=0)
    truncs = [env.step(torch.zeros(2, ACTION_DIM))[3] for _ in range(5)]
    assert not bool(torch.stack(truncs[:4]).any()) and bool(truncs[4].all())
    assert bool(env.done.all())


def test_reset_clears_episode():
    env = PickPlaceVectorEnv(1)
    env.reset(options={"initial_state": _state()})
    _close(env)
    assert env.held.item() == 0
    env.reset(options={"initial_state": _state()})
    assert env.held.item() == -1 and env.closure.item() == 0 and env.steps.item() == 0
    assert not bool(env.done[0])


def test_expert_succeeds_at_least_95_percent():
    demos = collect_demonstrations(40, seed=5, successful_only=False)
    assert demos.success.float().mean().item() >= 0.95
    # Long-horizon task: expert episodes span tens of chunks of 8 steps.
    assert 20 <= demos.lengths.float().mean().item() / 8 <= 64


def test_expert_is_deterministic_given_generator():
    env = PickPlaceVectorEnv(2)
    obs, _ = env.reset(seed=0)
    a = ScriptedExpert(2, generator=torch.Generator().manual_seed(0))(obs)
    b = ScriptedExpert(2, generator=torch.Generator().manual_seed(0))(obs)
    assert torch.equal(a, b)
