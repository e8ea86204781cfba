"""The three stages as plain classes that `AsyncPipeline` runs as Ray actors.

- `EnvWorker` steps one env shard per task: at each chunk boundary it sends the observations of
  its running episodes to the inference stage, executes the returned chunk open loop, and
  returns the finished `TrajectoryGroup` (which Ray keeps in its object store).
- `InferenceServer` batches observation requests dynamically (up to `max_batch` rows, or once
  every open shard has asked, or after `batch_timeout_s`), runs one forward per batch and
  streams each shard its actions. Weights are swapped as whole snapshots: every forward reads
  one `(version, model)` pair, so no request is ever served by half-applied weights.
- `Learner` takes `B` trajectories at a time from the bounded queue as they arrive, runs
  `decoupled_grpo_update` and publishes the new weights with their version: the whole
  `state_dict` goes into the object store once, and the server swaps it in atomically before
  the learner reports the new version.

Every actor records the intervals during which its stage was busy (`trace()`), on the host's
wall clock, for the stage-activity timeline and the per-stage times.
"""

import asyncio
import copy
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
from torch import nn

from chunkmask.pipeline.config import PipelineConfig
from chunkmask.pipeline.update import (
    TrajectoryGroup,
    collate_groups,
    decoupled_grpo_update,
    make_masker,
)

Interval = tuple[str, float, float]
"""A busy interval of a stage: `(lane, start, end)` in seconds of the host's wall clock."""


class PipelineError(RuntimeError):
    """The pipeline cannot go on (an actor died for good, a stage failed)."""


class PipelineTimeoutError(PipelineError, TimeoutError):
    """A blocking call of the pipeline ran past its timeout."""


