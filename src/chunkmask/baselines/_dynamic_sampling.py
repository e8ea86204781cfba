r"""Dynamic sampling: keep only the prompt groups whose success rate carries a gradient.

A GRPO group in which every rollout succeeds, or every rollout fails, has advantage 0 for all its
members (Eq. 1): it contributes no gradient, yet a chunk selector spends its budget on it and a
token-mean loss counts its tokens in the denominator. SimpleVLA-RL, on which the PCM paper
builds, filters such groups out before the update (success rate in $[0.1, 0.9]$); DAPO does the
same for LLMs (Yu et al. 2025, arXiv 2503.14476, "dynamic sampling"). Apply the filter to full
GRPO as well as to a masked update, so that the compute comparison stays fair.
"""

import torch
from jaxtyping import Bool, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_range,
    check_same_device,
    check_same_shape,
    check_tensor,
    resolve_mask,
    values_checkable,
)
from chunkmask.advantages import dense_group_ids

__all__ = ["dynamic_sampling_mask"]


def dynamic_sampling_mask(
    success: Real[Tensor, " traj"] | Bool[Tensor, " traj"],
    group: Int[Tensor, " traj"],
    *,
    low: float = 0.1,
    high: float = 0.9,
    valid: Bool[Tensor, " traj"] | None = None,
    validate_args: bool = False,
) -> Bool[Tensor, " traj"]:
    r"""Keep the trajectories of groups whose success rate lies in `[low, high]`.

    $$
    \text{keep}_i = \big[\, \text{low} \le \bar s_{g(i)} \le \text{high} \,\big], \qquad
    \bar s_g = \frac{1}{|g|}\sum_{j \in g} s_j,
    $$

    with $s_j$ the success (or any reward in $[0, 1]$) of rollout $j$ and the mean over the valid
    members of group $g$. With the defaults a group of 8 rollouts is kept when 1 to 7 of them
    succeed: exactly the groups with a non-zero advantage. Segment reductions only: no host sync.

    Args:
        success: `(traj,)` bool success, or a real reward per trajectory.
        group: `(traj,)` integer group label (the prompt id); any integers.
        low: the smallest kept success rate, in `[0, 1]`.
        high: the largest kept success rate, in `[low, 1]`.
        valid: `(traj,)` bool, False for trajectories left out of the rates; they are never
            kept. Defaults to all True.
        validate_args: check that `success` is finite (off by default: one host sync).

    Returns:
        `(traj,)` bool keep mask.

    Raises:
        TypeError: on a non-real `success`, a non-integer `group` or a non-bool `valid`.
        ValueError: on shapes or devices that differ, bounds outside `[0, 1]` or `low > high`, or
            a NaN/Inf success.

    Example:
        >>> import torch
        >>> success = torch.tensor([True, True, False, True, False, False, True, False])
        >>> group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> dynamic_sampling_mask(success, group, low=0.1, high=0.9).tolist()
        [False, False, True, True, False, False, True, True]
    """
    check_tensor(success, "success", ndim=1, dtypes=("float", "int", "bool"))
    check_tensor(group, "group", ndim=1, dtypes="int")
    check_same_shape(group, "group", success, "success")
    check_same_device(group, "group", success, "success")
    valid = resolve_mask(valid, "valid", success, "success")
    low = check_range(low, "low", low=0.0, high=1.0)
    high = check_range(high, "high", low=low, high=1.0)
    if values_checkable(success, validate_args) and success.dtype.is_floating_point:
        check_finite(success, "success", where=valid)
    n = success.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=success.device)
    s = torch.where(valid, success.to(torch.float64), 0.0)
    gid = dense_group_ids(group)
    zeros = torch.zeros(n, dtype=torch.float64, device=success.device)
    count = zeros.index_add(0, gid, valid.to(torch.float64))
    rate = zeros.index_add(0, gid, s) / count.clamp_min(1.0)
    # A rounding margin so that a rate of exactly 0.1 or 0.9 (1 of 10) counts as inside.
    tol = 1e-12
    inside = (rate >= low - tol) & (rate <= high + tol) & (count > 0)
    return valid & inside[gid]
