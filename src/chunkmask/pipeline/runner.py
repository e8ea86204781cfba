"""`AsyncPipeline`: the driver that admits rollouts, hands finished tasks to the learner, and recovers.

The driver process owns the `StalenessGate` and the learner's version as it last reported it.
Its loop:

1. **dispatch**: while an env worker is idle and the gate admits a whole task
   (`StalenessGate.capacity(v) >= envs_per_worker`), open the task's stream on the inference
   stage and start `EnvWorker.run_task` on that worker;
2. **collect**: `ray.wait` on the running tasks and on the learner's `train_step`. A finished
   task's trajectories stay in Ray's object store; the driver puts a reference to them into the
   bounded `ray.util.queue.Queue` (a blocking put with a timeout: nothing is ever dropped to make
   room) and marks the task's trajectories accepted in the gate. A task whose worker died
   (`ray.exceptions.RayActorError`) is dropped and counted (`dropped_in_flight`); Ray restarts
   the worker (`max_restarts`) and the driver gives it new work. Trajectories already handed
   over are unaffected: they live in the object store, not in the worker;
3. **update**: the learner runs `train_step` whenever it is idle; it blocks on the queue until
   `B` trajectories arrived, updates, publishes the new weights and returns the record.

`"sync"` differs from the asynchronous modes only by its parameters: `max_staleness = 0` makes
the gate admit batch `v + 1` only once version `v + 1` is published, and the inference stage
waits for every open shard before a forward (turn-taking). `"async-rollout"` admits one batch
ahead (`max_staleness = 1`), so the rollouts of `v + 1` run during the update of `v`.
`"full-async"` also streams every shard's requests to the inference stage without waiting for
the others, so env stepping and inference overlap.
"""

import contextlib
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import ray
import torch
from ray.util.queue import Full, Queue
from torch import nn

from chunkmask.offpolicy import StalenessGate
from chunkmask.pipeline.actors import (
    EnvWorker,
    InferenceServer,
    Learner,
    PipelineError,
    PipelineTimeoutError,
    _get,
)
from chunkmask.pipeline.config import PipelineConfig

log = logging.getLogger("chunkmask.pipeline")

DEFAULT_OBJECT_STORE_BYTES = 200 * 1024**2
"""Object store size of a local Ray instance started by the pipeline (200 MiB)."""


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    temp_dir: str | None = None,
    num_cpus: int | float | None = None,
    object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES,
    **init_kwargs: Any,
) -> Iterator[None]:
    """Start Ray locally (or attach to `address`) for the block, and shut it down afterwards.

    If Ray is already initialised the block runs in that instance and leaves it running.

    Args:
        address: a cluster address (`"auto"`, `"ray://host:10001"`, ...); None starts a local
            instance on this machine.
        temp_dir: Ray's session directory root (`_temp_dir`); keep it short (Unix socket paths
            are limited to about 100 characters). Local instances only.
        num_cpus: CPUs of a local instance (None: all).
        object_store_memory: object store bytes of a local instance.
        **init_kwargs: more keyword arguments of `ray.init`.

    Raises:
        ValueError: if `temp_dir` is not an absolute path, or local-only options are given
            with an `address`.
    """
    if temp_dir is not None and not os.path.isabs(temp_dir):
        raise ValueError(f"`temp_dir` must be an absolute path, got {temp_dir!r}.")
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, **init_kwargs}
        if address is None:
            kwargs.setdefault("include_dashboard", False)
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=object_store_memory,
                _temp_dir=temp_dir,
                **kwargs,
            )
        else:
            if temp_dir is not None or num_cpus is not None:
                raise ValueError(
                    "`temp_dir` and `num_cpus` configure a local instance: they must be None "
                    f"with `address`={address!r}."
                )
            ray.init(address=address, **kwargs)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class PipelineResult(NamedTuple):
    """What `AsyncPipeline.run` returns.

    Attributes:
        records: one dict per learner update (see `decoupled_grpo_update` and
            `Learner.train_step`), with `wall_s` since the start of the run.
        wall_s: the run's wall-clock time.
        version: the learner's version at the end.
        counters: `tasks_dispatched`, `tasks_completed`, `trajectories_accepted`,
            `dropped_in_flight` (trajectories lost with a dead worker), `stale_dropped`
            (trajectories the learner's `staleness_filter` dropped), `worker_failures`,
            `env_steps` (of completed tasks).
        throughput: `env_steps_per_s`, `trajectories_per_s` (consumed by the learner) and
            `updates_per_s` over the run.
    """

    records: list[dict[str, Any]]
    wall_s: float
    version: int
    counters: dict[str, int]
    throughput: dict[str, float]


