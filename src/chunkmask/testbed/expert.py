"""A noisy scripted expert for the pick-and-place testbed, and demonstration collection.

The expert is a closed-loop proportional controller with a small state machine read off the
observation: hover above the task object while turning to its yaw, descend, close while holding
still, lift, carry to the bin at transport height, lower, open, and rise clear. After a missed
grasp it opens and backs off before trying again. Gaussian noise on the motion dimensions and rare
gripper-command flips make its demonstrations imperfect, like human teleoperation.
"""

import math
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import check_positive_int, check_range
from chunkmask.testbed.env import (
    ACTION_DIM,
    OBJ_FEATURES,
    InitialState,
    PickPlaceConfig,
    PickPlaceVectorEnv,
    obs_layout,
)


def _yaw_from_doubled(sin2: Tensor, cos2: Tensor) -> Tensor:
    return torch.atan2(sin2, cos2) / 2


def _wrap_half_turn(angle: Tensor) -> Tensor:
    return torch.remainder(angle + math.pi / 2, math.pi) - math.pi / 2


class ScriptedExpert:
    """A noisy closed-loop expert for `PickPlaceVectorEnv`.

    Args:
        num_envs: number of sub-environments it controls.
        config: the environment's `PickPlaceConfig`.
        noise: standard deviation of the Gaussian noise added to the motion dimensions (in action
            units, where 1 is full speed).
        grip_flip: probability per step that the gripper command is flipped.
        generator: torch generator for the noise.

    Example:
        >>> env = PickPlaceVectorEnv(2)
        >>> expert = ScriptedExpert(2, generator=torch.Generator().manual_seed(0))
        >>> obs, _ = env.reset(seed=0)
        >>> expert(obs).shape
        torch.Size([2, 5])
    """

    hover_height = 0.1
    transport_height = 0.2
    release_height = 0.06

    def __init__(
        self,
        num_envs: int,
        config: PickPlaceConfig | None = None,
        *,
        noise: float = 0.2,
        grip_flip: float = 0.003,
        generator: torch.Generator | None = None,
    ) -> None:
        check_positive_int(num_envs, "num_envs")
        self.config = config or PickPlaceConfig()
        self.layout = obs_layout(self.config.num_objects)
        self.noise = check_range(noise, "noise", low=0.0)
        self.grip_flip = check_range(grip_flip, "grip_flip", low=0.0, high=1.0)
        self.generator = generator
        self.num_envs = num_envs
        self.reset()

    def reset(self) -> None:
        """Forget the back-off counters (call at every environment reset)."""
        self.backoff = torch.zeros(self.num_envs, dtype=torch.long)

    def __call__(self, obs: Float[Tensor, "env obs"]) -> Float[Tensor, "env action"]:
        """Return one action per sub-environment for the observations `obs`."""
        cfg, lay = self.config, self.layout
        n = obs.shape[0]
        ee = obs[:, 0:3]
        ee_yaw = _yaw_from_doubled(obs[:, 3], obs[:, 4])
        closure = obs[:, 5]
        holding = obs[:, 6] > 0.5
        objs = obs[:, lay.objects].reshape(n, lay.num_objects, OBJ_FEATURES)
        task = obs[:, lay.task].long()
        target = objs[torch.arange(n), task]
        obj_pos = target[:, 0:3]
        obj_yaw = _yaw_from_doubled(target[:, 3], target[:, 4])
        held_target = target[:, 5] > 0.5
        bin_xy = obs[:, lay.bin]

        move = torch.zeros(n, 3)
        turn = torch.zeros(n)
        grip = torch.full((n,), -1.0)

        def goto(goal: Tensor, gain: float = 0.5) -> Tensor:
            return ((goal - ee) * gain / cfg.max_move).clamp(-1, 1)

        # Carry: rise while travelling to the bin, sink as it gets close, open once low over it.
        to_bin = bin_xy - ee[:, :2]
        bin_dist = to_bin.norm(dim=1)
        carry_z = self.release_height + (bin_dist * 2).clamp(
            max=self.transport_height - self.release_height
        )
        carry_goal = torch.cat([bin_xy, carry_z[:, None]], dim=1)
        lowered = (bin_dist <= 0.02) & (ee[:, 2] <= self.release_height + 0.015)
        carry_move = goto(carry_goal)
        carry_grip = torch.where(lowered, -1.0, 1.0)

        # Reach: glide down a funnel onto the object while turning to its yaw; close when still.
        to_obj = obj_pos[:, :2] - ee[:, :2]
        dist = to_obj.norm(dim=1)
        yaw_err = _wrap_half_turn(obj_yaw - ee_yaw)
        funnel = (dist * 2 + yaw_err.abs() * 0.2).clamp(max=self.hover_height)
        reach_goal = torch.cat([obj_pos[:, :2], (obj_pos[:, 2] + funnel)[:, None]], dim=1)
        ready = (
            (dist <= 0.01) & ((ee[:, 2] - obj_pos[:, 2]).abs() <= 0.01) & (yaw_err.abs() <= 0.06)
        )
        keep_closing = (closure > 0) & (closure < 1) & (dist <= 0.025)
        close = ready | keep_closing
        reach_move = torch.where(close[:, None], 0.0, goto(reach_goal))
        reach_turn = (yaw_err * 0.5 / cfg.max_turn).clamp(-1, 1)
        reach_grip = torch.where(close, 1.0, -1.0)

        # A closed gripper holding nothing means a missed grasp: open and back off.
        missed = (closure >= 1) & ~holding
        self.backoff = torch.where(missed, 8, self.backoff)
        backing = self.backoff > 0
        self.backoff = (self.backoff - 1).clamp_min(0)

        in_bin = (obj_pos[:, :2] - bin_xy).abs().amax(dim=1) <= cfg.bin_half_size
        placed = in_bin & ~held_target
        wrong = holding & ~held_target

        up = torch.tensor([0.0, 0.0, 1.0]).expand(n, 3)
        move = torch.where(held_target[:, None], carry_move, reach_move)
        turn = torch.where(held_target, 0.0, reach_turn)
        grip = torch.where(held_target, carry_grip, reach_grip)
        retreat = placed | backing | wrong
        move = torch.where(retreat[:, None], up, move)
        turn = torch.where(retreat, 0.0, turn)
        grip = torch.where(retreat, -1.0, grip)

        motion = torch.cat([move, turn[:, None]], dim=1)
        motion = motion + self.noise * torch.randn(n, 4, generator=self.generator)
        flip = torch.rand(n, generator=self.generator) < self.grip_flip
        grip = torch.where(flip, -grip, grip)
        return torch.cat([motion.clamp(-1, 1), grip[:, None]], dim=1)


