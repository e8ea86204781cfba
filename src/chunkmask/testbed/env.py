"""A batched pick-and-place environment in torch, following gymnasium's vector-env API.

The scene is a table with `num_objects` objects and one bin. The task (one per sub-environment)
names the object to pick; the others are distractors. The arm is a floating end effector with a
position, a yaw and a parallel gripper. Actions are end-effector deltas plus a gripper command,
gripper last, as in LIBERO and MetaWorld:

    action = (dx, dy, dz, dyaw, gripper)  in [-1, 1]^5,  gripper > 0 closes.

The dynamics are simple but carry the structure that makes manipulation RL hard:

- **Grasping needs alignment.** The gripper closes over a few steps. The grasp is decided at the
  step the fingers reach full closure: the object is caught only if the fingertips are within
  `grasp_xy_tol` of it horizontally, within `grasp_z_tol` vertically and within `grasp_yaw_tol` in
  yaw (objects are symmetric under a half turn). A miss closes on nothing and, when the fingers
  were near the object, nudges it away (the arm bumped it).
- **A held object moves with the gripper and drops where the gripper opens.** It falls straight
  down; it ends in the bin only if it lands inside the bin's footprint.
- **Success** means the task object rests inside the bin, the gripper is open and the arm has
  cleared the object. The episode terminates on success and is truncated at `max_steps`.

So a rollout runs through approach, pre-grasp alignment, grip and transport, release and (after a
failed placement, or while waiting out the clock) a tail, and it can fail by a missed grasp, a drop
in transport, a release off the bin, or picking the wrong object.

Everything is batched over sub-environments and deterministic given the reset seed (or explicit
initial states) and the actions. There is no autoreset: a finished sub-environment stays frozen,
returning zero reward, until the next `reset`.

Observations are `(num_envs, OBS_DIM)` float tensors laid out as in `ObsLayout`; arrays are torch
tensors on the environment's device (wrap the environment in
`gymnasium.wrappers.vector.TorchToNumpy` for numpy arrays).
"""

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from jaxtyping import Bool, Float, Int64
from torch import Tensor

ACTION_DIM = 5
"""Action dimensions: `(dx, dy, dz, dyaw, gripper)`; the gripper is last and `> 0` closes."""


@dataclass(frozen=True)
class PickPlaceConfig:
    """Geometry and dynamics of the pick-and-place task.

    Distances are in workspace units (the table spans `[-1, 1]^2`), angles in radians, times in
    steps.

    Attributes:
        num_objects: objects on the table; the task picks one, the rest are distractors.
        max_steps: time limit (steps); 512 steps are 64 chunks of 8.
        max_move: end-effector translation per step at a full action (units).
        max_turn: yaw change per step at a full action (rad).
        grip_rate: gripper closure change per step (closure runs 0 = open to 1 = closed).
        release_closure: a held object drops once the closure falls below this.
        grasp_xy_tol: horizontal tolerance of a grasp (units).
        grasp_z_tol: vertical tolerance of a grasp (units).
        grasp_yaw_tol: yaw tolerance of a grasp (rad, modulo a half turn).
        bump_radius: a missed grasp closer than this pushes the object away.
        bump_distance: how far a bump pushes the object (units).
        fall_speed: falling speed of a released object (units per step).
        bin_half_size: half the side of the bin's square footprint (units).
        clear_height: the arm must rise this high above the table for the task to count as done.
        z_max: ceiling of the workspace.
        spawn_extent: objects and bin spawn in `[-spawn_extent, spawn_extent]^2`.
        min_object_gap: minimum distance between objects at spawn.
        min_bin_gap: minimum distance between the bin and any object at spawn.
    """

    num_objects: int = 1
    max_steps: int = 512
    max_move: float = 0.004
    max_turn: float = 0.03
    grip_rate: float = 0.25
    release_closure: float = 0.5
    grasp_xy_tol: float = 0.03
    grasp_z_tol: float = 0.025
    grasp_yaw_tol: float = 0.2
    bump_radius: float = 0.08
    bump_distance: float = 0.04
    fall_speed: float = 0.04
    bin_half_size: float = 0.08
    clear_height: float = 0.1
    z_max: float = 0.4
    spawn_extent: float = 0.6
    min_object_gap: float = 0.3
    min_bin_gap: float = 0.4