def _get(ref: Any, timeout: float, what: str) -> Any:
    """`ray.get` with a timeout that raises `PipelineTimeoutError` naming what was awaited."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError as err:
        raise PipelineTimeoutError(
            f"timed out after {timeout:g} s waiting for {what}; raise `rpc_timeout_s` if the "
            f"stage is just slow."
        ) from err


def _weights_fingerprint(model: nn.Module) -> tuple[float, float]:
    values = [p.detach() for p in model.state_dict().values() if p.is_floating_point()]
    return (min(float(v.min()) for v in values), max(float(v.max()) for v in values))


class InferenceServer:
    """The rollout stage: dynamic batching of observation requests, one forward per batch.

    A request is `infer(stream, obs)` with the observations `(n, obs)` of one env shard's
    running episodes. A batch fires when its rows reach `max_batch`, when every open stream has
    a request waiting, or when its oldest request has waited `batch_timeout_s`. The reply holds
    the sampled `tokens (n, K)`, their `logp (n, K)`, the decoded `actions (n, H, D)` and the
    `version` of the weights used (plus `fingerprint`, the min and max over those weights, when
    `fingerprint_weights` is set).

    Args:
        policy_fn: builds the policy (no arguments); it must provide `sample(obs, *,
            temperature, generator) -> (tokens, logp, entropy)` and `chunk_actions(tokens)`.
        state: the initial `state_dict`, or None to keep `policy_fn`'s weights.
        version: the version of `state`.
        config: the resolved `PipelineConfig`.
    """

    def __init__(
        self,
        policy_fn: Callable[[], nn.Module],
        state: dict[str, torch.Tensor] | None,
        version: int,
        config: PipelineConfig,
    ) -> None:
        torch.set_num_threads(config.threads_per_actor)
        self.config = config
        model = policy_fn()
        if state is not None:
            model.load_state_dict(state)
        model.eval()
        self._template = model
        self._current = (version, model)
        self._pending: list[tuple[int, torch.Tensor, asyncio.Future, float]] = []
        self._open: set[int] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._generator = torch.Generator().manual_seed(config.seed * 7_919 + 1)
        self._trace: list[Interval] = []
        self.forwards = 0
        self.rows = 0

    def _ensure_loop(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def ping(self) -> int:
        """The version of the weights being served."""
        self._ensure_loop()
        return self._current[0]

    async def open_stream(self, stream: int) -> None:
        """Announce a shard that will send requests (batches wait for every open shard)."""
        self._ensure_loop()
        self._open.add(stream)

    async def close_stream(self, stream: int) -> None:
        """Retire a shard (its task finished or its worker died); unknown ids are ignored."""
        self._ensure_loop()
        self._open.discard(stream)
        self._wake.set()

    async def set_weights(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Swap in a complete new snapshot of the weights; returns the version now served.

        The new model is built and loaded aside, then replaces the `(version, model)` pair in
        one assignment: a forward in progress keeps the pair it started with.
        """
        self._ensure_loop()
        if version <= self._current[0]:
            return self._current[0]
        model = copy.deepcopy(self._template)
        model.load_state_dict(state)
        model.eval()
        self._current = (version, model)
        return version

    async def infer(self, stream: int, obs: torch.Tensor) -> dict[str, Any]:
        """Queue the observations of one shard for the next batch; returns its slice."""
        self._ensure_loop()
        future = asyncio.get_running_loop().create_future()
        self._pending.append((stream, obs, future, time.monotonic()))
        self._wake.set()
        return await future

    def _ready(self) -> bool:
        rows = sum(p[1].shape[0] for p in self._pending)
        if rows >= self.config.max_batch:
            return True
        waiting = {p[0] for p in self._pending}
        return self._open <= waiting

    async def _batch_loop(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            deadline = self._pending[0][3] + self.config.batch_timeout_s
            while not self._ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch, self._pending = self._pending, []
            try:
                replies = self._forward(batch)
            except Exception as err:  # hand the failure to every caller of the batch
                for _, _, future, _ in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, _, future, _), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)

    def _forward(self, batch: list) -> list[dict[str, Any]]:
        start = time.time()
        version, model = self._current  # one snapshot for the whole batch
        obs = torch.cat([p[1] for p in batch])
        with torch.no_grad():
            tokens, logp, _ = model.sample(
                obs, temperature=self.config.temperature, generator=self._generator
            )
            actions = model.chunk_actions(tokens)
        fingerprint = _weights_fingerprint(model) if self.config.fingerprint_weights else None
        self.forwards += 1
        self.rows += obs.shape[0]
        replies, row = [], 0
        for p in batch:
            n = p[1].shape[0]
            part = slice(row, row + n)
            row += n
            replies.append(
                {
                    "tokens": tokens[part].clone(),
                    "logp": logp[part].clone(),
                    "actions": actions[part].clone(),
                    "version": version,
                    "fingerprint": fingerprint,
                    "batch_rows": obs.shape[0],
                }
            )
        self._trace.append(("rollout", start, time.time()))
        return replies

    async def reset(self, state: dict[str, torch.Tensor], config: PipelineConfig) -> None:
        """Serve `state` as version 0 under a new configuration; clear streams, trace, counters."""
        self._ensure_loop()
        model = copy.deepcopy(self._template)
        model.load_state_dict(state)
        model.eval()
        self.config = config
        self._current = (0, model)
        self._open.clear()
        self._generator = torch.Generator().manual_seed(config.seed * 7_919 + 1)
        self._trace, self.forwards, self.rows = [], 0, 0

    async def trace(self) -> list[Interval]:
        """The busy intervals recorded so far."""
        return list(self._trace)

    async def stats(self) -> dict[str, Any]:
        """Forwards run, rows served and the version being served."""
        return {"forwards": self.forwards, "rows": self.rows, "version": self._current[0]}


