"""A CPU testbed that reproduces the PCM paper end to end in minutes.

A batched pick-and-place environment in torch (gymnasium vector-env API), a noisy scripted expert,
a small VLA-like chunked policy with discretised action tokens, behaviour-cloning SFT, and a GRPO
trainer whose chunk selector is full GRPO, PCM (`ProbabilisticChunkMasker`) or an ablation.
The main job is `python -m chunkmask.testbed --out DIR`.

The testbed uses only the public chunkmask API and needs the optional dependencies gymnasium,
matplotlib and tqdm (`pip install 'chunkmask[testbed]'`); nothing in the core imports it. Without
gymnasium the package still imports, but every name below raises an `ImportError` that says what
to install.
"""

from importlib.util import find_spec

if find_spec("gymnasium") is not None:
    from chunkmask.testbed.env import (
        ACTION_DIM,
        InitialState,
        PickPlaceConfig,
        PickPlaceVectorEnv,
        obs_layout,
        sample_initial_states,
    )
    from chunkmask.testbed.expert import Demonstrations, ScriptedExpert, collect_demonstrations
    from chunkmask.testbed.pipeline_env import (
        pickplace_env_fn,
        pickplace_max_chunks,
        pickplace_policy_fn,
        pickplace_reset_options,
    )
    from chunkmask.testbed.policy import TokenChunkPolicy, actions_to_tokens, tokens_to_actions
    from chunkmask.testbed.rollout import RolloutBatch, rollout
    from chunkmask.testbed.sft import behaviour_cloning
    from chunkmask.testbed.trainer import SELECTORS, TrainConfig, TrainResult, evaluate, train
else:

    def __getattr__(name: str) -> object:
        """Explain, on first use of a testbed name, that the testbed extra is missing."""
        if name in __all__:
            raise ModuleNotFoundError(
                f"chunkmask.testbed.{name} needs gymnasium: pip install 'chunkmask[testbed]'",
                name="gymnasium",
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACTION_DIM",
    "SELECTORS",
    "Demonstrations",
    "InitialState",
    "PickPlaceConfig",
    "PickPlaceVectorEnv",
    "RolloutBatch",
    "ScriptedExpert",
    "TokenChunkPolicy",
    "TrainConfig",
    "TrainResult",
    "actions_to_tokens",
    "behaviour_cloning",
    "collect_demonstrations",
    "evaluate",
    "obs_layout",
    "pickplace_env_fn",
    "pickplace_max_chunks",
    "pickplace_policy_fn",
    "pickplace_reset_options",
    "rollout",
    "sample_initial_states",
    "tokens_to_actions",
    "train",
]