class InitialState(NamedTuple):
    """Initial states ("prompts") of a batch of episodes.

    Attributes:
        ee_pos: `(n, 3)` end-effector position.
        ee_yaw: `(n,)` end-effector yaw.
        obj_pos: `(n, num_objects, 3)` object positions (z = 0 rests on the table).
        obj_yaw: `(n, num_objects)` object yaws.
        bin_pos: `(n, 2)` bin centre.
        task: `(n,)` int64 index of the object to place in the bin.
    """

    ee_pos: Float[Tensor, "n 3"]
    ee_yaw: Float[Tensor, " n"]
    obj_pos: Float[Tensor, "n obj 3"]
    obj_yaw: Float[Tensor, "n obj"]
    bin_pos: Float[Tensor, "n 2"]
    task: Int64[Tensor, " n"]

    def repeat_interleave(self, repeats: int) -> "InitialState":
        """Repeat each state `repeats` times in a row: `G` rollouts per prompt form a group."""
        return InitialState(*(x.repeat_interleave(repeats, dim=0) for x in self))

    @property
    def num(self) -> int:
        """Number of states."""
        return self.task.shape[0]

    def take(self, index: Tensor) -> "InitialState":
        """The states at `index` (a 1-D int64 tensor), in that order."""
        return InitialState(*(x[index] for x in self))


class ObsLayout(NamedTuple):
    """Column slices of the flat observation.

    Per environment the observation is
    `[ee_x, ee_y, ee_z, sin 2yaw, cos 2yaw, closure, holding, time]` (8), then per object
    `[x, y, z, sin 2yaw, cos 2yaw, held]` (6 each), then `[bin_x, bin_y]` (2), then `[task]` (1).
    Yaws enter doubled because the gripper and objects are symmetric under a half turn.
    """

    ee: slice
    objects: slice
    bin: slice
    task: int
    num_objects: int
    dim: int


EE_FEATURES = 8
OBJ_FEATURES = 6


def obs_layout(num_objects: int) -> ObsLayout:
    """The `ObsLayout` for a scene with `num_objects` objects."""
    start = EE_FEATURES
    stop = start + OBJ_FEATURES * num_objects
    return ObsLayout(
        ee=slice(0, EE_FEATURES),
        objects=slice(start, stop),
        bin=slice(stop, stop + 2),
        task=stop + 2,
        num_objects=num_objects,
        dim=stop + 3,
    )


def _wrap_half_turn(angle: Tensor) -> Tensor:
    """Wrap an angle difference to `[-pi/2, pi/2)` (symmetry under a half turn)."""
    return torch.remainder(angle + math.pi / 2, math.pi) - math.pi / 2


def sample_initial_states(
    n: int,
    *,
    config: PickPlaceConfig | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> InitialState:
    """Draw `n` random initial states: object and bin placements, yaws, home pose and task.

    Objects keep `min_object_gap` from each other and the bin keeps `min_bin_gap` from every
    object (vectorised rejection sampling).

    Example:
        >>> s = sample_initial_states(4, generator=torch.Generator().manual_seed(0))
        >>> s.obj_pos.shape, s.task.shape
        (torch.Size([4, 1, 3]), torch.Size([4]))
    """
    cfg = config or PickPlaceConfig()
    k = cfg.num_objects
    ext = cfg.spawn_extent

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator) * 2 * ext - ext

    obj_xy = uniform(n, k, 2)
    bin_xy = uniform(n, 2)
    for _ in range(200):
        gaps = torch.cdist(obj_xy, obj_xy) + torch.eye(k) * 10
        bin_gaps = (obj_xy - bin_xy[:, None]).norm(dim=-1)
        bad = (gaps.amin(dim=(1, 2)) < cfg.min_object_gap) | (
            bin_gaps.amin(dim=1) < cfg.min_bin_gap
        )
        if not bool(bad.any()):
            break
        obj_xy = torch.where(bad[:, None, None], uniform(n, k, 2), obj_xy)
        bin_xy = torch.where(bad[:, None], uniform(n, 2), bin_xy)
    obj_pos = torch.cat([obj_xy, torch.zeros(n, k, 1)], dim=-1)
    obj_yaw = (torch.rand(n, k, generator=generator) - 0.5) * math.pi
    home = torch.tensor([0.0, 0.0, 0.3])
    ee_pos = home + (torch.rand(n, 3, generator=generator) - 0.5) * torch.tensor([0.2, 0.2, 0.1])
    ee_yaw = torch.zeros(n)
    task = torch.randint(k, (n,), generator=generator)
    state = InitialState(ee_pos, ee_yaw, obj_pos, obj_yaw, bin_xy, task)
    return InitialState(*(x.to(device) for x in state))