class EnvWorker:
    """An env stage actor: runs one shard of `num_envs` episodes per task.

    Args:
        env_fn: `env_fn(num_envs)` builds a gymnasium-style vector env whose `reset(seed=,
            options=)` and `step(actions)` take and return torch tensors (wrap numpy envs).
        num_envs: episodes per task.
        server: the `InferenceServer` actor handle.
        reset_options: `reset_options(seed, num_envs)` gives the `options` of `env.reset` for a
            task (for GRPO groups: the same initial state `group_size` times in a row), or None.
        config: the resolved `PipelineConfig`.
        index: the worker's index (its trace lane is `env{index}`).
    """

    def __init__(
        self,
        env_fn: Callable[[int], Any],
        num_envs: int,
        server: Any,
        reset_options: Callable[[int, int], dict | None] | None,
        config: PipelineConfig,
        index: int,
    ) -> None:
        torch.set_num_threads(config.threads_per_actor)
        self.env = env_fn(num_envs)
        self.num_envs = num_envs
        self.server = server
        self.reset_options = reset_options
        self.config = config
        self.lane = f"env{index}"
        self._trace: list[Interval] = []

    def ping(self) -> str:
        """Liveness check; returns the trace lane."""
        return self.lane

    def run_task(self, task_id: int, seed: int) -> tuple[int, TrajectoryGroup]:
        """Run one episode per sub-environment from the task's initial states.

        Each chunk: one request to the inference stage with the running episodes' observations
        (the stream id is `task_id`), then `H` env steps. Closes the stream when done.

        Returns:
            `(env_steps, group)`: the env steps taken and the finished `TrajectoryGroup` (the
            pipeline calls this with `num_returns=2`, so that the driver reads the small count
            and only passes a reference to the trajectories on to the learner).
        """
        cfg = self.config
        n, num_chunks = self.num_envs, cfg.max_chunks
        options = None if self.reset_options is None else self.reset_options(seed, n)
        t = time.time()
        obs, _ = self.env.reset(seed=seed, options=options)
        obs = torch.as_tensor(obs, dtype=torch.float32)
        done = torch.zeros(n, dtype=torch.bool)
        returns = torch.zeros(n)
        success = torch.zeros(n, dtype=torch.bool)
        steps = torch.zeros(n, dtype=torch.long)
        reported = False  # whether the env reports `info["success"]`
        buf: dict[str, torch.Tensor] = {}
        valid = torch.zeros(n, num_chunks, dtype=torch.bool)
        versions = torch.zeros(n, num_chunks, dtype=torch.long)
        self._trace.append((self.lane, t, time.time()))
        try:
            for c in range(num_chunks):
                idx = (~done).nonzero()[:, 0]
                if idx.numel() == 0:
                    break
                reply = _get(
                    self.server.infer.remote(task_id, obs[idx]),
                    cfg.rpc_timeout_s,
                    f"the inference stage's reply to task {task_id}, chunk {c}",
                )
                t = time.time()
                if not buf:
                    buf = {
                        "obs": torch.zeros(n, num_chunks, obs.shape[1]),
                        "tokens": torch.zeros(
                            n, num_chunks, reply["tokens"].shape[1], dtype=torch.long
                        ),
                        "logp": torch.zeros(n, num_chunks, reply["logp"].shape[1]),
                        "actions": torch.zeros(n, num_chunks, *reply["actions"].shape[1:]),
                    }
                valid[idx, c] = True
                versions[idx, c] = reply["version"]
                buf["obs"][idx, c] = obs[idx]
                buf["tokens"][idx, c] = reply["tokens"]
                buf["logp"][idx, c] = reply["logp"]
                buf["actions"][idx, c] = reply["actions"]
                chunk = torch.zeros(n, *reply["actions"].shape[1:])
                chunk[idx] = reply["actions"]
                for h in range(chunk.shape[1]):
                    running = ~done
                    obs, reward, terminated, truncated, info = self.env.step(chunk[:, h])
                    obs = torch.as_tensor(obs, dtype=torch.float32)
                    reward = torch.as_tensor(reward, dtype=torch.float32)
                    ended = torch.as_tensor(terminated) | torch.as_tensor(truncated)
                    returns += torch.where(running, reward, 0.0)
                    steps += running.long()
                    if isinstance(info, dict) and "success" in info:
                        reported = True
                        success |= running & torch.as_tensor(info["success"]).bool()
                    done |= running & ended
                self._trace.append((self.lane, t, time.time()))
        finally:
            self.server.close_stream.remote(task_id)  # fire and forget: never blocks the task
        if not reported:  # no success flag: a positive return counts as success
            success = returns > 0
        return int(steps.sum()), TrajectoryGroup(
            obs=buf["obs"],
            tokens=buf["tokens"],
            logp=buf["logp"],
            actions=buf["actions"],
            valid=valid,
            versions=versions,
            returns=returns,
            success=success,
            steps=steps,
            group=torch.arange(n) // self.config.group_size,
            task_id=torch.tensor(task_id),
        )

    def trace(self) -> list[Interval]:
        """The busy intervals recorded so far (lost when the actor restarts)."""
        return list(self._trace)

    def reset(self, config: PipelineConfig) -> None:
        """Take a new configuration (same shard size) and clear the trace."""
        self.config = config
        self._trace = []


