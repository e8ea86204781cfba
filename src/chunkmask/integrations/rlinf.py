r"""chunkmask for RLinf (0.3): `register()`, the `chunkmask_pcm` loss and the actor mixin.

RLinf's embodied actor (`EmbodiedFSDPActor`) holds `rollout_batch` as `[n_chunk_step, traj, ...]`
(`dones`, `terminations`, `truncations`, `prev_values` carry one more step) and `run_training`
flattens and shuffles it into rows, one row per chunk step. `PCMActorMixin.run_training` selects
chunks after the advantages are computed and physically drops the unselected rows
(`shrink_rollout_batch`) before RLinf's own loop runs, so the forward and backward passes see only
the selected chunks. Every rank keeps the same number of rows (a multiple of its per-rank global
batch), or FSDP would hang on a missing micro-batch: ranks with fewer selected rows are padded
with unselected rows whose `loss_mask` is False.

Set `RLINF_EXT_MODULE=chunkmask.integrations.rlinf` and every RLinf worker calls `register()`,
which adds the `chunkmask_pcm` policy loss (`algorithm.loss_type=chunkmask_pcm`). RLinf stores
registry names lowercased and looks them up as given, so the name is lowercase.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from chunkmask._checks import check_positive_int
from chunkmask.aggregation import aggregate_loss
from chunkmask.batch._selection import Selection
from chunkmask.integrations._require import require
from chunkmask.losses.surrogate import surrogate

LOSS_NAME = "chunkmask_pcm"
"""The `algorithm.loss_type` of the chunkmask policy loss (lowercase: RLinf's registry rule)."""

PLUS_ONE_KEYS = ("dones", "terminations", "truncations", "prev_values")
"""Rollout keys with `n_chunk_step + 1` steps; RLinf drops their last step before training."""


def pcm_actor_loss(**kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    r"""RLinf's embodied PPO-clip actor loss (Eq. 2 of the PCM paper), computed by chunkmask.

    Called by RLinf's `policy_loss` entry with its keywords, after its `preprocess_loss_inputs`:
    `logprobs` and `old_logprobs` `(rows, C, D)` (token level), `(rows, C)` or `(rows,)`,
    `advantages`, `loss_mask` and `loss_mask_sum` broadcastable to them, `clip_ratio_low`,
    `clip_ratio_high`, optional `clip_ratio_c` (dual clip), `clip_log_ratio_min/max`,
    `max_episode_steps` and `critic_warmup`. The reduction is RLinf's: with `max_episode_steps`
    and `loss_mask_sum`, the mean over every element of
    $\ell \cdot m \cdot T_{max} / T_i$ (a fixed divisor per micro-batch, so dropped rows change
    nothing but the number of steps); otherwise the masked sum over the count of `loss_mask` as
    given (actions, for a token-level `(rows, C, 1)` mask). It equals RLinf's
    `actor` loss; Horvitz-Thompson weights arrive folded into `advantages`
    (`shrink_rollout_batch`).

    Returns:
        `(loss, metrics)` with RLinf's metric names `actor/policy_loss`, `actor/ratio`,
        `actor/clip_fraction`, `actor/approx_kl`.
    """
    logp, old, adv = kwargs["logprobs"], kwargs["old_logprobs"], kwargs["advantages"]
    given = kwargs.get("loss_mask")
    mask = torch.ones_like(logp, dtype=torch.bool) if given is None else given.to(torch.bool)
    # RLinf counts the mask as given: a token-level `(rows, C, 1)` mask counts actions, not tokens.
    mask_count = mask.sum()
    mask = mask.expand_as(logp)
    log_ratio = logp - old
    low, high = kwargs.get("clip_log_ratio_min"), kwargs.get("clip_log_ratio_max")
    if low is not None or high is not None:
        log_ratio = torch.clamp(log_ratio, min=low, max=high)
    out = surrogate(
        old + log_ratio, old, adv.expand_as(logp),
        float(kwargs["clip_ratio_low"]), float(kwargs["clip_ratio_high"]),
        kwargs.get("clip_ratio_c"), 80.0,
    )  # fmt: skip
    loss2d = out.loss.reshape(logp.shape[0], -1)
    mask2d = mask.reshape(logp.shape[0], -1)
    steps, mask_sum = kwargs.get("max_episode_steps"), kwargs.get("loss_mask_sum")
    if steps is not None and mask_sum is not None and given is not None:
        weight = (steps / mask_sum.to(loss2d.dtype)).expand_as(logp).reshape(loss2d.shape)
        loss = aggregate_loss(loss2d, mask2d, "token-mean", weights=weight,
                              batch_num_tokens=loss2d.numel())  # fmt: skip
    else:
        loss = aggregate_loss(loss2d, mask2d, "token-mean", batch_num_tokens=mask_count)
    if kwargs.get("critic_warmup"):
        loss = loss * 0.0
    with torch.no_grad():
        # RLinf's conventions: the ratio averages tokens, the other two divide by the mask's count.
        given_count = mask_count.clamp_min(1)
        metrics = {
            "actor/policy_loss": loss.detach(),
            "actor/ratio": torch.where(mask, out.ratio, 0.0).sum() / mask.sum().clamp_min(1),
            "actor/clip_fraction": (out.clipped_low | out.clipped_high)[mask].sum() / given_count,
            "actor/approx_kl": -torch.where(mask, log_ratio, 0.0).sum() / given_count,
        }
    return loss, metrics


def register() -> None:
    """Register `chunkmask_pcm` in RLinf's policy-loss registry (what `RLINF_EXT_MODULE` calls).

    Raises:
        ImportError: if RLinf is not installed.
    """
    registry = require("rlinf.algorithms.registry", "rlinf")
    if LOSS_NAME not in registry.LOSS_REGISTRY:
        registry.register_policy_loss(LOSS_NAME)(pcm_actor_loss)


def rollout_valid(rollout_batch: dict[str, Any]) -> Tensor:
    """`(traj, n_chunk_step)` bool: the chunk steps with a valid action (`loss_mask`).

    Raises:
        ValueError: if `rollout_batch` has no `prev_logprobs`.
    """
    if "prev_logprobs" not in rollout_batch:
        raise ValueError(
            f"`rollout_batch` must hold `prev_logprobs` [n_chunk_step, traj, ...], got keys "
            f"{sorted(rollout_batch)}."
        )
    steps, traj = rollout_batch["prev_logprobs"].shape[:2]
    mask = rollout_batch.get("loss_mask")
    if mask is None:
        return torch.ones(traj, steps, dtype=torch.bool)
    return mask.reshape(steps, traj, -1).any(-1).T.cpu()


def _equal_rows(count: int, multiple: int, total: int, process_group: Any) -> int:
    """The row count every rank keeps: max over ranks, rounded up to `multiple`."""
    import torch.distributed as dist

    if total % multiple:
        raise ValueError(
            f"`rows_multiple` ({multiple}) must divide the rollout's {total} rows (RLinf's own "
            f"requirement), got a remainder of {total % multiple}."
        )
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        value = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=process_group)
        count = int(value)
    return min(total, max(multiple, -(-count // multiple) * multiple))


def shrink_rollout_batch(
    rollout_batch: dict[str, Any],
    selection: Selection,
    *,
    rows_multiple: int,
    process_group: Any = None,
    fold_inclusion: bool = True,
) -> dict[str, Any]:
    r"""Keep only the selected chunk steps of an RLinf `rollout_batch`, equal across ranks.

    Row $(t, i)$ (chunk step $t$ of trajectory $i$) is kept when `selection` selects chunk $t$
    of trajectory $i$. The result is laid out `[rows, 1, ...]` (the `PLUS_ONE_KEYS` get one more,
    unused, step), which RLinf's `run_training` flattens and shuffles as before. `rows` is the
    largest selected count over the ranks of `process_group` (the default group when
    torch.distributed is initialised), rounded up to `rows_multiple` (the per-rank global batch
    `actor.global_batch_size // world_size`); the padding rows are unselected chunk steps with
    `loss_mask` False. With `fold_inclusion` and `selection.inclusion`, `advantages` are divided
    by $\pi$: RLinf's embodied reduction has a fixed divisor per micro-batch, so this gives the
    Horvitz-Thompson estimate summed over the epoch (exact for PPO-clip).

    Args:
        rollout_batch: RLinf's `[n_chunk_step, traj, ...]` dict (nested dicts allowed).
        selection: `traj` trajectories of `n_chunk_step` chunks.
        rows_multiple: the per-rank global batch size.
        process_group: the group to equalise row counts over, or None for the default.
        fold_inclusion: fold $1/\pi$ into `advantages` when the selection carries `inclusion`.

    Returns:
        The new rollout batch.

    Raises:
        TypeError: if `selection` is not a `Selection`.
        ValueError: if the selection's shape disagrees with the batch, or the rows cannot be a
            multiple of `rows_multiple`.
    """
    if not isinstance(selection, Selection):
        raise TypeError(f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}.")
    multiple = check_positive_int(rows_multiple, "rows_multiple")
    valid = rollout_valid(rollout_batch)
    traj, steps = valid.shape
    if (selection.num_traj, selection.chunks_total) != (traj, steps):
        raise ValueError(
            f"`selection` must have {traj} trajectories of {steps} chunk steps (the rollout "
            f"batch's [n_chunk_step, traj]), got {selection.num_traj} of {selection.chunks_total}."
        )
    chosen = selection.chunk_mask().cpu()
    # Rows in step-major order (RLinf's flattening): selected ones first, then padding.
    flat_chosen = chosen.T.reshape(-1)
    order = torch.cat([torch.nonzero(flat_chosen).flatten(), torch.nonzero(~flat_chosen).flatten()])
    count = int(flat_chosen.sum())
    rows = _equal_rows(count, multiple, steps * traj, process_group)
    pick = order[:rows]
    is_pad = torch.arange(rows) >= count
    weight = None
    if fold_inclusion and selection.inclusion is not None:
        dense = torch.ones(traj, steps + 1, dtype=torch.float64)
        target = torch.where(selection.mask, selection.indices, steps).cpu()
        dense = dense.scatter(1, target, selection.inclusion.detach().cpu().to(torch.float64))
        weight = (1.0 / dense[:, :steps]).T.reshape(-1)[pick]

    def take(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: take(v, k) for k, v in value.items()}
        if not isinstance(value, Tensor):
            return value
        extra = key in PLUS_ONE_KEYS
        body = value[:steps] if extra else value
        flat = body.reshape(steps * traj, *body.shape[2:])
        out = flat[pick.to(flat.device)]
        if key == "loss_mask":
            pad = is_pad.to(out.device).reshape(-1, *([1] * (out.ndim - 1)))
            out = out & ~pad
        if key == "advantages" and weight is not None:
            w = weight.to(device=out.device, dtype=out.dtype).reshape(-1, *([1] * (out.ndim - 1)))
            out = out * w
        out = out.unsqueeze(1)
        if extra:
            out = torch.cat([out, value[-1:, :1].to(out.dtype).expand(1, *out.shape[1:])], 0)
        return out

    return {key: take(value, key) for key, value in rollout_batch.items()}


class PCMActorMixin:
    """Mix into RLinf's `EmbodiedFSDPActor` to train on the selected chunks only.

    `class PCMActor(PCMActorMixin, EmbodiedFSDPActor): ...`. Its `run_training` draws a
    `Selection` with `pcm_select` (override it; the default draws `algorithm.pcm.budget` chunk
    steps per trajectory with probability proportional to the chunk's mean |advantage|, with
    inclusion probabilities), shrinks `self.rollout_batch` with `shrink_rollout_batch`, and calls
    RLinf's `run_training`.
    """

    pcm_generator: torch.Generator | None = None

    def pcm_select(self, rollout_batch: dict[str, Any]) -> Selection:
        """Draw the selection for this rollout batch (override for the PCM masker).

        Returns:
            A `Selection` of `traj` trajectories of `n_chunk_step` chunks.
        """
        from chunkmask.pcm import pps_sample

        valid = rollout_valid(rollout_batch)
        steps, traj = rollout_batch["prev_logprobs"].shape[:2]
        adv = rollout_batch["advantages"].reshape(steps, traj, -1).abs().mean(-1).T.cpu()
        budget = int(self.cfg.algorithm.get("pcm", {}).get("budget", max(1, steps // 4)))
        return pps_sample(adv.float() + 1e-6, budget, valid=valid, generator=self.pcm_generator)

    def run_training(self, *args: Any, **kwargs: Any) -> Any:
        """Select, shrink `self.rollout_batch`, then run RLinf's training loop."""
        with torch.no_grad():
            selection = self.pcm_select(self.rollout_batch)
            multiple = self.cfg.actor.global_batch_size // self._world_size
            self.rollout_batch = shrink_rollout_batch(
                self.rollout_batch, selection, rows_multiple=multiple
            )
        parent: Callable[..., Any] = super().run_training  # type: ignore[misc]
        return parent(*args, **kwargs)
