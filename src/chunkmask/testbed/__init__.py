"""A CPU testbed that reproduces the PCM paper end to end in minutes.

A batched pick-and-place environment in torch (gymnasium vector-env API), a noisy scripted expert,
a small VLA-like chunked policy with discretised action tokens, behaviour-cloning SFT, and a GRPO
trainer whose chunk selector is full GRPO, PCM (`ProbabilisticChunkMasker`) or an ablation.
The main job is `python -m chunkmask.testbed --out DIR`.

The testbed uses only the public chunkmask API and needs the optional dependencies gymnasium,
matplotlib and tqdm; nothing in the core imports it.
"""

from chunkmask.testbed.env import (
    ACTION_DIM,
    InitialState,
    PickPlaceConfig,
    PickPlaceVectorEnv,
    obs_layout,
    sample_initial_states,
)
from chunkmask.testbed.expert import Demonstrations, ScriptedExpert, collect_demonstrations
from chunkmask.testbed.policy import ChunkPolicy, actions_to_tokens, tokens_to_actions
from chunkmask.testbed.rollout import RolloutBatch, rollout
from chunkmask.testbed.sft import behaviour_cloning
from chunkmask.testbed.trainer import SELECTORS, TrainConfig, TrainResult, evaluate, train

__all__ = [
    "ACTION_DIM",
    "SELECTORS",
    "ChunkPolicy",
    "Demonstrations",
    "InitialState",
    "PickPlaceConfig",
    "PickPlaceVectorEnv",
    "RolloutBatch",
    "ScriptedExpert",
    "TrainConfig",
    "TrainResult",
    "actions_to_tokens",
    "behaviour_cloning",
    "collect_demonstrations",
    "evaluate",
    "obs_layout",
    "rollout",
    "sample_initial_states",
    "tokens_to_actions",
    "train",
]
