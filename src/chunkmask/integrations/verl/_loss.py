"""The `chunkmask_pcm` policy loss in verl's registry (`policy_loss.loss_mode=chunkmask_pcm`)."""

from typing import Any

import torch
from torch import Tensor

from chunkmask.aggregation import LossNormalizers
from chunkmask.integrations._require import require
from chunkmask.losses import Clip, masked_grpo_loss

LOSS_NAME = "chunkmask_pcm"
"""The name to put in `actor_rollout_ref.actor.policy_loss.loss_mode`."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def pcm_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    r"""The PPO-clip policy loss of verl, computed by `chunkmask.masked_grpo_loss` (Eq. 2 and 11).

    The signature is verl 0.9's `PolicyLossFn`. Rows are verl's sequences; the chunks dropped by
    `apply_selection` are already absent from `response_mask`, so the masked objective of Eq. (11)
    is the masked mean verl takes. The clip ratios come from the actor config (`clip_ratio`,
    `clip_ratio_low`, `clip_ratio_high`, `clip_ratio_c` for the dual clip, default 3), the
    normalisers from `config.global_batch_info` (`dp_size`, `batch_num_tokens`,
    `global_batch_size`, `loss_scale_factor`), as verl's `vanilla` loss reads them, in all five
    `loss_agg_mode`\ s. `rollout_is_weights` (non-negative, detached) are folded into the
    advantages, which for PPO-clip equals multiplying the per-token loss.

    Args:
        old_log_prob: `(rows, response)` behaviour log-probabilities.
        log_prob: `(rows, response)` current log-probabilities.
        advantages: `(rows, response)` advantages.
        response_mask: `(rows, response)` mask of the tokens that count.
        loss_agg_mode: one of verl's five aggregation modes.
        config: verl's `ActorConfig` (or any mapping with the same keys).
        rollout_is_weights: optional `(rows, response)` importance weights.

    Returns:
        `(loss, metrics)` with verl's metric names `actor/pg_clipfrac`, `actor/ppo_kl` and
        `actor/pg_clipfrac_lower`.

    Raises:
        ValueError: on mismatched shapes or an unknown `loss_agg_mode` (from the loss's checks).
    """
    eps = _get(config, "clip_ratio", 0.2)
    clip = Clip(
        low=float(_get(config, "clip_ratio_low", eps)),
        high=float(_get(config, "clip_ratio_high", eps)),
        dual=float(_get(config, "clip_ratio_c", 3.0)),
        log_ratio_clamp=20.0,
    )
    info = _get(config, "global_batch_info", {}) or {}
    norms = LossNormalizers(
        dp_size=int(info.get("dp_size") or 1),
        batch_num_tokens=info.get("batch_num_tokens"),
        global_batch_size=info.get("global_batch_size"),
        loss_scale_factor=info.get("loss_scale_factor"),
    )
    if rollout_is_weights is not None:
        advantages = advantages * rollout_is_weights.detach()
    out = masked_grpo_loss(
        log_prob,
        old_logp=old_log_prob,
        advantages=advantages,
        mask=response_mask.to(torch.bool),
        clip=clip,
        loss_agg_mode=loss_agg_mode,
        norms=norms,
    )
    metrics = {
        "actor/pg_clipfrac": float(out.clip_frac_low + out.clip_frac_high),
        "actor/ppo_kl": float(out.approx_kl),
        "actor/pg_clipfrac_lower": float(out.dual_clip_frac),
    }
    return out.policy_loss, metrics


def register() -> None:
    """Register `pcm_policy_loss` as `chunkmask_pcm` in verl's policy-loss registry (idempotent).

    Raises:
        ImportError: if verl is not installed.
    """
    core_algos = require("verl.trainer.ppo.core_algos", "verl")
    if core_algos.POLICY_LOSS_REGISTRY.get(LOSS_NAME) is not pcm_policy_loss:
        core_algos.POLICY_LOSS_REGISTRY.pop(LOSS_NAME, None)
        core_algos.register_policy_loss(LOSS_NAME)(pcm_policy_loss)


def check_registered() -> None:
    """Raise unless `chunkmask_pcm` is in verl's registry: call it where the trainer starts.

    verl logs a plugin's import error at DEBUG only and fails later with "Unsupported loss mode";
    this fails at once, with the cause.

    Raises:
        RuntimeError: if the loss is not registered.
    """
    core_algos = require("verl.trainer.ppo.core_algos", "verl")
    if LOSS_NAME not in core_algos.POLICY_LOSS_REGISTRY:
        raise RuntimeError(
            f"verl's policy-loss registry has no `{LOSS_NAME}`: the `verl.plugins` entry point "
            "of chunkmask did not load (is chunkmask installed in this environment, and is "
            "VERL_USE_EXTERNAL_PLUGINS unset or 'auto'?). Call "
            "chunkmask.integrations.verl.register() to see the error."
        )
