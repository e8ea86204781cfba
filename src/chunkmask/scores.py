"""Per-phase success-failure action variance and the online phase-score buffer.

`success_failure_variance` measures, per phase, how far the mean action of successful rollouts
lies from that of failed rollouts of the same group (Eq. 5). `PhaseScoreBuffer` averages these
batch scores over a short window and turns them into phase keep probabilities every few steps
(Eq. 7-9). See Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154.
"""

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Integer
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_finite_nonnegative,
    check_min_ndim,
    check_option,
    check_positive_int,
    check_power,
    check_probability,
    check_process_group,
    check_same_device,
    check_same_shape,
    check_shape,
    check_tensor,
    resolve_mask,
    resolve_valid,
)
from chunkmask.allocation import keep_probabilities

__all__ = [
    "PhaseScoreBuffer",
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
    validate_args: bool = True,
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


_STATE_KEYS = ("keep_probabilities", "window_sum", "window_count", "window_steps", "num_updates")


class PhaseScoreBuffer:
    r"""Buffer batch phase scores and refresh the phase keep probabilities every few steps.

    Each `update` appends the batch score $V_c^{(s)}$ of every defined phase. Every $K$ =
    `refresh_every` updates the buffer collapses:

    $$
    \bar V_c = \frac{1}{|\mathcal{S}_c|} \sum_{s \in \mathcal{S}_c} V_c^{(s)}, \qquad
    s_c = \frac{\bar V_c}{\sum_{c'} \bar V_{c'}}, \qquad
    p_c = \max\Bigl(p_{\min}, \Bigl(\frac{s_c}{\max_{c'} s_{c'}}\Bigr)^{\gamma}\Bigr),
    $$

    where $\mathcal{S}_c$ are the buffered steps at which phase $c$ was defined and $\gamma$ is
    `power` (1 in the paper). See Eq. (7), (8) and (9) of Anonymous et al. (2026), Probabilistic
    Chunk Masking, arXiv 2605.16154; Eq. 8-9 are `chunkmask.allocation.keep_probabilities`.

    Notes:
        - The first update initialises $p_c$ from that batch's scores alone; it is also the first
          step of the first window, so the first refresh happens at update $K$.
        - Between refreshes $p_c$ is held fixed.
        - A phase with no defined step in the window (in particular one never seen) gets
          $p_{\min}$. A refresh whose window defines no phase at all holds the previous $p_c$.
          Before the first update every phase has keep probability 1.
        - With `process_group`, each update all-reduces the per-phase weighted score sums and
          weights, so every rank holds identical probabilities. Passing `weight =
          variance.group_defined.sum(0)` (the number of groups behind each score) makes the
          reduced step score equal the $V_c$ of the union batch whenever each group lives on one
          rank; without `weight` each rank's score counts once. Every rank must call `update`
          the same number of times.

    Args:
        num_phases: number of phases $C$.
        refresh_every: the refresh period $K \ge 1$ (5 in the paper).
        p_min: the floor $p_{\min} \in (0, 1]$ (0.1 in the paper).
        power: exponent $\gamma > 0$ after max normalisation (0.5 gives $p \propto s^{1/2}$).
        process_group: a `torch.distributed` process group to synchronise over, or None.

    Raises:
        TypeError: if `num_phases` or `refresh_every` is not an int, `power` not a number, or
            `process_group` neither None nor a `torch.distributed.ProcessGroup`.
        ValueError: if `num_phases` or `refresh_every` is not positive, `p_min` is outside
            (0, 1] or `power` is not a positive finite number.

    Examples:
        >>> import torch
        >>> buf = PhaseScoreBuffer(3, refresh_every=2, p_min=0.1)
        >>> buf.update(torch.tensor([0.0, 1.0, 4.0])).tolist()  # initialises
        [0.10000000149011612, 0.25, 1.0]
        >>> buf.update(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([True, True, False])).tolist()
        [0.5, 0.25, 1.0]
    """

    def __init__(
        self,
        num_phases: int,
        *,
        refresh_every: int = 5,
        p_min: float = 0.1,
        power: float = 1.0,
        process_group: Any = None,
    ) -> None:
        self.num_phases = check_positive_int(num_phases, "num_phases")
        self.refresh_every = check_positive_int(refresh_every, "refresh_every")
        self.p_min = check_probability(p_min, "p_min")
        self.power = check_power(power, "power")
        self.process_group = check_process_group(process_group, "process_group")
        self.reset()

    def reset(self) -> None:
        """Forget every buffered score and return to the state before the first update."""
        c = self.num_phases
        self._keep = torch.ones(c, dtype=torch.float32)
        self._window_sum = torch.zeros(c, dtype=torch.float64)
        self._window_count = torch.zeros(c, dtype=torch.int64)
        self._window_steps = 0
        self._num_updates = 0

    @property
    def keep_probabilities(self) -> Float[Tensor, " phase"]:
        """The current keep probabilities $p_c$, `(phase,)` float32 (a copy)."""
        return self._keep.clone()

    @property
    def num_updates(self) -> int:
        """Number of `update` calls since construction or the last `reset`."""
        return self._num_updates

    def _to(self, device: torch.device) -> None:
        if self._keep.device != device:
            self._keep = self._keep.to(device)
            self._window_sum = self._window_sum.to(device)
            self._window_count = self._window_count.to(device)

    def update(
        self,
        scores: Float[Tensor, " phase"],
        defined: Bool[Tensor, " phase"] | None = None,
        *,
        weight: Float[Tensor, " phase"] | None = None,
        validate_args: bool = True,
    ) -> Float[Tensor, " phase"]:
        """Append one batch's phase scores and return the keep probabilities for this step.

        Args:
            scores: `(phase,)` batch scores $V_c$ (e.g. `success_failure_variance(...).scores`);
                values at undefined phases are ignored (NaN allowed).
            defined: `(phase,)` bool, True where the score is defined (default: all).
            weight: `(phase,)` non-negative weight of each score when ranks are combined, e.g.
                the number of groups behind it (`variance.group_defined.sum(0)`). Default: 1 at
                defined phases. A zero weight makes the phase undefined on this rank.
            validate_args: check that defined scores are finite and non-negative and weights
                finite and non-negative (one host sync).

        Returns:
            `(phase,)` float32 keep probabilities in `[p_min, 1]` on the device of `scores`.

        Raises:
            TypeError: if `scores`/`weight` is not floating point or `defined` not bool.
            ValueError: if a shape or device disagrees, or (with `validate_args`) a defined score
                or a weight is NaN/Inf or negative.
        """
        c = self.num_phases
        check_tensor(scores, "scores", ndim=1, dtypes="float")
        check_shape(scores, "scores", (c,))
        defined = resolve_mask(defined, "defined", scores, "scores")
        if weight is not None:
            check_tensor(weight, "weight", ndim=1, dtypes="float")
            check_same_shape(weight, "weight", scores, "scores")
            check_same_device(weight, "weight", scores, "scores")
        if validate_args:
            check_finite_nonnegative(scores, "scores", defined, " at defined phases")
            if weight is not None:
                check_finite_nonnegative(weight, "weight")
        self._to(scores.device)

        w = torch.ones(c, dtype=torch.float64, device=scores.device)
        if weight is not None:
            w = weight.to(torch.float64)
        w = torch.where(defined, w, 0.0).detach()
        values = torch.where(defined, scores.detach().to(torch.float64), 0.0)
        stats = torch.stack([w * values, w])
        if self.process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.process_group)
        step_defined = stats[1] > 0
        step_score = torch.where(
            step_defined, stats[0] / torch.where(step_defined, stats[1], 1.0), 0.0
        )

        self._num_updates += 1
        self._window_sum = self._window_sum + step_score
        self._window_count = self._window_count + step_defined.to(torch.int64)
        self._window_steps += 1
        if self._num_updates == 1:
            self._keep = self._map(step_score, step_defined)
        if self._window_steps >= self.refresh_every:
            window_defined = self._window_count > 0
            mean = self._window_sum / self._window_count.clamp_min(1)  # Eq. 7
            fresh = self._map(mean, window_defined)
            self._keep = torch.where(window_defined.any(), fresh, self._keep)
            self._window_sum = torch.zeros_like(self._window_sum)
            self._window_count = torch.zeros_like(self._window_count)
            self._window_steps = 0
        return self._keep.clone()

    def _map(self, scores: Tensor, defined: Tensor) -> Tensor:
        p = keep_probabilities(
            scores, defined, p_min=self.p_min, power=self.power, validate_args=False
        )
        return p.to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """Return the buffer state: tensors (copies) and the step counters."""
        return {
            "keep_probabilities": self._keep.clone(),
            "window_sum": self._window_sum.clone(),
            "window_count": self._window_count.clone(),
            "window_steps": self._window_steps,
            "num_updates": self._num_updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from `state_dict`.

        Raises:
            ValueError: if a key is missing or unexpected, a tensor has the wrong shape or holds
                a NaN/Inf or negative value, a keep probability lies outside (0, 1], or a counter
                is not a non-negative int or is inconsistent with the others.
            TypeError: if `state` is not a mapping, a tensor entry is not a tensor of the right
                dtype kind, or a counter is not an int.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a mapping, got {type(state).__name__}.")
        missing = [k for k in _STATE_KEYS if k not in state]
        extra = [k for k in state if k not in _STATE_KEYS]
        if missing or extra:
            raise ValueError(
                f"`state` must have the keys {_STATE_KEYS}, missing {missing}, unexpected {extra}."
            )
        c = self.num_phases
        tensors = {}
        kinds = {"keep_probabilities": "float", "window_sum": "float", "window_count": "int"}
        for key, kind in kinds.items():
            name = f"state['{key}']"
            value = check_tensor(state[key], name, ndim=1, dtypes=kind)
            check_shape(value, name, (c,))
            check_finite_nonnegative(value, name)
            tensors[key] = value
        keep = tensors["keep_probabilities"]
        if bool(((keep <= 0) | (keep > 1)).any()):
            raise ValueError(
                f"`state['keep_probabilities']` must lie in (0, 1], got {keep.tolist()}."
            )
        window_steps = check_positive_int(
            state["window_steps"], "state['window_steps']", allow_zero=True
        )
        num_updates = check_positive_int(
            state["num_updates"], "state['num_updates']", allow_zero=True
        )
        if window_steps > num_updates:
            raise ValueError(
                f"`state['window_steps']` must be at most `state['num_updates']` ({num_updates}), "
                f"got {window_steps}."
            )
        if bool((tensors["window_count"] > window_steps).any()):
            raise ValueError(
                f"`state['window_count']` must be at most `state['window_steps']` "
                f"({window_steps}), got {tensors['window_count'].tolist()}."
            )
        device = self._keep.device
        self._keep = tensors["keep_probabilities"].to(device=device, dtype=torch.float32).clone()
        self._window_sum = tensors["window_sum"].to(device=device, dtype=torch.float64).clone()
        self._window_count = tensors["window_count"].to(device=device, dtype=torch.int64).clone()
        self._window_steps = window_steps
        self._num_updates = num_updates

    def __repr__(self) -> str:
        return (
            f"PhaseScoreBuffer(num_phases={self.num_phases}, refresh_every={self.refresh_every}, "
            f"p_min={self.p_min}, power={self.power}, num_updates={self._num_updates})"
        )
