"""A float64 re-statement of verl's GRPO advantage, vanilla policy loss, agg_loss and KL penalty.

Written from the semantics of `verl/trainer/ppo/core_algos.py` (functions
`compute_grpo_outcome_advantage`, `compute_policy_loss_vanilla`, `agg_loss`, `kl_penalty`) and
`verl/utils/torch_functional.py` (`masked_mean`), as plain loops and tensor algebra, so that the
library's results can be compared with what a verl trainer would compute on the same batch.

verl's batch layout: one row per response (here: per trajectory), `response_length` token
columns, a 0/1 `response_mask`. Behaviours reproduced on purpose:

- a group of one gets mean 0 and std 1 (so its advantage is `r / (1 + eps)`);
- the std is Bessel-corrected (`torch.std`);
- `agg_loss` is verl 0.9.1's: every seq mode leaves out empty rows and divides by
  `global_batch_size` (default: this rank's non-empty rows), `seq-mean-token-sum-norm` also by
  `loss_scale_factor`, and every mode is multiplied by `dp_size`; an all-empty batch gives NaN;
- dual clip is applied with `clip_ratio_c` (verl's default 3.0) to negative advantages.
"""

import math

import torch
from torch import Tensor


def grpo_outcome_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
) -> Tensor:
    """Per-token GRPO advantages `(bs, response_length)`: the row's summed reward, standardised."""
    scores = token_level_rewards.to(torch.float64).sum(-1).tolist()
    members: dict = {}
    for i, label in enumerate(index):
        members.setdefault(int(label), []).append(i)
    out = [0.0] * len(scores)
    for rows in members.values():
        values = [scores[i] for i in rows]
        if len(values) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for i in rows:
            centred = scores[i] - mean
            out[i] = centred / (std + epsilon) if norm_adv_by_std_in_grpo else centred
    adv = torch.tensor(out, dtype=torch.float64)
    return adv[:, None] * response_mask.to(torch.float64)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(torch.float64)
    return (values * mask).sum() / mask.sum()


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask.to(torch.float64)).sum()


def agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> Tensor:
    """verl 0.9.1's `agg_loss`, restated in float64.

    - token-mean: masked token sum / batch_num_tokens * dp_size (default: this rank's tokens);
    - token-sum: masked token sum * dp_size;
    - seq-mean-token-sum: sum over non-empty rows of their token sums / global_batch_size *
      dp_size (default: this rank's non-empty rows);
    - seq-mean-token-sum-norm: the seq-mean-token-sum value / loss_scale_factor (default: the
      horizon `loss_mask.shape[-1]`);
    - seq-mean-token-mean: sum over non-empty rows of sum / (count + 1e-8), / global_batch_size *
      dp_size.
    """
    loss_mat = loss_mat.to(torch.float64)
    mask = loss_mask.to(torch.float64)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = mask.sum()
        return masked_sum(loss_mat, mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, mask) * dp_size
    token_count = mask.sum(-1)
    seq_mask = (token_count > 0).to(torch.float64)
    if global_batch_size is None:
        global_batch_size = seq_mask.sum()
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = (loss_mat * mask).sum(-1)
        loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            if loss_scale_factor is None:
                loss_scale_factor = loss_mask.shape[-1]
            loss = loss / loss_scale_factor
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * mask).sum(-1) / (token_count + 1e-8)
        return masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    raise ValueError(loss_agg_mode)


def policy_loss_vanilla(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns `(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)` like verl's vanilla loss.

    `clip_ratio_c=None` switches the dual clip off (verl always applies it; None is `c = inf`).
    """
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    ppo_kl = masked_mean(-log_ratio, response_mask)
    plain = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pessimistic = torch.maximum(plain, clipped)
    pg_clipfrac = masked_mean((clipped > plain).to(torch.float64), response_mask)
    if clip_ratio_c is None:
        losses = pessimistic
        pg_clipfrac_lower = torch.zeros((), dtype=torch.float64)
    else:
        floor = -advantages * clip_ratio_c
        lower = ((pessimistic > floor) & (advantages < 0)).to(torch.float64)
        pg_clipfrac_lower = masked_mean(lower, response_mask)
        losses = torch.where(advantages < 0, torch.minimum(floor, pessimistic), pessimistic)
    pg_loss = agg_loss(losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str) -> Tensor:
    if kind in ("kl", "k1"):
        return logprob - ref_logprob
    if kind in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob) ** 2
    if kind in ("low_var_kl", "k3"):
        d = (ref_logprob - logprob).clamp(-20.0, 20.0)
        return (d.exp() - d - 1.0).clamp(-10.0, 10.0)
    raise ValueError(kind)


def actor_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_agg_mode: str,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
    entropy: Tensor | None = None,
    entropy_coeff: float = 0.0,
    ref_log_prob: Tensor | None = None,
    kl_loss_coef: float = 0.0,
    kl_loss_type: str = "low_var_kl",
) -> Tensor:
    """The actor's total loss as a verl update composes it: pg - c_H * H + c_KL * KL."""
    pg_loss, *_ = policy_loss_vanilla(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        clip_ratio_low,
        clip_ratio_high,
        clip_ratio_c,
    )
    total = pg_loss
    if entropy is not None:
        total = total - entropy_coeff * agg_loss(entropy, response_mask, loss_agg_mode)
    if ref_log_prob is not None:
        kld = kl_penalty(log_prob, ref_log_prob, kl_loss_type)
        total = total + kl_loss_coef * agg_loss(kld, response_mask, loss_agg_mode)
    return total
