r"""Max-variance down-sampling of rollouts (PODS), a competing rule for a cheaper update.

PODS (Xu et al. 2025, "Not All Rollouts are Useful: Down-Sampling Rollouts in LLM Reinforcement
Learning", arXiv 2504.13818) generates $n$ rollouts per prompt but updates on only $m < n$ of them:
the subset whose rewards have the largest variance. Where PCM keeps every trajectory and drops
chunks inside it, PODS drops whole trajectories, so the two compete at equal update compute.

For a fixed subset size the variance is maximised by taking the $k$ lowest and the $m - k$
highest rewards for some $k$ (PODS, Lemma 1), so a sort and a scan over $k$ find the optimum in
$O(n \log n)$ per group.
"""

import torch
from jaxtyping import Bool, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_positive_int,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from chunkmask.advantages import dense_group_ids

__all__ = ["max_variance_downsample"]


def max_variance_downsample(
    rewards: Real[Tensor, " traj"] | Bool[Tensor, " traj"],
    group: Int[Tensor, " traj"],
    m: int,
) -> Bool[Tensor, " traj"]:
    r"""Keep, in every group, the `m` rollouts whose rewards have the largest variance.

    $$
    S_g = \operatorname*{arg\,max}_{S \subseteq g,\ |S| = m} \operatorname{Var}(\{r_j\}_{j\in S})
    $$

    Among equal-variance subsets the one found first by the scan over $k$ (the number of lowest
    rewards taken) wins, and equal rewards are ordered by a stable sort, so the result is
    deterministic. A group with at most `m` rollouts is kept whole. Recompute the
    advantages on the kept rollouts (`group_relative_advantages(..., valid=keep)`), as PODS does.

    This reads the group sizes on the host (one sync), like any per-group loop; it is meant for
    once per rollout batch.

    Args:
        rewards: `(traj,)` reward (or bool success) of each rollout.
        group: `(traj,)` integer group label (the prompt id).
        m: rollouts kept per group, `>= 1`.

    Returns:
        `(traj,)` bool keep mask.

    Raises:
        TypeError: on a non-real `rewards`, a non-integer `group` or a non-int `m`.
        ValueError: on shapes or devices that differ, `m < 1`, or a NaN/Inf reward.

    Example:
        >>> import torch
        >>> r = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0, 1.0])
        >>> max_variance_downsample(r, torch.zeros(6, dtype=torch.long), 4).tolist()
        [True, True, False, False, True, True]
    """
    check_tensor(rewards, "rewards", ndim=1, dtypes=("float", "int", "bool"))
    check_tensor(group, "group", ndim=1, dtypes="int")
    check_same_shape(group, "group", rewards, "rewards")
    check_same_device(group, "group", rewards, "rewards")
    m = check_positive_int(m, "m")
    r = rewards.to(torch.float64)
    check_finite(r, "rewards")
    n = r.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=r.device)
    if n == 0:
        return keep
    gid = dense_group_ids(group)
    # Sort by (group, reward, index): each group's rewards become a contiguous ascending run.
    order = torch.arange(n, device=r.device)
    by_reward = torch.sort(r, stable=True).indices
    by_group = torch.sort(gid[by_reward], stable=True).indices
    perm = order[by_reward][by_group]
    sizes = torch.bincount(gid, minlength=int(gid.max()) + 1).tolist()
    start = 0
    for size in sizes:
        members = perm[start : start + size]
        start += size
        if size <= m:
            keep[members] = True
            continue
        values = r[members]
        # Subset k: the k lowest and the m - k highest, for k = 0..m; its variance from prefix sums.
        low_sum = torch.cat([values.new_zeros(1), torch.cumsum(values[:m], 0)])
        low_sq = torch.cat([values.new_zeros(1), torch.cumsum(values[:m].square(), 0)])
        rev = values.flip(0)
        high_sum = torch.cat([values.new_zeros(1), torch.cumsum(rev[:m], 0)])
        high_sq = torch.cat([values.new_zeros(1), torch.cumsum(rev[:m].square(), 0)])
        k = torch.arange(m + 1, device=r.device)
        total = low_sum[k] + high_sum[m - k]
        total_sq = low_sq[k] + high_sq[m - k]
        var = total_sq / m - (total / m).square()
        best = int(torch.argmax(var + 0.0))  # first maximum
        chosen = torch.cat([members[:best], members[size - (m - best) :]])
        keep[chosen] = True
    return keep