def stage_busy_time(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals` clipped to `[start, end]` (a stage's busy time).

    Example:
        >>> stage_busy_time([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)], 0.0, 5.5)
        3.5
    """
    total, cursor = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, cursor), min(b, end)
        if b > a:
            total += b - a
            cursor = b
    return total


class AsyncPipeline:
    """A GRPO/PCM training pipeline on Ray: env workers, an inference stage, a learner.

    Args:
        env_fn: `env_fn(num_envs)` builds a gymnasium-style vector env with torch arrays (see
            `EnvWorker`); pickled to the workers (use a module-level function or a
            `functools.partial` of one, e.g. `pickplace_env_fn`).
        policy_fn: builds the chunked policy (see `InferenceServer`; `log_prob` for the
            learner).
        config: the `PipelineConfig`.
        policy_state: initial weights (version 0), or None for those of `policy_fn()` built once
            in the driver under `torch.manual_seed(config.seed)`.
        reset_options: `reset_options(seed, num_envs)`, the `options` of `env.reset` per task.
        address: attach to this Ray cluster when Ray is not initialised yet; None starts Ray
            on this machine (then `close` shuts it down).
        temp_dir: Ray's temporary directory for a local start.
        object_store_memory: object store bytes for a local start.

    Example:
        A sketch (it starts Ray, so it is not run as a doctest)::

            from chunkmask.pipeline import AsyncPipeline, PipelineConfig
            from chunkmask.testbed import pickplace_env_fn, pickplace_policy_fn, ...
            cfg = PipelineConfig(mode="full-async", selector="pcm")
            with AsyncPipeline(pickplace_env_fn(), pickplace_policy_fn(), cfg,
                               reset_options=pickplace_reset_options(cfg.group_size)) as pipe:
                result = pipe.run(num_updates=20)
    """

    def __init__(
        self,
        env_fn: Callable[[int], Any],
        policy_fn: Callable[[], nn.Module],
        config: PipelineConfig,
        *,
        policy_state: dict[str, torch.Tensor] | None = None,
        reset_options: Callable[[int, int], dict | None] | None = None,
        address: str | None = None,
        temp_dir: str | None = None,
        object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
    ) -> None:
        if not callable(env_fn):
            raise TypeError(f"`env_fn` must be callable, got {type(env_fn).__name__}.")
        if not callable(policy_fn):
            raise TypeError(f"`policy_fn` must be callable, got {type(policy_fn).__name__}.")
        if not isinstance(config, PipelineConfig):
            raise TypeError(f"`config` must be a PipelineConfig, got {type(config).__name__}.")
        if reset_options is not None and not callable(reset_options):
            raise TypeError(
                f"`reset_options` must be callable or None, got {type(reset_options).__name__}."
            )
        self.config = config.resolved()
        self._session: contextlib.AbstractContextManager | None = None
        if not ray.is_initialized():
            self._session = ray_session(
                address,
                temp_dir=temp_dir or tempfile.mkdtemp(prefix="cmray"),
                object_store_memory=object_store_memory,
            ) if address is None else ray_session(address)
            self._session.__enter__()
        self._closed = False
        self._actors: list[Any] = []
        try:
            self._start(env_fn, policy_fn, policy_state, reset_options)
        except BaseException:
            self.close()
            raise
        self._reset_driver()

    def _reset_driver(self) -> None:
        cfg = self.config
        self.gate = StalenessGate(
            cfg.trajectories_per_update, cfg.max_staleness, max_concurrent=cfg.max_concurrent
        )
        self.version = 0
        self.counters = {
            "tasks_dispatched": 0,
            "tasks_completed": 0,
            "trajectories_accepted": 0,
            "dropped_in_flight": 0,
            "stale_dropped": 0,
            "worker_failures": 0,
            "env_steps": 0,
        }
        self._inflight: dict[Any, tuple[int, int, Any]] = {}
        self._pings: dict[Any, tuple[int, float]] = {}
        self.task_log: list[tuple[int, int, str]] = []
        """`(task_id, worker, outcome)` per finished task; outcome `"queued"` or `"dropped"`."""
        self._idle: deque[int] = deque(range(cfg.num_env_workers))
        self._next_task = getattr(self, "_next_task", 0)  # stream ids stay unique
        self._learner_ref: Any = None

    def _start(self, env_fn, policy_fn, policy_state, reset_options) -> None:
        cfg = self.config
        cpus = cfg.actor_num_cpus
        self._policy_fn = policy_fn
        state_ref = ray.put(self._initial_state(policy_state))
        self.queue = Queue(maxsize=cfg.queue_capacity, actor_options={"num_cpus": 0})
        self._actors.append(self.queue.actor)
        self.server = (
            ray.remote(InferenceServer)
            .options(num_cpus=cpus, max_restarts=0, max_concurrency=10_000)
            .remote(policy_fn, state_ref, 0, cfg)
        )
        self._actors.append(self.server)
        self.learner = (
            ray.remote(Learner)
            .options(num_cpus=cpus, max_restarts=0)
            .remote(policy_fn, state_ref, self.queue, self.server, cfg)
        )
        self._actors.append(self.learner)
        worker_cls = ray.remote(EnvWorker).options(
            num_cpus=cpus, max_restarts=cfg.worker_max_restarts, max_task_retries=0
        )
        self.env_workers = [
            worker_cls.remote(env_fn, cfg.envs_per_worker, self.server, reset_options, cfg, i)
            for i in range(cfg.num_env_workers)
        ]
        self._actors.extend(self.env_workers)
        pings = [a.ping.remote() for a in (self.server, self.learner, *self.env_workers)]
        try:
            _get(pings, cfg.startup_timeout_s, "the pipeline's actors to start")
        except ray.exceptions.RayActorError as err:
            raise PipelineError(f"an actor failed to start: {err}") from err
        if cfg.snapshot_every is not None:
            _get(self.learner.snapshot.remote(), cfg.rpc_timeout_s, "the initial snapshot")

    def _initial_state(self, policy_state: dict | None) -> dict[str, torch.Tensor]:
        if policy_state is None:  # one initialisation shared by the learner and the server
            torch.manual_seed(self.config.seed)
            policy_state = self._policy_fn().state_dict()
        return policy_state

    # Fields that size the actors: `reset` cannot change them.
    _STRUCTURAL = ("num_env_workers", "envs_per_worker", "threads_per_actor", "actor_num_cpus",
                   "worker_max_restarts")

    def reset(
        self,
        config: PipelineConfig | None = None,
        *,
        policy_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Start a fresh run on the same actors: version 0, new weights and configuration.

        Waits for the tasks still in flight and discards them, empties the queue, and resets the
        learner (weights, optimiser, masker, snapshots), the inference stage and the gate. This
        saves the actors' start-up (seconds: each imports torch) between runs.

        Args:
            config: the new configuration (None keeps the current one); its
                `num_env_workers`, `envs_per_worker`, `threads_per_actor`, `actor_num_cpus` and
                `worker_max_restarts` must equal the current ones.
            policy_state: the weights of version 0 (None: `policy_fn()` under
                `torch.manual_seed(config.seed)`).

        Raises:
            TypeError: if `config` is not a `PipelineConfig`.
            ValueError: if `config` changes a field that sizes the actors.
            PipelineTimeoutError: if the tasks in flight do not finish within `rpc_timeout_s`.
        """
        if self._closed:
            raise PipelineError("the pipeline is closed.")
        if config is None:
            config = self.config
        if not isinstance(config, PipelineConfig):
            raise TypeError(f"`config` must be a PipelineConfig, got {type(config).__name__}.")
        new = config.resolved()
        for name in self._STRUCTURAL:
            if getattr(new, name) != getattr(self.config, name):
                raise ValueError(
                    f"`config.{name}` must stay {getattr(self.config, name)!r} in `reset` "
                    f"(it sizes the actors), got {getattr(new, name)!r}; build a new pipeline."
                )
        timeout = self.config.rpc_timeout_s
        refs = [*self._inflight, *self._pings]
        if self._learner_ref is not None:
            refs.append(self._learner_ref)
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
            if len(ready) < len(refs):
                raise PipelineTimeoutError(
                    f"{len(refs) - len(ready)} tasks were still running after {timeout:g} s."
                )
        for ref in self._pings:  # a recovering worker: wait until it answers
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(ref, timeout=timeout)
        self.config = new
        if new.queue_capacity != self.queue.maxsize:
            old = self.queue
            self.queue = Queue(maxsize=new.queue_capacity, actor_options={"num_cpus": 0})
            self._actors.append(self.queue.actor)
            with contextlib.suppress(Exception):
                ray.kill(old.actor, no_restart=True)
        else:
            while not self.queue.empty():
                self.queue.get_nowait_batch(self.queue.qsize())
        state_ref = ray.put(self._initial_state(policy_state))
        _get(
            [
                self.server.reset.remote(state_ref, new),
                self.learner.reset.remote(state_ref, self.queue, new),
                *(w.reset.remote(new) for w in self.env_workers),
            ],
            timeout,
            "the actors to reset",
        )
        if new.snapshot_every is not None:
            _get(self.learner.snapshot.remote(), timeout, "the initial snapshot")
        self._reset_driver()

    # ------------------------------------------------------------------ driver loop
    def _dispatch(self, target_version: int) -> None:
        cfg = self.config
        shard = cfg.envs_per_worker
        need = target_version * cfg.trajectories_per_update
        while (
            self._idle
            and self.gate.capacity(self.version) >= shard
            and self.gate.accepted + self.gate.running + shard <= need
        ):
            worker = self._idle.popleft()
            task_id = self._next_task
            self._next_task += 1
            for _ in range(shard):
                self.gate.try_start(self.version)
            _get(self.server.open_stream.remote(task_id), cfg.rpc_timeout_s, "open_stream")
            seed = cfg.seed * 1_000_003 + task_id
            summary_ref, group_ref = (
                self.env_workers[worker].run_task.options(num_returns=2).remote(task_id, seed)
            )
            self._inflight[summary_ref] = (worker, task_id, group_ref)
            self.counters["tasks_dispatched"] += 1

    def _finish_task(self, ref: Any) -> None:
        cfg = self.config
        worker, task_id, group_ref = self._inflight.pop(ref)
        shard = cfg.envs_per_worker
        try:
            summary = ray.get(ref, timeout=cfg.rpc_timeout_s)
        except ray.exceptions.RayActorError as err:
            for _ in range(shard):
                self.gate.finish(accepted=False)
            self.server.close_stream.remote(task_id)
            self.counters["dropped_in_flight"] += shard
            self.counters["worker_failures"] += 1
            log.warning(
                "env worker %d died during task %d; %d in-flight trajectories dropped, Ray "
                "restarts the worker (%s)", worker, task_id, shard, type(err).__name__,
            )
            if self.counters["worker_failures"] > cfg.max_worker_failures:
                raise PipelineError(
                    f"{self.counters['worker_failures']} env worker failures exceed "
                    f"`max_worker_failures`={cfg.max_worker_failures}."
                ) from err
            self.task_log.append((task_id, worker, "dropped"))
            self._recover(worker, time.monotonic() + cfg.startup_timeout_s)
            return
        except ray.exceptions.RayTaskError as err:
            raise PipelineError(f"env worker {worker} failed on task {task_id}: {err}") from err
        try:
            self.queue.put([group_ref], block=True, timeout=cfg.rpc_timeout_s)
        except Full as err:
            raise PipelineTimeoutError(
                f"the finished-task queue stayed full ({cfg.queue_capacity} tasks) for "
                f"{cfg.rpc_timeout_s:g} s: the learner is not consuming."
            ) from err
        for _ in range(shard):
            self.gate.finish(accepted=True)
        self.counters["tasks_completed"] += 1
        self.counters["trajectories_accepted"] += shard
        self.counters["env_steps"] += summary
        self.task_log.append((task_id, worker, "queued"))
        self._idle.append(worker)

    def _recover(self, worker: int, deadline: float) -> None:
        """Ping a restarting worker; it gets new work once the ping answers."""
        self._pings[self.env_workers[worker].ping.remote()] = (worker, deadline)

    def _finish_ping(self, ref: Any) -> None:
        worker, deadline = self._pings.pop(ref)
        try:
            ray.get(ref, timeout=self.config.rpc_timeout_s)
        except ray.exceptions.ActorUnavailableError as err:  # still restarting
            if time.monotonic() > deadline:
                raise PipelineTimeoutError(
                    f"env worker {worker} did not come back within `startup_timeout_s`="
                    f"{self.config.startup_timeout_s:g} s after a failure."
                ) from err
            time.sleep(0.1)
            self._recover(worker, deadline)
            return
        except ray.exceptions.RayActorError as err:
            raise PipelineError(
                f"env worker {worker} died for good (its `worker_max_restarts`="
                f"{self.config.worker_max_restarts} restarts are used up): {err}"
            ) from err
        log.info("env worker %d is back", worker)
        self._idle.append(worker)

    def run(
        self,
        num_updates: int,
        *,
        time_budget_s: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> PipelineResult:
        """Run until the learner has taken `num_updates` more steps (or the time budget ends).

        Args:
            num_updates: learner updates to run.
            time_budget_s: start no new update after this many seconds.
            on_update: called with each update's record, in the driver, as it arrives (the
                run carries on meanwhile on the actors).

        Returns:
            The `PipelineResult` of this run (counters are cumulative over runs).

        Raises:
            PipelineTimeoutError: if nothing finishes for `stall_timeout_s`, or a blocking call
                times out.
            PipelineError: if the learner or the inference stage fails, or env workers fail
                more than `max_worker_failures` times.
        """
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 1:
            raise ValueError(f"`num_updates` must be a positive int, got {num_updates!r}.")
        if self._closed:
            raise PipelineError("the pipeline is closed.")
        cfg = self.config
        t0 = time.time()
        target = self.version + num_updates
        records: list[dict[str, Any]] = []
        last_progress = time.monotonic()
        start_counters = dict(self.counters)
        while True:
            out_of_time = time_budget_s is not None and time.time() - t0 >= time_budget_s
            if not out_of_time:
                self._dispatch(target)
            if self._learner_ref is None and self.version < target and not out_of_time:
                self._learner_ref = self.learner.train_step.remote()
            if self._learner_ref is None:
                break
            refs = [*self._inflight, *self._pings, self._learner_ref]
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            if not ready:
                if time.monotonic() - last_progress > cfg.stall_timeout_s:
                    raise PipelineTimeoutError(
                        f"no task or update finished for {cfg.stall_timeout_s:g} s "
                        f"(version {self.version}, {len(self._inflight)} tasks running, "
                        f"gate {self.gate!r}); raise `stall_timeout_s` if the stages are slow."
                    )
                continue
            last_progress = time.monotonic()
            for ref in ready:
                if ref == self._learner_ref:
                    self._learner_ref = None
                    try:
                        record = ray.get(ref, timeout=cfg.rpc_timeout_s)
                    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
                        raise PipelineError(f"the learner failed: {err}") from err
                    self.version = record["version"]
                    self.counters["stale_dropped"] += record["stale_dropped"]
                    record["wall_s"] = record["t_end"] - t0
                    records.append(record)
                    if on_update is not None:
                        on_update(record)
                elif ref in self._pings:
                    self._finish_ping(ref)
                else:
                    self._finish_task(ref)
        wall = time.time() - t0
        done = {k: self.counters[k] - start_counters[k] for k in self.counters}
        consumed = sum(r["trajectories"] for r in records)
        throughput = {
            "env_steps_per_s": done["env_steps"] / wall,
            "trajectories_per_s": consumed / wall,
            "updates_per_s": len(records) / wall,
        }
        return PipelineResult(records, wall, self.version, dict(self.counters), throughput)

    # ------------------------------------------------------------------ inspection
    def running_tasks(self) -> list[tuple[int, int]]:
        """`(worker, task_id)` of every task in flight."""
        return [(worker, task_id) for worker, task_id, _ in self._inflight.values()]

    def traces(self) -> dict[str, list[tuple[float, float]]]:
        """Busy intervals per lane (`env0`, ..., `rollout`, `update`, `publish`).

        Call between runs (an env worker's intervals are lost when it restarts).
        """
        cfg = self.config
        refs = [a.trace.remote() for a in (*self.env_workers, self.server, self.learner)]
        lanes: dict[str, list[tuple[float, float]]] = {}
        for part in _get(refs, cfg.rpc_timeout_s, "the stage traces"):
            for lane, a, b in part:
                lanes.setdefault(lane, []).append((a, b))
        return lanes

    def snapshots(self) -> list[tuple[int, float, dict[str, torch.Tensor]]]:
        """The learner's `(version, wall clock, state_dict)` snapshots (`snapshot_every`)."""
        return _get(self.learner.snapshots.remote(), self.config.rpc_timeout_s, "the snapshots")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learner's current weights."""
        return _get(self.learner.state_dict.remote(), self.config.rpc_timeout_s, "the weights")

    def server_stats(self) -> dict[str, Any]:
        """The inference stage's counters: forwards, rows and the version it serves."""
        return _get(self.server.stats.remote(), self.config.rpc_timeout_s, "the server stats")

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Kill the pipeline's actors (and shut Ray down if the pipeline started it)."""
        if self._closed:
            return
        self._closed = True
        for actor in getattr(self, "_actors", []):
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = None

    def __enter__(self) -> "AsyncPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