class PickPlaceVectorEnv(VectorEnv):
    """A vectorised pick-and-place task with `num_envs` sub-environments, in torch.

    Follows `gymnasium.vector.VectorEnv`: `reset(seed=, options=) -> (obs, info)` and
    `step(actions) -> (obs, reward, terminated, truncated, info)`, with `single_action_space`
    `Box(-1, 1, (5,))` and `single_observation_space` `Box(-inf, inf, (OBS_DIM,))`. Arrays are
    torch tensors. Autoreset is disabled (`metadata["autoreset_mode"]` is `DISABLED`).

    `reset(options={"initial_state": state})` starts from given `InitialState`s (for example
    `state.repeat_interleave(G)` for GRPO groups); otherwise states are drawn from the
    environment's generator, seeded by `reset(seed=...)`.

    `info` holds `success` (bool, task object resting in the bin), `done` (bool, episode over) and
    `grasped` (bool, the task object has been caught at least once this episode).

    Example:
        >>> env = PickPlaceVectorEnv(3)
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape
        torch.Size([3, 17])
        >>> obs, reward, terminated, truncated, info = env.step(torch.zeros(3, 5))
        >>> reward.tolist(), terminated.tolist(), truncated.tolist()
        ([0.0, 0.0, 0.0], [False, False, False], [False, False, False])
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": []}

    def __init__(
        self,
        num_envs: int,
        config: PickPlaceConfig | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"`num_envs` must be a positive int, got {num_envs!r}.")
        self.config = config or PickPlaceConfig()
        self.layout = obs_layout(self.config.num_objects)
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), dtype=np.float32)
        self.single_observation_space = gym.spaces.Box(
            -np.inf, np.inf, (self.layout.dim,), dtype=np.float32
        )
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._generator = torch.Generator().manual_seed(0)
        self._allocate()

    # ------------------------------------------------------------------ state
    def _allocate(self) -> None:
        n, k, dev = self.num_envs, self.config.num_objects, self.device
        self.ee_pos = torch.zeros(n, 3, device=dev)
        self.ee_yaw = torch.zeros(n, device=dev)
        self.closure = torch.zeros(n, device=dev)
        self.obj_pos = torch.zeros(n, k, 3, device=dev)
        self.obj_yaw = torch.zeros(n, k, device=dev)
        self.bin_pos = torch.zeros(n, 2, device=dev)
        self.task = torch.zeros(n, dtype=torch.long, device=dev)
        self.held = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.steps = torch.zeros(n, dtype=torch.long, device=dev)
        self.done = torch.zeros(n, dtype=torch.bool, device=dev)
        self.success = torch.zeros(n, dtype=torch.bool, device=dev)
        self.grasped = torch.zeros(n, dtype=torch.bool, device=dev)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Float[Tensor, "env obs"], dict[str, Tensor]]:
        """Start new episodes in every sub-environment.

        Args:
            seed: reseeds the environment's generator (used to draw initial states).
            options: `{"initial_state": InitialState}` with `num_envs` states to start from.

        Returns:
            `(obs, info)`.

        Raises:
            ValueError: if the initial state batch does not have `num_envs` rows.
        """
        if seed is not None:
            self._generator = torch.Generator().manual_seed(int(seed))
        state = (options or {}).get("initial_state")
        if state is None:
            state = sample_initial_states(
                self.num_envs, config=self.config, generator=self._generator, device=self.device
            )
        if state.num != self.num_envs:
            raise ValueError(
                f"`initial_state` must hold num_envs={self.num_envs} states, got {state.num}."
            )
        dev = self.device
        self.ee_pos = state.ee_pos.to(dev, torch.float32).clone()
        self.ee_yaw = state.ee_yaw.to(dev, torch.float32).clone()
        self.obj_pos = state.obj_pos.to(dev, torch.float32).clone()
        self.obj_yaw = state.obj_yaw.to(dev, torch.float32).clone()
        self.bin_pos = state.bin_pos.to(dev, torch.float32).clone()
        self.task = state.task.to(dev, torch.long).clone()
        self.closure = torch.zeros(self.num_envs, device=dev)
        self.held.fill_(-1)
        self.steps.zero_()
        self.done.zero_()
        self.success.zero_()
        self.grasped.zero_()
        return self._obs(), self._info()

    def _obs(self) -> Tensor:
        cfg = self.config
        n, k = self.num_envs, cfg.num_objects
        holding = (self.held >= 0).float()
        time = self.steps.float() / cfg.max_steps
        ee = torch.stack(
            [
                self.ee_pos[:, 0],
                self.ee_pos[:, 1],
                self.ee_pos[:, 2],
                torch.sin(2 * self.ee_yaw),
                torch.cos(2 * self.ee_yaw),
                self.closure,
                holding,
                time,
            ],
            dim=1,
        )
        held_onehot = (self.held[:, None] == torch.arange(k, device=self.device)).float()
        objs = torch.cat(
            [
                self.obj_pos,
                torch.sin(2 * self.obj_yaw)[..., None],
                torch.cos(2 * self.obj_yaw)[..., None],
                held_onehot[..., None],
            ],
            dim=-1,
        ).reshape(n, k * OBJ_FEATURES)
        return torch.cat([ee, objs, self.bin_pos, self.task[:, None].float()], dim=1)

    def _in_bin(self) -> Tensor:
        offset = (self.obj_pos[..., :2] - self.bin_pos[:, None]).abs().amax(dim=-1)
        return offset <= self.config.bin_half_size

    def _info(self) -> dict[str, Tensor]:
        return {
            "success": self.success.clone(),
            "done": self.done.clone(),
            "grasped": self.grasped.clone(),
        }

    # ------------------------------------------------------------------- step
    def step(
        self, actions: Float[Tensor, "env action"]
    ) -> tuple[
        Float[Tensor, "env obs"],
        Float[Tensor, " env"],
        Bool[Tensor, " env"],
        Bool[Tensor, " env"],
        dict[str, Tensor],
    ]:
        """Apply one action per sub-environment; finished sub-environments do not move.

        Args:
            actions: `(num_envs, 5)` actions in `[-1, 1]` (clipped), gripper last, `> 0` closes.

        Returns:
            `(obs, reward, terminated, truncated, info)`: reward is 1 on the step the task
            succeeds and 0 otherwise; `terminated` / `truncated` are True only on the step the
            episode ends.

        Raises:
            ValueError: if `actions` does not have shape `(num_envs, 5)`.
        """
        actions = torch.as_tensor(actions, device=self.device, dtype=torch.float32)
        if tuple(actions.shape) != (self.num_envs, ACTION_DIM):
            raise ValueError(
                f"`actions` must have shape ({self.num_envs}, {ACTION_DIM}), "
                f"got {tuple(actions.shape)}."
            )
        cfg = self.config
        k, dev = cfg.num_objects, self.device
        active = ~self.done
        a = torch.where(active[:, None], actions.nan_to_num(0.0).clamp(-1, 1), 0.0)

        # Arm kinematics.
        self.ee_pos = self.ee_pos + cfg.max_move * a[:, :3]
        self.ee_pos = torch.stack(
            [
                self.ee_pos[:, 0].clamp(-1, 1),
                self.ee_pos[:, 1].clamp(-1, 1),
                self.ee_pos[:, 2].clamp(0, cfg.z_max),
            ],
            dim=1,
        )
        self.ee_yaw = (self.ee_yaw + cfg.max_turn * a[:, 3]).clamp(-math.pi / 2, math.pi / 2)
        direction = torch.where(a[:, 4] > 0, 1.0, -1.0)
        previous = self.closure
        self.closure = torch.where(
            active, (previous + cfg.grip_rate * direction).clamp(0, 1), previous
        )

        # Grasp: decided when the fingers reach full closure with nothing held.
        holding = self.held >= 0
        closing_now = active & ~holding & (self.closure >= 1) & (previous < 1)
        rel = self.obj_pos - self.ee_pos[:, None]
        dist_xy = rel[..., :2].norm(dim=-1)
        dyaw = _wrap_half_turn(self.obj_yaw - self.ee_yaw[:, None]).abs()
        resting = self.obj_pos[..., 2] <= 1e-6
        aligned = (
            (dist_xy <= cfg.grasp_xy_tol)
            & (rel[..., 2].abs() <= cfg.grasp_z_tol)
            & (dyaw <= cfg.grasp_yaw_tol)
            & resting
        )
        score = torch.where(aligned, dist_xy, math.inf)
        best = score.argmin(dim=1)
        caught = closing_now & aligned.any(dim=1)
        self.held = torch.where(caught, best, self.held)
        self.grasped = self.grasped | (caught & (best == self.task))

        # A miss near an object bumps it away from the fingers.
        missed = closing_now & ~caught
        near = missed[:, None] & (dist_xy <= cfg.bump_radius) & (rel[..., 2].abs() <= 0.05)
        push = rel[..., :2] / dist_xy.clamp_min(1e-6)[..., None]
        new_xy = (self.obj_pos[..., :2] + cfg.bump_distance * push).clamp(-1, 1)
        self.obj_pos = torch.cat(
            [torch.where(near[..., None], new_xy, self.obj_pos[..., :2]), self.obj_pos[..., 2:]],
            dim=-1,
        )

        # Drop: a held object falls once the gripper opens past the release closure.
        holding = self.held >= 0
        drop = holding & (self.closure < cfg.release_closure)
        self.held = torch.where(drop, -1, self.held)

        # Held objects follow the fingers; free objects fall to the table.
        is_held = self.held[:, None] == torch.arange(k, device=dev)
        fallen = (self.obj_pos[..., 2] - cfg.fall_speed).clamp_min(0)
        z = torch.where(is_held, self.ee_pos[:, None, 2], fallen)
        xy = torch.where(is_held[..., None], self.ee_pos[:, None, :2], self.obj_pos[..., :2])
        self.obj_pos = torch.cat([xy, z[..., None]], dim=-1)
        self.obj_yaw = torch.where(is_held, self.ee_yaw[:, None], self.obj_yaw)

        # Success: task object resting in the bin, gripper open, arm clear.
        target = self.task[:, None]
        in_bin = self._in_bin().gather(1, target)[:, 0]
        target_z = self.obj_pos[..., 2].gather(1, target)[:, 0]
        success = (
            active
            & in_bin
            & (target_z <= 1e-6)
            & (self.held < 0)
            & (self.closure < cfg.release_closure)
            & (self.ee_pos[:, 2] >= cfg.clear_height)
        )
        self.steps = self.steps + active.long()
        truncated = active & ~success & (self.steps >= cfg.max_steps)
        self.success = self.success | success
        self.done = self.done | success | truncated
        reward = success.float()
        return self._obs(), reward, success, truncated, self._info()

    def state(self) -> InitialState:
        """The current scene as an `InitialState` (gripper closure and held object excluded)."""
        return InitialState(
            self.ee_pos.clone(),
            self.ee_yaw.clone(),
            self.obj_pos.clone(),
            self.obj_yaw.clone(),
            self.bin_pos.clone(),
            self.task.clone(),
        )
