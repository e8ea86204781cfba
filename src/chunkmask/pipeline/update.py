r"""The learner's step, without Ray: collate finished tasks, filter stale ones, one decoupled update.

Per update the learner runs, on the `B` trajectories it took from the queue:

1. `staleness_filter`: drop the trajectories whose oldest chunk is more than $\eta$ versions
   behind the learner (RLinf's rule), counting them;
2. `group_relative_advantages` on the kept trajectories (GRPO, Eq. 1 of the PCM paper);
3. the chunk selection, by name from the core's registry (`chunkmask.get_selector`): every
   executed chunk (`"full"`) or `ProbabilisticChunkMasker.update` then the `"pcm"` draw, and
   `shrink` to the selected chunks;
4. one forward of the selected chunks, `decoupled_ppo_loss` and one AdamW step.

The learner takes one optimiser step per batch, so the proximal policy $\pi_{prox}$ of the
decoupled loss is the learner's current weights (AReaL's choice with one mini-batch): the
proximal log-probabilities are the detached log-probabilities of the same forward, and no extra
forward is needed. The behaviour weight $\pi_{prox} / \pi_{behav}$ then corrects for the
rollout's older weights, capped at `behaviour_weight_cap`.
"""

from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int64
from torch import Tensor

from chunkmask import (
    Behaviour,
    PhaseScoring,
    ProbabilisticChunkMasker,
    SelectorInputs,
    decoupled_ppo_loss,
    get_selector,
    group_relative_advantages,
    shrink,
)
from chunkmask.offpolicy import staleness, staleness_filter
from chunkmask.pipeline.config import PipelineConfig
from chunkmask.pipeline.policy import ChunkPolicy


class TrajectoryGroup(NamedTuple):
    """The episodes of one finished task (an env shard), padded to `N` chunks.

    Attributes:
        obs: `(traj, N, obs)` observation at the start of each chunk.
        tokens: `(traj, N, K)` sampled action tokens.
        logp: `(traj, N, K)` behaviour log-probabilities.
        actions: `(traj, N, H, D)` decoded actions (gripper last).
        valid: `(traj, N)` chunks the episode executed.
        versions: `(traj, N)` int64 policy version of the weights that sampled each chunk (0 at
            padding).
        returns: `(traj,)` episode return (sum of rewards).
        success: `(traj,)` episode success.
        steps: `(traj,)` environment steps of each episode.
        group: `(traj,)` int64 prompt index within the task.
        task_id: `()` int64 id of the task.
    """

    obs: Float[Tensor, "traj chunk obs"]
    tokens: Int64[Tensor, "traj chunk token"]
    logp: Float[Tensor, "traj chunk token"]
    actions: Float[Tensor, "traj chunk step dim"]
    valid: Bool[Tensor, "traj chunk"]
    versions: Int64[Tensor, "traj chunk"]
    returns: Float[Tensor, " traj"]
    success: Bool[Tensor, " traj"]
    steps: Int64[Tensor, " traj"]
    group: Int64[Tensor, " traj"]
    task_id: Int64[Tensor, ""]


def collate_groups(groups: list[TrajectoryGroup]) -> TrajectoryGroup:
    """Concatenate finished tasks into one batch; prompt groups get batch-unique dense ids.

    Raises:
        ValueError: if `groups` is empty or the tasks have different chunk slots `N`.

    Example:
        >>> import torch
        >>> def task(i):
        ...     n = 2
        ...     return TrajectoryGroup(torch.zeros(n, 3, 4), torch.zeros(n, 3, 2, dtype=torch.long),
        ...         torch.zeros(n, 3, 2), torch.zeros(n, 3, 1, 2), torch.ones(n, 3, dtype=torch.bool),
        ...         torch.zeros(n, 3, dtype=torch.long), torch.zeros(n), torch.zeros(n, dtype=torch.bool),
        ...         torch.zeros(n, dtype=torch.long), torch.tensor([0, 1]), torch.tensor(i))
        >>> collate_groups([task(0), task(1)]).group.tolist()
        [0, 1, 2, 3]
    """
    if not groups:
        raise ValueError("`groups` must hold at least one task, got none.")
    slots = {g.valid.shape[1] for g in groups}
    if len(slots) != 1:
        raise ValueError(f"`groups` must share one number of chunk slots, got {sorted(slots)}.")
    offset, ids = 0, []
    for g in groups:
        ids.append(g.group + offset)
        offset += int(g.group.max()) + 1 if g.group.numel() else 0
    fields = {
        name: torch.cat([getattr(g, name) for g in groups])
        for name in TrajectoryGroup._fields
        if name not in ("group", "task_id")
    }
    return TrajectoryGroup(
        **fields, group=torch.cat(ids), task_id=torch.stack([g.task_id for g in groups]).amin()
    )


