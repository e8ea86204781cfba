"""A fully asynchronous GRPO/PCM training pipeline on Ray (`pip install 'chunkmask[ray]'`).

Three stages run as Ray actors and overlap, as in RL-VLA³ ("Reinforcement Learning VLA
Accelerating via Full Asynchronism"), AReaL and RLinf:

- env workers (`EnvWorker`) step env shards and stream observation requests;
- the inference stage (`InferenceServer`) batches requests dynamically (a maximum batch and a
  timeout), runs one forward per batch and streams actions back, always with one complete,
  versioned snapshot of the weights;
- the learner (`Learner`) consumes finished trajectory groups from a bounded
  `ray.util.queue.Queue` as they arrive, filters stale ones (`staleness_filter`), selects chunks
  (GRPO or PCM), takes one `decoupled_ppo_loss` step and publishes the new weights.

`AsyncPipeline` is the driver: it admits rollouts with `StalenessGate`, hands finished tasks to
the learner and restarts dead env workers. The modes `"sync"`, `"async-rollout"` and
`"full-async"` set how much the stages overlap (`PipelineConfig`). Ray is imported only here;
without it every name raises an `ImportError` that says what to install.

The pipeline knows no concrete policy or environment: the policy only has to satisfy
`ChunkPolicy`. The adapters for the CPU testbed live in `chunkmask.testbed.pipeline_env`.
"""

from importlib.util import find_spec

from chunkmask.pipeline.policy import ChunkPolicy  # plain typing, no Ray


def _has(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked module (sys.modules[name] = None)
        return False


if _has("ray"):
    from chunkmask.pipeline.actors import (
        EnvWorker,
        InferenceServer,
        Learner,
        PipelineError,
        PipelineTimeoutError,
    )
    from chunkmask.pipeline.config import MODES, SELECTORS, PipelineConfig
    from chunkmask.pipeline.runner import (
        AsyncPipeline,
        PipelineResult,
        ray_session,
        stage_busy_time,
    )
    from chunkmask.pipeline.update import (
        TrajectoryGroup,
        collate_groups,
        decoupled_grpo_update,
        make_masker,
    )
else:

    def __getattr__(name: str) -> object:
        """Explain, on first use of a pipeline name, that the ray extra is missing."""
        if name in __all__:
            raise ModuleNotFoundError(
                f"chunkmask.pipeline.{name} needs Ray: pip install 'chunkmask[ray]'", name="ray"
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODES",
    "SELECTORS",
    "AsyncPipeline",
    "ChunkPolicy",
    "EnvWorker",
    "InferenceServer",
    "Learner",
    "PipelineConfig",
    "PipelineError",
    "PipelineResult",
    "PipelineTimeoutError",
    "TrajectoryGroup",
    "collate_groups",
    "decoupled_grpo_update",
    "make_masker",
    "ray_session",
    "stage_busy_time",
]
