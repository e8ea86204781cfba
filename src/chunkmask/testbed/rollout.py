"""Chunked, batched, gradient-free rollouts of a `TokenChunkPolicy` in `PickPlaceVectorEnv`."""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int64
from torch import Tensor

from chunkmask.testbed.env import InitialState, PickPlaceVectorEnv
from chunkmask.testbed.policy import TokenChunkPolicy


class RolloutBatch(NamedTuple):
    """Per-chunk records of a batch of episodes, padded to `N = max_steps / H` chunks.

    Attributes:
        obs: `(traj, N, obs)` observation at the start of each chunk.
        tokens: `(traj, N, H * D)` sampled action tokens.
        logp: `(traj, N, H * D)` behaviour log-probabilities of the tokens.
        actions: `(traj, N, H, D)` decoded continuous actions (gripper last).
        entropy: `(traj, N)` mean token entropy of each chunk's distribution (zeros unless the
            rollout was asked for it).
        valid: `(traj, N)` True for chunks the episode actually executed.
        success: `(traj,)` episode outcome.
        steps: `(traj,)` episode length in environment steps.
    """

    obs: Float[Tensor, "traj chunk obs"]
    tokens: Int64[Tensor, "traj chunk token"]
    logp: Float[Tensor, "traj chunk token"]
    actions: Float[Tensor, "traj chunk step dim"]
    entropy: Float[Tensor, "traj chunk"]
    valid: Bool[Tensor, "traj chunk"]
    success: Bool[Tensor, " traj"]
    steps: Int64[Tensor, " traj"]


@torch.no_grad()
def rollout(
    policy: TokenChunkPolicy,
    env: PickPlaceVectorEnv,
    initial_state: InitialState,
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    with_entropy: bool = False,
) -> RolloutBatch:
    """Run one episode per sub-environment, querying the policy once per chunk.

    At each chunk boundary the policy sees the observations of the still-running episodes in one
    batched forward pass; the chunk's `H` actions are then executed open loop.

    Args:
        policy: the chunked policy.
        env: the environment; its `num_envs` must equal the number of initial states.
        initial_state: where each episode starts.
        temperature: sampling temperature.
        greedy: take the most likely token instead of sampling.
        generator: torch generator for the token draws.
        with_entropy: also record each chunk's mean token entropy (zeros otherwise).

    Returns:
        The `RolloutBatch`.
    """
    was_training = policy.training
    policy.eval()
    obs, _ = env.reset(options={"initial_state": initial_state})
    n, h = env.num_envs, policy.horizon
    num_chunks = -(-env.config.max_steps // h)
    tokens = torch.zeros(n, num_chunks, policy.num_tokens, dtype=torch.long)
    logp = torch.zeros(n, num_chunks, policy.num_tokens)
    entropy = torch.zeros(n, num_chunks)
    obs_buf = torch.zeros(n, num_chunks, obs.shape[1])
    valid = torch.zeros(n, num_chunks, dtype=torch.bool)
    for c in range(num_chunks):
        active = ~env.done
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        valid[:, c] = active
        obs_buf[:, c] = obs
        tok, lp, ent = policy.sample(
            obs[idx],
            temperature=temperature,
            greedy=greedy,
            generator=generator,
            with_entropy=with_entropy,
        )
        tokens[idx, c] = tok
        logp[idx, c] = lp
        if ent is not None:
            entropy[idx, c] = ent
        chunk = policy.chunk_actions(tokens[:, c])
        for step in range(h):
            obs, *_ = env.step(chunk[:, step])
    policy.train(was_training)
    actions = policy.chunk_actions(tokens.reshape(n * num_chunks, -1)).reshape(
        n, num_chunks, h, policy.action_dim
    )
    return RolloutBatch(
        obs=obs_buf,
        tokens=tokens,
        logp=logp,
        actions=actions,
        entropy=entropy,
        valid=valid,
        success=env.success.clone(),
        steps=env.steps.clone(),
    )