def make_masker(config: PipelineConfig) -> ProbabilisticChunkMasker:
    """The learner's `ProbabilisticChunkMasker` (PCM's selector) for `config`."""
    return ProbabilisticChunkMasker(
        budget=config.budget,
        scoring=PhaseScoring(refresh_every=config.refresh_every, p_min=config.p_min),
        seed=config.seed,
    )


def decoupled_grpo_update(
    policy: ChunkPolicy,
    optimizer: torch.optim.Optimizer,
    batch: TrajectoryGroup,
    *,
    version: int,
    config: PipelineConfig,
    masker: ProbabilisticChunkMasker | None = None,
) -> dict[str, Any]:
    """One learner update on a batch of finished trajectories; returns its diagnostics.

    Filters stale trajectories (`staleness_filter` with `config.max_staleness`), computes GRPO
    advantages, selects chunks (all, or PCM's `masker`), and takes one AdamW step on
    `decoupled_ppo_loss` with the proximal log-probabilities equal to the current ones (see the
    module docstring). Deterministic given the inputs, the masker's state and torch's
    deterministic CPU kernels.

    Args:
        policy: the learner's policy (a `ChunkPolicy`: `policy.log_prob(obs, tokens,
            temperature=)` returns `(logp, _)` with `logp` of shape `(M, K)`).
        optimizer: its optimiser (one step is taken).
        batch: the collated `TrajectoryGroup` of the update.
        version: the learner's current version `v` (before this update).
        config: a resolved `PipelineConfig` (its `max_staleness` is an int).
        masker: PCM's masker; required when `config.selector == "pcm"`.

    Returns:
        A dict of plain numbers: `trajectories`, `kept`, `stale_dropped`, `chunks_executed`,
        `chunks_updated`, `train_success`, `loss`, `grad_norm`, `staleness_mean`,
        `staleness_max`, `capped_frac`, `behaviour_weight_mean` and `stepped` (False when every
        trajectory was stale and no step was taken).

    Raises:
        ValueError: if `config.max_staleness` is None or `masker` is missing for PCM.
    """
    if config.max_staleness is None:
        raise ValueError("`config` must be resolved (`config.resolved()`), got max_staleness=None.")
    if config.selector == "pcm" and masker is None:
        raise ValueError("`masker` must be given for selector 'pcm', got None.")
    keep = staleness_filter(batch.versions, version, config.max_staleness, valid=batch.valid)
    num = int(keep.numel())
    kept = int(keep.sum())
    stats: dict[str, Any] = {
        "trajectories": num,
        "kept": kept,
        "stale_dropped": num - kept,
        "chunks_executed": int(batch.valid.sum()),
        "train_success": float(batch.success.float().mean()) if num else 0.0,
        "chunks_updated": 0,
        "loss": 0.0,
        "grad_norm": 0.0,
        "staleness_mean": 0.0,
        "staleness_max": 0,
        "capped_frac": 0.0,
        "behaviour_weight_mean": 1.0,
        "stepped": False,
    }
    if kept == 0:
        return stats
    sub = TrajectoryGroup(*(x[keep] if x.ndim else x for x in batch))
    _, group = torch.unique(sub.group, return_inverse=True)
    advantages = group_relative_advantages(sub.returns.float(), group)
    info = None
    if masker is not None and config.selector == "pcm":  # advances the phase scores once
        info = masker.update(actions=sub.actions, success=sub.success, group=group, valid=sub.valid)
    selection = get_selector(config.selector)(
        SelectorInputs(
            valid=sub.valid,
            budget=config.budget,
            phases=None if info is None else info.phases,
            scores=None if info is None else info.scores,
            advantages=advantages,
            masker=masker,
        )
    )
    age = staleness(torch.where(sub.valid, sub.versions, version), version)
    packed = shrink(
        {"obs": sub.obs, "tokens": sub.tokens, "behav": sub.logp, "adv": advantages, "age": age},
        selection,
    )
    policy.train()
    logp, _ = policy.log_prob(packed["obs"], packed["tokens"], temperature=config.temperature)
    out = decoupled_ppo_loss(
        logp,
        proximal_logp=logp.detach(),
        behaviour=Behaviour(
            packed["behav"], cap=config.behaviour_weight_cap, mode=config.cap_mode
        ),
        advantages=packed["adv"],
        selection=selection,
        clip=config.clip,
        loss_agg_mode=config.loss_agg_mode,
    )
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
    optimizer.step()
    stats.update(
        chunks_updated=int(packed["tokens"].shape[0]),
        loss=float(out.loss.detach()),
        grad_norm=float(grad_norm),
        staleness_mean=float(packed["age"].float().mean()) if packed["age"].numel() else 0.0,
        staleness_max=int(packed["age"].max()) if packed["age"].numel() else 0,
        capped_frac=float(out.capped_frac),
        behaviour_weight_mean=float(out.behaviour_weight_mean),
        stepped=True,
    )
    return stats
