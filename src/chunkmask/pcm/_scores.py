"""Per-phase success-failure action variance (Eq. 5), the score of the online buffer.

`success_failure_variance` measures, per phase, how far the mean action of successful rollouts
lies from that of failed rollouts of the same group (Eq. 5); `chunkmask.pcm` averages
these batch scores online. See Anonymous et al. (2026), Probabilistic Chunk Masking,
arXiv 2605.16154.
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Integer
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_min_ndim,
    check_option,
    check_positive_int,
    check_same_device,
    check_shape,
    check_tensor,
    resolve_valid,
)

__all__ = [
    "PhaseVariance",
    "success_failure_variance",
]


class PhaseVariance(NamedTuple):
    """Result of `success_failure_variance`.

    Attributes:
        scores: `(phase,)` float32 batch score $V_c$; 0 where the phase is not defined.
        defined: `(phase,)` bool, True where at least one group defines $V_{c,g}$. An undefined
            phase is *missing* for this batch, not zero.
        group_scores: `(group, phase)` float32 $V_{c,g}$, groups in ascending order of their
            label; 0 where not defined.
        group_defined: `(group, phase)` bool, True where group $g$ has phase $c$ in both a
            successful and a failed rollout.
    """

    scores: Float[Tensor, " phase"]
    defined: Bool[Tensor, " phase"]
    group_scores: Float[Tensor, "group phase"]
    group_defined: Bool[Tensor, "group phase"]


def success_failure_variance(
    features: Float[Tensor, "traj chunk *rest"],
    phases: Integer[Tensor, "traj chunk"],
    success: Bool[Tensor, " traj"],
    group: Integer[Tensor, " traj"],
    *,
    num_phases: int,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    weighting: Literal["uniform", "balance"] = "uniform",
    num_groups: int | None = None,
    validate_args: bool = False,
) -> PhaseVariance:
    r"""Compute the per-phase success-failure action variance of a batch of rollout groups.

    For every group $g$ and phase $c$ present in both its successful ($+$) and failed ($-$)
    rollouts, with $\mu^{\pm}_{c,g}$ the mean feature vector (e.g. the flattened $H \times D$
    action chunk) over those chunks,

    $$
    V_{c,g} = \frac{1}{d} \bigl\lVert \mu^{+}_{c,g} - \mu^{-}_{c,g} \bigr\rVert_2^2, \qquad
    V_c = \frac{\sum_{g \in \mathcal{G}_c} w_g V_{c,g}}{\sum_{g \in \mathcal{G}_c} w_g},
    $$

    where $d$ is the number of feature coordinates, $\mathcal{G}_c$ the groups defining
    $V_{c,g}$, and $w_g = 1$ (`"uniform"`, the paper's mean) or $w_g = p_g(1-p_g)$ with $p_g$ the
    success rate of the group (`"balance"`, the between-outcome variance weight of Lemma 2).
    See Eq. (5) of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154.

    Notes:
        - Dividing by $d$ (mean rather than sum over coordinates) is a choice; it rescales every
          phase equally, so the keep probabilities of Eq. 8-9 do not change.
        - Only groups with mixed outcomes can define a score; a group of all successes or all
          failures contributes nothing. $p_g$ counts every rollout of the group.
        - Sums run in float64 with one segment reduction (`index_add_`) over the composite key
          (group, phase, outcome); there are no Python loops over groups or phases. Group labels
          are arbitrary integers, remapped with `torch.unique` (one host sync); with
          `num_groups` they must instead be dense ids in `[0, num_groups)`, and the function
          makes no host sync at all when `validate_args=False` (it then runs under
          `torch.compile(fullgraph=True)`). Out-of-range ids are then ignored unchecked.
        - Padding contents (NaN/Inf included) never reach an output.

    Args:
        features: `(traj, chunk, *rest)` per-chunk features, usually the continuous actions
            `(traj, chunk, step, dim)`; any floating dtype (bf16 included).
        phases: `(traj, chunk)` integer phase ids in `[0, num_phases)` at valid chunks.
        success: `(traj,)` bool outcome of each rollout.
        group: `(traj,)` integer group (prompt) label of each rollout.
        num_phases: number of phases $C$.
        valid: `(traj, chunk)` bool mask of real chunks (default: all).
        weighting: `"uniform"` or `"balance"`, see above.
        num_groups: the number of groups $G$ when `group` holds dense ids in `[0, G)`; skips
            `torch.unique` (and its host sync). `group_scores` then has exactly `G` rows, row
            `g` for id `g` (a group with no rollout is simply undefined).
        validate_args: check that valid features are finite, valid phase ids in range and (with
            `num_groups`) group ids in range (one host sync).

    Returns:
        A `PhaseVariance` with float32 `scores` `(phase,)`, bool `defined` `(phase,)`, float32
        `group_scores` `(group, phase)` and bool `group_defined` `(group, phase)`.

    Raises:
        TypeError: if `features` is not floating point, `phases`/`group` not integer, `success`
            or `valid` not bool, or `num_phases`/`num_groups` not an int.
        ValueError: if a shape or device disagrees, `features` has fewer than 2 dimensions or no
            feature coordinate, `num_phases`/`num_groups` is not positive, `weighting` is
            unknown, or (with `validate_args`) a valid feature is NaN/Inf, a valid phase id or
            (with `num_groups`) a group id is out of range.

    Examples:
        >>> import torch
        >>> actions = torch.tensor([[[0.0], [1.0]], [[0.0], [3.0]]])  # (traj=2, chunk=2, dim=1)
        >>> phases = torch.tensor([[0, 1], [0, 1]])
        >>> out = success_failure_variance(actions, phases, torch.tensor([True, False]),
        ...                                torch.tensor([7, 7]), num_phases=3)
        >>> out.scores.tolist(), out.defined.tolist()
        ([0.0, 4.0, 0.0], [True, True, False])
    """
    return _success_failure_variance(
        features,
        phases,
        success,
        group,
        num_phases=num_phases,
        valid=valid,
        weighting=weighting,
        num_groups=num_groups,
        validate_args=validate_args,
        features_name="features",
    )


def _success_failure_variance(
    features: Tensor,
    phases: Tensor,
    success: Tensor,
    group: Tensor,
    *,
    num_phases: int,
    valid: Tensor | None,
    weighting: str,
    num_groups: int | None,
    validate_args: bool,
    features_name: str,
) -> PhaseVariance:
    """`success_failure_variance`, with errors naming `features` as the caller called it."""
    fname = features_name
    check_tensor(features, fname, dtypes="float")
    check_min_ndim(features, fname, 2)
    check_tensor(phases, "phases", ndim=2, dtypes="int")
    if phases.shape != features.shape[:2]:
        raise ValueError(
            f"`phases` must have shape {tuple(features.shape[:2])} (the first two sizes of "
            f"`{fname}`), got {tuple(phases.shape)}."
        )
    n_traj, n_chunk = features.shape[:2]
    check_tensor(success, "success", ndim=1, dtypes="bool")
    check_shape(success, "success", (n_traj,))
    check_tensor(group, "group", ndim=1, dtypes="int")
    check_shape(group, "group", (n_traj,))
    for x, name in ((phases, "phases"), (success, "success"), (group, "group")):
        check_same_device(x, name, features, fname)
    num_phases = check_positive_int(num_phases, "num_phases")
    if num_groups is not None:
        num_groups = check_positive_int(num_groups, "num_groups")
    check_option(weighting, "weighting", ("uniform", "balance"))
    valid = resolve_valid(valid, features, ref_name=fname)
    dim = 1
    for size in features.shape[2:]:
        dim *= int(size)
    x = features.reshape(n_traj, n_chunk, dim)
    if dim == 0:
        raise ValueError(
            f"`{fname}` must have at least one feature coordinate, got shape "
            f"{tuple(features.shape)}."
        )
    if validate_args:
        check_finite(x, fname, where=valid[:, :, None])
        bad = valid & ((phases < 0) | (phases >= num_phases))
        if bool(bad.any()):
            raise ValueError(
                f"`phases` must lie in [0, {num_phases}) (`num_phases`) at valid chunks, got "
                f"{sorted(set(phases[bad].tolist()))}."
            )
        if num_groups is not None and n_traj:
            low, high = int(group.min()), int(group.max())
            if low < 0 or high >= num_groups:
                raise ValueError(
                    f"`group` must hold ids in [0, {num_groups}) (`num_groups`), got values in "
                    f"[{low}, {high}]."
                )
    device = features.device
    if num_groups is None:
        labels, group_index = torch.unique(group, return_inverse=True)
        n_group = labels.shape[0]
        in_range = torch.ones(n_traj, dtype=torch.bool, device=device)
    else:
        n_group = num_groups
        in_range = (group >= 0) & (group < num_groups)
        group_index = torch.where(in_range, group, 0).to(torch.int64)
    n_key = n_group * num_phases * 2

    use = valid & (phases >= 0) & (phases < num_phases) & in_range[:, None]
    key = (group_index[:, None] * num_phases + phases.clamp(0, num_phases - 1)) * 2
    key = key + success[:, None].to(torch.int64)
    key = torch.where(use, key, n_key).reshape(-1)  # unused chunks go to a spare slot
    values = torch.where(use[:, :, None], x.to(torch.float64), 0.0).reshape(-1, dim)
    sums = torch.zeros(n_key + 1, dim, dtype=torch.float64, device=device)
    sums.index_add_(0, key, values)
    counts = torch.zeros(n_key + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, key, use.reshape(-1).to(torch.int64))
    sums = sums[:n_key].reshape(n_group, num_phases, 2, dim)
    counts = counts[:n_key].reshape(n_group, num_phases, 2)

    means = sums / counts.clamp_min(1)[..., None].to(torch.float64)
    group_defined = (counts > 0).all(dim=-1)
    gap = means[:, :, 1] - means[:, :, 0]
    group_scores = torch.where(group_defined, gap.square().mean(dim=-1), 0.0)

    if weighting == "uniform":
        weight = torch.ones(n_group, dtype=torch.float64, device=device)
    else:
        size = torch.zeros(n_group, dtype=torch.float64, device=device)
        size.index_add_(0, group_index, in_range.to(torch.float64))
        wins = torch.zeros(n_group, dtype=torch.float64, device=device)
        wins.index_add_(0, group_index, (success & in_range).to(torch.float64))
        rate = wins / size.clamp_min(1)
        weight = rate * (1 - rate)
    w = torch.where(group_defined, weight[:, None], 0.0)
    total = w.sum(dim=0)
    defined = group_defined.any(dim=0)
    scores = (w * group_scores).sum(dim=0) / torch.where(defined, total, 1.0)
    scores = torch.where(defined, scores, 0.0)
    return PhaseVariance(
        scores.to(torch.float32),
        defined,
        group_scores.to(torch.float32),
        group_defined,
    )
