"""`PipelineConfig`: the sizes, modes and operational limits of an asynchronous pipeline.

Plain Python, no Ray: the dataclass validates itself and resolves the mode-dependent defaults
(`max_staleness`, the inference batching, the queue capacity) in `resolved()`.
"""

from dataclasses import dataclass, replace
from typing import Literal

from chunkmask._checks import check_bool, check_option, check_positive_int, check_range
from chunkmask.optim_config import OptimConfig

Mode = Literal["sync", "async-rollout", "full-async"]
MODES: tuple[str, ...] = ("sync", "async-rollout", "full-async")
"""The pipeline modes, from no overlap to full overlap of the three stages."""

SELECTORS: tuple[str, ...] = ("full", "pcm")
"""Chunk selectors of the learner: every executed chunk (GRPO) or PCM's masker."""


@dataclass
class PipelineConfig(OptimConfig):
    """Configuration of an `AsyncPipeline`.

    The optimisation fields (`temperature`, `lr`, `weight_decay`, `grad_clip`, `clip_low`,
    `clip_high`; keyword-only) and the `clip` property come from `chunkmask.optim_config.OptimConfig`, shared
    with the testbed's `TrainConfig`.

    The unit of work is a *task*: one env worker runs `envs_per_worker` episodes in lockstep (a
    shard of `envs_per_worker / group_size` prompts times `group_size` rollouts each). The
    learner takes one AdamW step per `trajectories_per_update` trajectories (`B`).

    Attributes:
        mode: `"sync"` (rollouts of version `v` fill batch `v`, then the update runs; the env
            shards and the inference stage take turns), `"async-rollout"` (the update of
            version `v` overlaps the rollouts of `v + 1`; env and inference still take turns) or
            `"full-async"` (additionally, each env shard streams its requests to the inference
            stage as soon as it has stepped, so env stepping and inference overlap).
        selector: `"full"` (every executed chunk enters the update, GRPO) or `"pcm"`
            (`ProbabilisticChunkMasker` draws `budget` chunks per trajectory).
        num_env_workers: env worker actors (each steps one shard at a time).
        envs_per_worker: episodes per task (the shard size); a multiple of `group_size`.
        group_size: rollouts per prompt, `G`.
        trajectories_per_update: `B`, a multiple of `envs_per_worker`.
        max_chunks: chunk slots per trajectory, `N` (an episode stops after `N` chunks).
        max_staleness: `eta`, the staleness bound of the gate and the filter; None gives 0 for
            `"sync"` and 1 otherwise. `"sync"` requires 0.
        max_concurrent: concurrency cap of `StalenessGate` in trajectories (None: no cap beyond
            the number of env workers).
        max_batch: the inference stage fires a forward once this many observation rows wait;
            None gives all env rows (`num_env_workers * envs_per_worker`) in the turn-taking
            modes and one shard in `"full-async"`.
        batch_timeout_s: the longest a request waits for a batch to fill; None gives 0.5 s (a
            safety net: turn-taking batches fire once every open shard has asked) in the
            turn-taking modes and 2 ms in `"full-async"`.
        temperature: sampling temperature of rollouts and of the learner's log-probabilities.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        clip_low: surrogate clip `eps_low`.
        clip_high: surrogate clip `eps_high`. The default 0.4 is the testbed's tuned value (the
            testbed's `TrainConfig` uses the same; see `OptimConfig`), wider than the library's
            `Clip` default of 0.28 (DAPO's clip-higher); `clip` builds the loss's `Clip` from
            `clip_low` and `clip_high`.
        behaviour_weight_cap: cap of the behaviour weight `pi_prox / pi_behav` of
            `decoupled_ppo_loss` (None: no cap).
        cap_mode: `"mask"` or `"clamp"` (see `decoupled_ppo_loss`).
        loss_agg_mode: the loss aggregation mode.
        budget: PCM's chunks per trajectory, `B_c`.
        refresh_every: PCM's keep-probability refresh period.
        p_min: PCM's keep-probability floor.
        snapshot_every: keep a copy of the weights every this many versions (for offline
            evaluation of learning curves), or None.
        queue_capacity: capacity of the finished-task queue (tasks); None gives
            `(eta + 1) * B / envs_per_worker + num_env_workers`, which the gate never exceeds.
        threads_per_actor: `torch.set_num_threads` in every actor.
        actor_num_cpus: Ray `num_cpus` of each actor (fractional: the stages share the cores).
        worker_max_restarts: Ray `max_restarts` of each env worker (-1: unlimited).
        max_worker_failures: give up after this many env worker failures in one pipeline.
        startup_timeout_s: the longest the actors may take to come up.
        rpc_timeout_s: the timeout of every other blocking call (inference replies, queue puts
            and gets, weight publication).
        stall_timeout_s: the longest the driver waits without any task or update finishing.
        fingerprint_weights: make every inference reply carry the min and max over all weights
            used for it (a test hook: the torn-weights check; costs one pass over the weights).
        seed: seeds prompts, sampling and the masker.
    """

    mode: Mode = "full-async"
    selector: Literal["full", "pcm"] = "full"
    num_env_workers: int = 2
    envs_per_worker: int = 32
    group_size: int = 8
    trajectories_per_update: int = 64
    max_chunks: int = 64
    max_staleness: int | None = None
    max_concurrent: int | None = None
    max_batch: int | None = None
    batch_timeout_s: float | None = None
    behaviour_weight_cap: float | None = 2.0
    cap_mode: Literal["mask", "clamp"] = "mask"
    loss_agg_mode: str = "seq-mean-token-mean"
    budget: int = 12
    refresh_every: int = 5
    p_min: float = 0.1
    snapshot_every: int | None = None
    queue_capacity: int | None = None
    threads_per_actor: int = 1
    actor_num_cpus: float = 0.25
    worker_max_restarts: int = 5
    max_worker_failures: int = 10
    startup_timeout_s: float = 120.0
    rpc_timeout_s: float = 120.0
    stall_timeout_s: float = 300.0
    fingerprint_weights: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Raise `ValueError`/`TypeError` naming the first field that is out of range."""
        super().validate()
        check_option(self.mode, "mode", MODES)
        check_option(self.selector, "selector", SELECTORS)
        check_option(self.cap_mode, "cap_mode", ("mask", "clamp"))
        for name in (
            "num_env_workers",
            "envs_per_worker",
            "group_size",
            "trajectories_per_update",
            "max_chunks",
            "budget",
            "refresh_every",
            "threads_per_actor",
            "max_worker_failures",
        ):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.seed, "seed", allow_zero=True)
        restarts = self.worker_max_restarts
        if not (isinstance(restarts, int) and not isinstance(restarts, bool) and restarts == -1):
            check_positive_int(restarts, "worker_max_restarts", allow_zero=True)  # or -1
        for name in ("max_concurrent", "max_batch", "snapshot_every", "queue_capacity"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        if self.max_staleness is not None:
            check_positive_int(self.max_staleness, "max_staleness", allow_zero=True)
            if self.mode == "sync" and self.max_staleness != 0:
                raise ValueError(
                    f"`max_staleness` must be 0 (or None) in mode 'sync', got {self.max_staleness}."
                )
        for name in ("startup_timeout_s", "rpc_timeout_s", "stall_timeout_s"):
            check_range(getattr(self, name), name, low=0.0, low_open=True)
        check_range(self.actor_num_cpus, "actor_num_cpus", low=0.0)
        if self.batch_timeout_s is not None:
            check_range(self.batch_timeout_s, "batch_timeout_s", low=0.0)
        if self.behaviour_weight_cap is not None:
            check_range(self.behaviour_weight_cap, "behaviour_weight_cap", low=0.0, low_open=True)
        check_range(self.p_min, "p_min", low=0.0, high=1.0, low_open=True)
        check_bool(self.fingerprint_weights, "fingerprint_weights")
        if self.envs_per_worker % self.group_size:
            raise ValueError(
                f"`envs_per_worker` must be a multiple of `group_size` ({self.group_size}), got "
                f"{self.envs_per_worker}."
            )
        if self.trajectories_per_update % self.envs_per_worker:
            raise ValueError(
                f"`trajectories_per_update` must be a multiple of `envs_per_worker` "
                f"({self.envs_per_worker}), got {self.trajectories_per_update}."
            )
        tasks = self.trajectories_per_update // self.envs_per_worker
        if self.queue_capacity is not None and self.queue_capacity < tasks:
            raise ValueError(
                f"`queue_capacity` must hold at least one update's tasks ({tasks}), got "
                f"{self.queue_capacity}."
            )
        if self.max_concurrent is not None and self.max_concurrent < self.envs_per_worker:
            raise ValueError(
                f"`max_concurrent` must admit one task ({self.envs_per_worker} trajectories), "
                f"got {self.max_concurrent}."
            )

    @property
    def tasks_per_update(self) -> int:
        """Tasks (env shards) per learner update, `B / envs_per_worker`."""
        return self.trajectories_per_update // self.envs_per_worker

    def resolved(self) -> "PipelineConfig":
        """A copy with every mode-dependent default (the None fields) filled in.

        Example:
            >>> cfg = PipelineConfig(mode="sync", envs_per_worker=8, trajectories_per_update=16)
            >>> r = cfg.resolved()
            >>> r.max_staleness, r.max_batch, r.queue_capacity
            (0, 16, 4)
        """
        self.validate()
        eta = self.max_staleness
        if eta is None:
            eta = 0 if self.mode == "sync" else 1
        streaming = self.mode == "full-async"
        max_batch = self.max_batch
        if max_batch is None:
            max_batch = self.envs_per_worker if streaming else (
                self.num_env_workers * self.envs_per_worker
            )
        timeout = self.batch_timeout_s
        if timeout is None:
            timeout = 0.002 if streaming else 0.5
        capacity = self.queue_capacity
        if capacity is None:
            capacity = (eta + 1) * self.tasks_per_update + self.num_env_workers
        return replace(
            self,
            max_staleness=eta,
            max_batch=max_batch,
            batch_timeout_s=timeout,
            queue_capacity=capacity,
        )