class Learner:
    """The update stage: consumes finished tasks from the queue and publishes versioned weights.

    Args:
        policy_fn: builds the policy (no arguments).
        state: the initial `state_dict`, or None to keep `policy_fn`'s weights.
        queue: the bounded `ray.util.queue.Queue` of finished tasks (each item `[ObjectRef]`
            of a `TrajectoryGroup`).
        server: the `InferenceServer` actor handle.
        config: the resolved `PipelineConfig`.
    """

    def __init__(
        self,
        policy_fn: Callable[[], nn.Module],
        state: dict[str, torch.Tensor] | None,
        queue: Any,
        server: Any,
        config: PipelineConfig,
    ) -> None:
        torch.set_num_threads(config.threads_per_actor)
        torch.manual_seed(config.seed)
        self.policy = policy_fn()
        self.server = server
        self.reset(state, queue, config)

    def reset(
        self, state: dict[str, torch.Tensor] | None, queue: Any, config: PipelineConfig
    ) -> None:
        """Start over at version 0 from `state`: new optimiser, masker, queue, configuration."""
        if state is not None:
            self.policy.load_state_dict(state)
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.masker = make_masker(config) if config.selector == "pcm" else None
        self.queue = queue
        self.config = config
        self.version = 0
        self._trace: list[Interval] = []
        self._snapshots: list[tuple[int, float, dict[str, torch.Tensor]]] = []

    def ping(self) -> int:
        """The learner's version."""
        return self.version

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

    def snapshot(self) -> None:
        """Keep a copy of the current weights, stamped with the version and the wall clock."""
        self._snapshots.append((self.version, time.time(), self._state()))

    def train_step(self) -> dict[str, Any]:
        """Take `B` trajectories from the queue, update, publish; returns the update's record."""
        cfg = self.config
        t_wait = time.time()
        groups: list[TrajectoryGroup] = []
        for _ in range(cfg.tasks_per_update):
            try:
                item = self.queue.get(block=True, timeout=cfg.rpc_timeout_s)
            except Exception as err:  # ray.util.queue.Empty
                raise PipelineTimeoutError(
                    f"the learner waited {cfg.rpc_timeout_s:g} s for a finished task "
                    f"(version {self.version}, {len(groups)} of {cfg.tasks_per_update} tasks "
                    f"received); are the env workers alive?"
                ) from err
            groups.append(_get(item[0], cfg.rpc_timeout_s, "a finished task's trajectories"))
        t_start = time.time()
        batch = collate_groups(groups)
        record = decoupled_grpo_update(
            self.policy, self.optimizer, batch, version=self.version, config=cfg,
            masker=self.masker,
        )
        t_update = time.time()
        self._trace.append(("update", t_start, t_update))
        self.version += 1
        state_ref = ray.put(self._state())
        served = _get(
            self.server.set_weights.remote(self.version, state_ref),
            cfg.rpc_timeout_s,
            f"the inference stage to load version {self.version}",
        )
        t_end = time.time()
        self._trace.append(("publish", t_update, t_end))
        if cfg.snapshot_every is not None and self.version % cfg.snapshot_every == 0:
            self.snapshot()
        record.update(
            version=self.version,
            served_version=served,
            wait_s=t_start - t_wait,
            update_s=t_update - t_start,
            publish_s=t_end - t_update,
            t_end=t_end,
            env_steps=int(batch.steps.sum()),
            task_ids=[int(g.task_id) for g in groups],
        )
        return record

    def trace(self) -> list[Interval]:
        """The busy intervals recorded so far."""
        return list(self._trace)

    def snapshots(self) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
        """The kept `(version, wall clock, state_dict)` snapshots."""
        return list(self._snapshots)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current policy weights."""
        return self._state()
