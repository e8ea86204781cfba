r"""Advantage estimators: group-relative (GRPO), chunk-level GAE (PPO), and whitening.

- `group_relative_advantages` is the GRPO advantage of Eq. (1): each trajectory's outcome reward
  is standardised against the other rollouts of its prompt group. All group statistics are
  segment reductions over the batch (no Python loop over groups), so any number of groups with
  arbitrary int64 labels costs a constant number of kernels.
- `chunk_rewards` and `chunk_gae` treat an action chunk as one decision, as the action-chunked PPO
  paper (2026) does: a chunk's reward is the discounted sum of its step rewards, and GAE runs over
  chunks with the discount $\gamma^H$ between them.
- `whiten_advantages` normalises advantages over the valid entries (verl's `masked_whiten`).
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_min_ndim,
    check_positive_int,
    check_range,
    check_real,
    check_same_device,
    check_same_shape,
    check_tensor,
    resolve_mask,
    values_checkable,
)
from chunkmask.aggregation import compute_dtype

__all__ = [
    "ChunkGAEOutput",
    "chunk_gae",
    "chunk_rewards",
    "group_relative_advantages",
    "whiten_advantages",
]


def dense_group_ids(group: Tensor) -> Tensor:
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
    validate_args: bool = False,
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
    gid = dense_group_ids(group)
    zeros = torch.zeros(n, dtype=torch.float64, device=rewards.device)
    count = zeros.index_add(0, gid, keep.to(torch.float64))
    total = zeros.index_add(0, gid, r)
    mean = total / count.clamp_min(1.0)
    centred = torch.where(keep, r - mean[gid], 0.0)
    if scale_by_std:
        sq = zeros.index_add(0, gid, centred.square())
        var = sq / (count - 1.0).clamp_min(1.0)
        # Double where: sqrt'(0) is infinite, which would put NaN into constant groups' gradients.
        positive = var > 0
        std = torch.where(positive, torch.sqrt(torch.where(positive, var, 1.0)), 0.0)
        den = std[gid] + eps
        adv = centred / torch.where(den > 0, den, 1.0)
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


def chunk_rewards(
    rewards: Real[Tensor, "*batch step"],
    mask: Bool[Tensor, "*batch step"] | None = None,
    *,
    gamma: float = 0.99,
    validate_args: bool = False,
) -> Float[Tensor, "*batch"]:
    r"""Turn the step rewards of each chunk into one chunk reward, discounted within the chunk.

    $$
    R_{t} = \sum_{j=0}^{H-1} \gamma^{j}\, r_{t,j}\, m_{t,j}
    $$

    where $r_{t,j}$ is the reward of step $j$ of chunk $t$ and $m_{t,j}$ marks the steps that ran
    (a chunk cut short by termination has a suffix of masked steps). With $\gamma = 1$ this is the
    plain sum used by the action-chunked PPO paper (2026); with the step discount it makes the
    chunk-level return equal the step-level discounted return, since chunks are then discounted by
    $\gamma^H$ (see `chunk_gae`).

    Args:
        rewards: `(*batch, H)` step rewards, the last axis being the steps of one chunk, e.g.
            `(traj, chunk, H)`.
        mask: `(*batch, H)` bool, True for steps that were executed. Masked steps may hold
            anything, NaN included. Defaults to all True.
        gamma: per-step discount in `[0, 1]`.
        validate_args: check that the executed steps' rewards are finite (off by default: one host sync).

    Returns:
        `(*batch,)` chunk rewards, float32 (float64 for float64 input).

    Raises:
        TypeError: if `rewards` is not a real tensor or `mask` is not bool.
        ValueError: if `rewards` has no step axis, `mask` has another shape, or `gamma` is outside
            `[0, 1]`.

    Example:
        >>> import torch
        >>> r = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 5.0, float("nan")]]])
        >>> m = torch.tensor([[[True, True, True], [True, True, False]]])
        >>> chunk_rewards(r, m, gamma=0.5)
        tensor([[1.7500, 3.5000]])
    """
    check_tensor(rewards, "rewards", dtypes=("float", "int"))
    check_min_ndim(rewards, "rewards", 1)
    mask = resolve_mask(mask, "mask", rewards, "rewards")
    gamma = check_range(gamma, "gamma", low=0.0, high=1.0)
    if values_checkable(rewards, validate_args):
        check_finite(rewards, "rewards", where=mask)
    dtype = compute_dtype(rewards.dtype)
    steps = rewards.shape[-1]
    discounts = gamma ** torch.arange(steps, device=rewards.device, dtype=torch.float64)
    safe = torch.where(mask, rewards.to(dtype), 0)
    return (safe * discounts.to(dtype)).sum(-1)


class ChunkGAEOutput(NamedTuple):
    r"""Result of `chunk_gae`.

    Attributes:
        advantages: `(traj, chunk)` GAE advantages $\hat A_t$; 0 at padding.
        returns: `(traj, chunk)` value targets $\hat A_t + V_t$; 0 at padding.
    """

    advantages: Float[Tensor, "traj chunk"]
    returns: Float[Tensor, "traj chunk"]


def chunk_gae(
    rewards: Float[Tensor, "traj chunk"],
    values: Float[Tensor, "traj chunk"],
    valid: Bool[Tensor, "traj chunk"] | None = None,
    *,
    terminated: Bool[Tensor, "traj chunk"] | None = None,
    truncated: Bool[Tensor, "traj chunk"] | None = None,
    next_values: Float[Tensor, "traj chunk"] | None = None,
    bootstrap_value: Float[Tensor, " traj"] | None = None,
    chunk_steps: Int[Tensor, "traj chunk"] | None = None,
    gamma: float = 0.99,
    lam: float = 0.95,
    chunk_size: int = 1,
    validate_args: bool = False,
) -> ChunkGAEOutput:
    r"""Generalised advantage estimation over chunks, with the discount $\gamma^{H}$ between chunks.

    $$
    \delta_t = R_t + \gamma^{h_t}\, \bar V_{t+1} - V_t, \qquad
    \hat A_t = \delta_t + \gamma^{h_t} \lambda\, c_t\, \hat A_{t+1}, \qquad
    \hat G_t = \hat A_t + V_t,
    $$

    where $R_t$ is the chunk reward (`chunk_rewards`), $h_t$ the number of steps chunk $t$ ran
    ($H$ = `chunk_size` unless `chunk_steps` says otherwise), and the next value and the
    continuation flag $c_t$ are

    - `terminated[t]` (a true terminal state, e.g. success or failure): $\bar V_{t+1} = 0$,
      $c_t = 0$;
    - `truncated[t]` (time limit; the state is not terminal): $\bar V_{t+1}$ =
      `next_values[t]`, the value of the observation after the chunk, and $c_t = 0$;
    - otherwise, if chunk $t+1$ is valid: $\bar V_{t+1} = V_{t+1}$, $c_t = 1$;
    - otherwise (the row's last valid chunk, cut by the end of the rollout):
      $\bar V_{t+1}$ = `bootstrap_value` (0 if not given), $c_t = 0$.

    A row may hold several episodes back to back (auto-reset rollouts): `terminated` and
    `truncated` cut the trace inside the row. $\lambda$ applies per chunk: a chunk is one decision.
    This is the chunk-level GAE of the action-chunked PPO paper (2026) and of RLinf's chunk-level
    PPO; with $H = 1$ it is Schulman et al. (2016), https://arxiv.org/abs/1506.02438, Eq. (16).

    Note:
        `valid` must be a prefix of each row (padding at the end), as a padded rollout batch is.
        Padding (invalid chunks) may hold anything, NaN included, and gets advantage and return 0.
        The backward pass runs as a Python loop over the chunk axis (vectorised over
        trajectories); the output carries no gradient.

    Args:
        rewards: `(traj, chunk)` chunk rewards $R_t$.
        values: `(traj, chunk)` value estimates $V_t$ of each chunk's first observation.
        valid: `(traj, chunk)` bool, True for real chunks. Defaults to all True.
        terminated: `(traj, chunk)` bool, True where the episode ended in a terminal state during
            the chunk. Defaults to all False.
        truncated: `(traj, chunk)` bool, True where the episode was cut (time limit) during the
            chunk; bootstraps with `next_values`. Defaults to all False. Where both flags are set,
            `terminated` wins.
        next_values: `(traj, chunk)` value of the observation after each chunk; read only where
            `truncated` is True. Required when `truncated` is given.
        bootstrap_value: `(traj,)` value of the observation after each row's last valid chunk,
            used when that chunk neither terminated nor was truncated. Defaults to 0.
        chunk_steps: `(traj, chunk)` integer number of steps each chunk ran, for the discount
            $\gamma^{h_t}$. Defaults to `chunk_size` everywhere.
        gamma: per-step discount in `[0, 1]`.
        lam: GAE $\lambda$ in `[0, 1]`, applied once per chunk.
        chunk_size: the chunk length $H$.
        validate_args: check that `valid` is a prefix of each row and that the inputs are finite
            at valid chunks (one host sync).

    Returns:
        A `ChunkGAEOutput` of `(traj, chunk)` advantages and returns, float32 (float64 for
        float64 input), detached.

    Raises:
        TypeError: on a non-float `rewards`/`values`/`next_values`/`bootstrap_value`, a non-bool
            mask or flag, or a non-integer `chunk_steps`.
        ValueError: on mismatched shapes, `gamma`/`lam` outside `[0, 1]`, a non-positive
            `chunk_size`, `truncated` without `next_values`, and (with `validate_args`) a `valid`
            that is not a prefix or non-finite inputs at valid chunks.

    Example:
        >>> import torch
        >>> r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
        >>> v = torch.zeros(2, 3)
        >>> out = chunk_gae(r, v, terminated=torch.tensor([[False, False, True], [False] * 3]),
        ...                 gamma=0.5, lam=1.0, chunk_size=2)
        >>> out.advantages
        tensor([[0.0625, 0.2500, 1.0000],
                [0.0000, 0.0000, 0.0000]])
    """
    check_tensor(rewards, "rewards", ndim=2, dtypes="float")
    check_tensor(values, "values", ndim=2, dtypes="float")
    check_same_shape(values, "values", rewards, "rewards")
    check_same_device(values, "values", rewards, "rewards")
    valid = resolve_mask(valid, "valid", rewards, "rewards")
    if terminated is None:
        terminated = torch.zeros_like(valid)
    else:
        terminated = resolve_mask(terminated, "terminated", rewards, "rewards")
    if truncated is not None:
        truncated = resolve_mask(truncated, "truncated", rewards, "rewards")
        if next_values is None:
            raise ValueError("`next_values` is required when `truncated` is given, got None.")
    else:
        truncated = torch.zeros_like(valid)
    if next_values is not None:
        check_tensor(next_values, "next_values", ndim=2, dtypes="float")
        check_same_shape(next_values, "next_values", rewards, "rewards")
        check_same_device(next_values, "next_values", rewards, "rewards")
    if bootstrap_value is not None:
        check_tensor(bootstrap_value, "bootstrap_value", ndim=1, dtypes="float")
        if bootstrap_value.shape[0] != rewards.shape[0]:
            raise ValueError(
                f"`bootstrap_value` must have shape ({rewards.shape[0]},) (one per row of "
                f"`rewards`), got {tuple(bootstrap_value.shape)}."
            )
        check_same_device(bootstrap_value, "bootstrap_value", rewards, "rewards")
    if chunk_steps is not None:
        check_tensor(chunk_steps, "chunk_steps", ndim=2, dtypes="int")
        check_same_shape(chunk_steps, "chunk_steps", rewards, "rewards")
        check_same_device(chunk_steps, "chunk_steps", rewards, "rewards")
    gamma = check_range(gamma, "gamma", low=0.0, high=1.0)
    lam = check_range(lam, "lam", low=0.0, high=1.0)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if validate_args:
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError(
                "`valid` must be a prefix of each row (padding only at the end), got a valid "
                "chunk after a padded one."
            )
        check_finite(rewards, "rewards", valid)
        check_finite(values, "values", valid)
        if next_values is not None:
            check_finite(next_values, "next_values", truncated & ~terminated & valid)
        if bootstrap_value is not None:
            check_finite(bootstrap_value, "bootstrap_value")
        if chunk_steps is not None:
            negative = (chunk_steps < 0) & valid
            if bool(negative.any()):
                raise ValueError(
                    f"`chunk_steps` must be >= 0 at valid chunks, got {int(negative.sum())} "
                    "negative value(s)."
                )

    dtype = compute_dtype(torch.promote_types(rewards.dtype, values.dtype))
    num_traj, num_chunks = rewards.shape
    with torch.no_grad():
        r = torch.where(valid, rewards.to(dtype), 0)
        v = torch.where(valid, values.to(dtype), 0)
        truncated = truncated & ~terminated
        if next_values is not None:
            nv = torch.where(truncated & valid, next_values.to(dtype), 0)
        else:
            nv = torch.zeros_like(r)
        boot = (
            torch.zeros(num_traj, dtype=dtype, device=r.device)
            if bootstrap_value is None
            else bootstrap_value.to(dtype)
        )
        if chunk_steps is None:
            disc = torch.full_like(r, gamma**chunk_size)
        else:
            steps = torch.where(valid, chunk_steps, 0).to(dtype)
            disc = torch.pow(torch.as_tensor(gamma, dtype=dtype, device=r.device), steps)

        # Value of the state after chunk t when the trace continues into chunk t + 1.
        next_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
        # Row end: bootstrap with `bootstrap_value` on the last valid chunk.
        boot_next = torch.where(next_valid, v_next, boot[:, None])
        next_value = torch.where(terminated, 0, torch.where(truncated, nv, boot_next))
        boot_ok = torch.isfinite(next_value) | ~valid
        next_value = torch.where(boot_ok, next_value, 0)
        cont = next_valid & ~terminated & ~truncated
        delta = r + disc * next_value - v
        delta = torch.where(valid, delta, 0)
        coef = torch.where(cont, disc * lam, 0)

        advantages = torch.zeros_like(r)
        running = torch.zeros(num_traj, dtype=dtype, device=r.device)
        for t in range(num_chunks - 1, -1, -1):
            running = delta[:, t] + coef[:, t] * running
            advantages[:, t] = running
        advantages = torch.where(valid, advantages, 0)
        returns = torch.where(valid, advantages + v, 0)
    return ChunkGAEOutput(advantages, returns)


def whiten_advantages(
    advantages: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    validate_args: bool = False,
) -> Float[Tensor, "*batch"]:
    r"""Normalise advantages to zero mean and unit variance over the masked entries.

    $$
    \tilde A = \frac{A - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad
    \mu = \frac{\sum m A}{\sum m}, \quad
    \sigma^2 = \frac{\sum m (A - \mu)^2}{\sum m - 1}
    $$

    (Bessel-corrected, as verl's `masked_whiten`). With `shift_mean=False` the mean is added back,
    so only the scale changes. Masked entries are returned as 0; they may hold NaN. Fewer than two
    valid entries give a variance of 0.

    Args:
        advantages: advantages of any shape.
        mask: bool of the same shape, True for entries that count. Defaults to all True.
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance, `>= 0`.
        validate_args: check that the valid advantages are finite (off by default: one host sync).

    Returns:
        Whitened advantages, same shape and dtype as `advantages` (statistics in float32 or
        float64).

    Raises:
        TypeError: if `advantages` is not floating point or `mask` is not bool.
        ValueError: if `mask` has another shape or `eps` is negative.

    Example:
        >>> import torch
        >>> a = torch.tensor([[1.0, 2.0, 3.0, float("nan")]])
        >>> whiten_advantages(a, torch.tensor([[True, True, True, False]]))
        tensor([[-1.,  0.,  1.,  0.]])
    """
    check_tensor(advantages, "advantages", dtypes="float")
    mask = resolve_mask(mask, "mask", advantages, "advantages")
    eps = check_range(eps, "eps", low=0.0)
    if values_checkable(advantages, validate_args):
        check_finite(advantages, "advantages", where=mask)
    dtype = compute_dtype(advantages.dtype)
    a = torch.where(mask, advantages.to(dtype), 0)
    count = mask.sum().to(dtype)
    mean = a.sum() / count.clamp_min(1)
    centred = torch.where(mask, a - mean, 0)
    var = centred.square().sum() / (count - 1).clamp_min(1)
    spread = var + eps
    # A constant input with eps = 0 has spread 0: its centred values are all 0, so scale by 1.
    out = centred * torch.rsqrt(torch.where(spread > 0, spread, torch.ones_like(spread)))
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0).to(advantages.dtype)
