"""Advantage estimators for outcome-rewarded rollouts.

`group_relative_advantages` is the GRPO advantage of Eq. (1): each trajectory's outcome reward is
standardised against the other rollouts of its prompt group. All group statistics are segment
reductions over the batch (no Python loop over groups), so any number of groups with arbitrary
int64 labels costs a constant number of kernels.
"""

import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_real,
    check_same_device,
    check_same_shape,
    check_tensor,
)

__all__ = ["group_relative_advantages"]


def _dense_group_ids(group: Tensor) -> Tensor:
    """Map arbitrary integer labels to dense ids in `[0, traj)`, without a host sync.

    Labels are ranked in ascending order (equal labels share an id). Unlike
    `torch.unique(return_inverse=True)` every shape is static, so the step neither waits for the
    device nor breaks a `torch.compile` graph. The ids are `0..G-1` with `G <= traj`, so `traj`
    buckets always suffice for the segment reductions.
    """
    n = group.shape[0]
    sorted_labels, order = torch.sort(group.to(torch.int64), stable=True)
    starts = torch.ones(n, dtype=torch.int64, device=group.device)
    if n > 1:
        starts[1:] = (sorted_labels[1:] != sorted_labels[:-1]).to(torch.int64)
    dense_sorted = torch.cumsum(starts, dim=0) - 1
    return torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)


def group_relative_advantages(
    rewards: Real[Tensor, " traj"] | Bool[Tensor, " traj"],
    group: Int[Tensor, " traj"],
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    valid: Bool[Tensor, " traj"] | None = None,
    validate_args: bool = True,
) -> Float[Tensor, " traj"]:
    r"""Standardise each trajectory's outcome reward within its prompt group (GRPO advantage).

    $$
    A_i = \frac{r_i - \operatorname{mean}_{j \in g(i)} r_j}
               {\operatorname{std}_{j \in g(i)} r_j + \varepsilon},
    \qquad
    \operatorname{std}_{j \in g} r_j = \sqrt{\tfrac{1}{|g| - 1}
        \textstyle\sum_{j \in g} (r_j - \bar r_g)^2}
    $$

    See Eq. (1) of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154. The
    standard deviation is Bessel-corrected, as `torch.std` in verl's
    `compute_grpo_outcome_advantage`. With `scale_by_std=False` the advantage is the centred
    reward $r_i - \bar r_{g(i)}$ (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783).

    Conventions:

    - A group with a single (valid) member gets $A = 0$. verl instead uses mean 0 and std 1
      there, which gives $A_i = r_i / (1 + \varepsilon)$; a lone rollout carries no
      group-relative signal, so chunkmask returns 0.
    - A group whose (valid) rewards are all equal gets exactly $A = 0$, whatever the
      floating-point rounding of its mean.
    - Trajectories with `valid` False are left out of every group statistic and get $A = 0$
      (use it for rollouts dropped by dynamic sampling or truncated by the environment).
    - Statistics are computed in float64. A floating `rewards` returns its own dtype; an integer
      or bool `rewards` returns float32.
    - With `validate_args=False` there is no host synchronisation (group labels are ranked by
      a sort, not `torch.unique`).

    Args:
        rewards: `(traj,)` outcome reward of each trajectory (float, int or bool).
        group: `(traj,)` integer group label of each trajectory (the prompt id). Labels are
            arbitrary integers, need not be contiguous or sorted.
        eps: $\varepsilon$ added to the standard deviation, `>= 0` (verl: 1e-6).
        scale_by_std: divide by the group standard deviation (GRPO) or not (Dr. GRPO).
        valid: `(traj,)` bool, False for trajectories excluded from the statistics. Defaults to
            all True.
        validate_args: check that the valid rewards are finite (one device sync).

    Returns:
        `(traj,)` advantages, in the dtype described above.

    Raises:
        TypeError: if `rewards` is not a real or bool tensor, `group` not an integer tensor or
            `valid` not a bool tensor.
        ValueError: if the tensors are not 1-D, their shapes or devices differ, `eps` is negative
            or not finite, or (with `validate_args`) a valid reward is NaN/Inf.

    Examples:
        >>> import torch
        >>> rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
        >>> group = torch.tensor([7, 7, 7, 3, 3, 9])
        >>> group_relative_advantages(rewards, group)
        tensor([ 1.1547, -0.5773, -0.5773,  0.0000,  0.0000,  0.0000])
    """
    check_tensor(rewards, "rewards", ndim=1, dtypes=("float", "int", "bool"))
    check_tensor(group, "group", ndim=1, dtypes="int")
    check_same_shape(group, "group", rewards, "rewards")
    check_same_device(group, "group", rewards, "rewards")
    if valid is not None:
        check_tensor(valid, "valid", ndim=1, dtypes="bool")
        check_same_shape(valid, "valid", rewards, "rewards")
        check_same_device(valid, "valid", rewards, "rewards")
    eps = check_real(eps, "eps")
    if eps < 0:
        raise ValueError(f"`eps` must be >= 0, got {eps}.")
    if validate_args:
        check_finite(rewards, "rewards", where=valid)

    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    n = rewards.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)

    keep = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    # Sanitise before any arithmetic so that NaN/Inf in excluded rewards cannot leak.
    r = torch.where(keep, rewards.to(torch.float64), 0.0)
    gid = _dense_group_ids(group)
    zeros = torch.zeros(n, dtype=torch.float64, device=rewards.device)
    count = zeros.index_add(0, gid, keep.to(torch.float64))
    total = zeros.index_add(0, gid, r)
    mean = total / count.clamp_min(1.0)
    centred = torch.where(keep, r - mean[gid], 0.0)
    if scale_by_std:
        sq = zeros.index_add(0, gid, centred.square())
        std = torch.sqrt(sq / (count - 1.0).clamp_min(1.0))
        adv = centred / (std[gid] + eps) if eps > 0 else centred / std[gid].clamp_min(1e-300)
    else:
        adv = centred
    # Exact zeros for constant groups (rounding of the mean would otherwise leave ~1e-17 / eps).
    big = torch.finfo(torch.float64).max
    low = torch.full((n,), big, dtype=torch.float64, device=rewards.device).scatter_reduce(
        0, gid, torch.where(keep, r, big), reduce="amin", include_self=True
    )
    high = torch.full((n,), -big, dtype=torch.float64, device=rewards.device).scatter_reduce(
        0, gid, torch.where(keep, r, -big), reduce="amax", include_self=True
    )
    informative = keep & (count[gid] > 1.5) & (high[gid] > low[gid])
    return torch.where(informative, adv, 0.0).to(out_dtype)