class Demonstrations(NamedTuple):
    """Expert episodes cut into chunks for behaviour cloning.

    Attributes:
        obs: `(n, obs)` observation at the start of each chunk.
        actions: `(n, H, 5)` the expert's actions over the chunk.
        success: `(episodes,)` whether each episode succeeded.
        lengths: `(episodes,)` episode lengths in steps.
    """

    obs: Float[Tensor, "n obs"]
    actions: Float[Tensor, "n step action"]
    success: Bool[Tensor, " episodes"]
    lengths: Float[Tensor, " episodes"]


def collect_demonstrations(
    num_episodes: int,
    *,
    horizon: int = 8,
    config: PickPlaceConfig | None = None,
    initial_state: InitialState | None = None,
    seed: int = 0,
    noise: float = 0.2,
    successful_only: bool = True,
    distraction: float = 0.0,
) -> Demonstrations:
    """Roll the scripted expert out and cut its episodes into chunks of `horizon` steps.

    With `distraction > 0` (and more than one object), each episode is, with that probability,
    demonstrated by a distracted expert: it sees a wrong task id (another object, uniformly) and
    puts that object in the bin. The demonstrator's choice then ignores the task token as often,
    so a policy cloned from these demonstrations picks the wrong object in about that share of
    its episodes: a mode error that RL can correct (the task token is in every observation).
    A distracted episode counts as successful (for `successful_only`) when its own object ends
    in the bin.

    Args:
        num_episodes: number of episodes (run as one batch).
        horizon: chunk length `H`.
        config: environment configuration.
        initial_state: optional initial states (`num_episodes` of them).
        seed: seeds the environment and the expert noise.
        noise: expert motion noise.
        successful_only: keep only the chunks of successful episodes.
        distraction: probability that an episode's demonstrator targets a wrong object.

    Returns:
        The chunked `Demonstrations` (chunks that start after an episode ended are dropped).

    Example:
        >>> demos = collect_demonstrations(2, seed=0)
        >>> demos.actions.shape[1:]
        torch.Size([8, 5])
    """
    check_positive_int(num_episodes, "num_episodes")
    check_positive_int(horizon, "horizon")
    check_range(noise, "noise", low=0.0)
    check_range(distraction, "distraction", low=0.0, high=1.0)
    cfg = config or PickPlaceConfig()
    env = PickPlaceVectorEnv(num_episodes, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    expert = ScriptedExpert(num_episodes, cfg, noise=noise, generator=gen)
    options = None if initial_state is None else {"initial_state": initial_state}
    obs, _ = env.reset(seed=seed, options=options)
    lay = env.layout
    true_task = obs[:, lay.task].long()
    believed = true_task
    if distraction > 0 and cfg.num_objects > 1:
        dgen = torch.Generator().manual_seed(seed + 2)
        distracted = torch.rand(num_episodes, generator=dgen) < distraction
        shift = torch.randint(1, cfg.num_objects, (num_episodes,), generator=dgen)
        believed = torch.where(distracted, (true_task + shift) % cfg.num_objects, true_task)

    def seen(o: Tensor) -> Tensor:  # the observation with the demonstrator's task id
        o = o.clone()
        o[:, lay.task] = believed.to(o.dtype)
        return o

    num_chunks = -(-cfg.max_steps // horizon)
    all_obs = torch.zeros(num_episodes, num_chunks, obs.shape[1])
    all_act = torch.zeros(num_episodes, num_chunks, horizon, ACTION_DIM)
    alive = torch.zeros(num_episodes, num_chunks, dtype=torch.bool)
    for c in range(num_chunks):
        if bool(env.done.all()):
            break
        alive[:, c] = ~env.done
        all_obs[:, c] = obs
        for h in range(horizon):
            act = expert(seen(obs))
            all_act[:, c, h] = act
            obs, *_ = env.step(act)
    done_own = env.success
    if bool((believed != true_task).any()):  # a distracted episode never ends in success
        objs = obs[:, lay.objects].reshape(num_episodes, lay.num_objects, OBJ_FEATURES)
        own = objs[torch.arange(num_episodes), believed]
        in_bin = (own[:, :2] - obs[:, lay.bin]).abs().amax(1) <= cfg.bin_half_size
        placed = in_bin & (own[:, 5] < 0.5) & (own[:, 2] <= 0.01)
        done_own = torch.where(believed != true_task, placed, env.success)
    keep = alive & (done_own[:, None] if successful_only else True)
    return Demonstrations(
        obs=all_obs[keep],
        actions=all_act[keep],
        success=env.success.clone(),
        lengths=env.steps.float(),
    )
