"""Adapters that plug the CPU testbed into `chunkmask.pipeline.AsyncPipeline`.

Each returns a picklable callable (a `functools.partial` of a module-level function), so Ray
ships it to the actors by reference. They need the `testbed` extra (gymnasium), not Ray: the
dependency runs from the testbed to the pipeline's interfaces, never the other way.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch

from chunkmask.testbed.env import PickPlaceConfig, PickPlaceVectorEnv, obs_layout
from chunkmask.testbed.env import sample_initial_states as _sample_initial_states
from chunkmask.testbed.policy import TokenChunkPolicy


def _make_env(num_envs: int, config: Any) -> Any:
    return PickPlaceVectorEnv(num_envs, config)


def _reset_options(seed: int, num_envs: int, group_size: int, config: Any) -> dict[str, Any]:
    states = _sample_initial_states(
        num_envs // group_size, config=config, generator=torch.Generator().manual_seed(seed)
    )
    return {"initial_state": states.repeat_interleave(group_size)}


def _make_policy(config: Any, kwargs: dict[str, Any]) -> torch.nn.Module:
    cfg = config or PickPlaceConfig()
    return TokenChunkPolicy(obs_layout(cfg.num_objects), num_tasks=cfg.num_objects, **kwargs)


def pickplace_env_fn(config: Any = None) -> Callable[[int], Any]:
    """`env_fn(num_envs)` building a `PickPlaceVectorEnv` with `config` (a `PickPlaceConfig`).

    Example:
        >>> env = pickplace_env_fn()(3)
        >>> env.num_envs
        3
    """
    return functools.partial(_make_env, config=config)


def pickplace_reset_options(group_size: int, config: Any = None) -> Callable[[int, int], dict]:
    """`reset_options(seed, num_envs)`: `num_envs / group_size` random prompts, each repeated.

    Example:
        >>> options = pickplace_reset_options(2)(0, 4)
        >>> options["initial_state"].task.shape
        torch.Size([4])
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}.")
    return functools.partial(_reset_options, group_size=group_size, config=config)


def pickplace_policy_fn(config: Any = None, **policy_kwargs: Any) -> Callable[[], torch.nn.Module]:
    """`policy_fn()` building a `TokenChunkPolicy` for the scene of `config`.

    Args:
        config: the `PickPlaceConfig` (None: the default scene).
        **policy_kwargs: `TokenChunkPolicy` keyword arguments (`d_model`, `depth`, ...).

    Example:
        >>> policy = pickplace_policy_fn(d_model=16, depth=1, heads=2)()
        >>> policy.num_tokens
        40
    """
    return functools.partial(_make_policy, config, dict(policy_kwargs))


def pickplace_max_chunks(config: Any = None, horizon: int = 8) -> int:
    """Chunk slots `N` for the testbed: `ceil(max_steps / horizon)`.

    Example:
        >>> pickplace_max_chunks()
        64
    """
    cfg = config or PickPlaceConfig()
    return -(-cfg.max_steps // horizon)
