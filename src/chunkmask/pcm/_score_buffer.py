"""The online phase-score buffer: batch scores averaged over a window, keep probabilities.

`PhaseScoreBuffer` averages the per-phase success-failure variances of `success_failure_variance`
(Eq. 5) over a short window and turns them into phase keep probabilities every few steps
(Eq. 7-9), optionally all-reduced over a process group. See Anonymous et al. (2026),
Probabilistic Chunk Masking, arXiv 2605.16154.
"""

from collections.abc import Mapping
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite_nonnegative,
    check_option,
    check_positive_int,
    check_power,
    check_probability,
    check_process_group,
    check_range,
    check_same_device,
    check_same_shape,
    check_shape,
    check_tensor,
    resolve_mask,
)
from chunkmask.pcm._allocation import keep_probabilities

__all__ = ["PhaseScoreBuffer"]


_STATE_KEYS = (
    "keep_probabilities",
    "window_sum",
    "window_count",
    "window_weighted_sum",
    "window_weight",
    "window_steps",
    "num_updates",
)


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
    Chunk Masking, arXiv 2605.16154; Eq. 8-9 are `chunkmask.pcm.keep_probabilities`.

    Thinly defined phases. Eq. 7 gives a phase seen in one group of one step the weight of a phase
    seen in every group of every step, so one noisy score can take $p_c = 1$ and rescale all the
    others. Two options guard against it; both read the per-step `weight` of `update` (pass the
    number of groups behind each score, `variance.group_defined.sum(0)`, as
    `ProbabilisticChunkMasker` does; without `weight` each defined step counts 1):

    - `window="weighted"` averages by weight, $\bar V_c = \sum_s n_{c,s} V_c^{(s)} / \sum_s
      n_{c,s}$: the window mean of the union of the window's groups;
    - `min_groups` $m$: a phase whose window support $\sum_s n_{c,s}$ is below $m$ is treated
      as undefined at the refresh (keep probability $p_{\min}$), and so is a phase defined by
      fewer than $m$ groups at the first update.

    Notes:
        - The first update initialises $p_c$ from that batch's scores alone; it is also the first
          step of the first window, so the first refresh happens at update $K$.
        - Between refreshes $p_c$ is held fixed.
        - A phase with no defined step in the window (in particular one never seen), or with
          less support than `min_groups`, gets $p_{\min}$. A refresh whose window defines no phase at all holds the previous $p_c$.
          Before the first update every phase has keep probability 1.
        - With `process_group`, each update all-reduces the per-phase weighted score sums and
          weights, so every rank holds identical probabilities. Passing `weight =
          variance.group_defined.sum(0)` (the number of groups behind each score) makes the
          reduced step score equal the $V_c$ of the union batch whenever each group lives on one
          rank; without `weight` each rank's score counts once. Every rank must call `update`
          the same number of times.
        - The step counters (`num_updates` and the steps into the current window) are 0-d int64
          tensors on the device of the scores, updated with tensor ops: `update` has no Python
          branch on the step, so `torch.compile` reuses one graph for every step, and
          `state_dict` / `load_state_dict` round-trip them (as 0-d tensors; plain ints load too).

    Args:
        num_phases: number of phases $C$.
        refresh_every: the refresh period $K \ge 1$ (5 in the paper).
        p_min: the floor $p_{\min} \in (0, 1]$ (0.1 in the paper).
        power: exponent $\gamma > 0$ after max normalisation (0.5 gives $p \propto s^{1/2}$).
        process_group: a `torch.distributed` process group to synchronise over, or None.
        window: `"steps"` (Eq. 7: every defined step counts once) or `"weighted"` (steps
            weighted by their `weight`, e.g. their number of groups).
        min_groups: the least window support (summed `weight`) a phase needs to be scored;
            0 (the paper) scores every defined phase.

    Raises:
        TypeError: if `num_phases` or `refresh_every` is not an int, `power` not a number, or
            `process_group` neither None nor a `torch.distributed.ProcessGroup`.
        ValueError: if `num_phases` or `refresh_every` is not positive, `p_min` is outside
            (0, 1], `power` is not a positive finite number, `window` is unknown or
            `min_groups` is negative or not finite.

    Examples:
        >>> import torch
        >>> buf = PhaseScoreBuffer(3, refresh_every=2, p_min=0.1)
        >>> buf.update(torch.tensor([0.0, 1.0, 4.0])).tolist()  # initialises
        [0.10000000149011612, 0.25, 1.0]
        >>> buf.update(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([True, True, False])).tolist()
        [0.5, 0.25, 1.0]
        >>> robust = PhaseScoreBuffer(2, refresh_every=1, min_groups=3)
        >>> robust.update(torch.tensor([9.0, 1.0]), weight=torch.tensor([1.0, 6.0])).tolist()
        [0.10000000149011612, 1.0]
    """

    def __init__(
        self,
        num_phases: int,
        *,
        refresh_every: int = 5,
        p_min: float = 0.1,
        power: float = 1.0,
        process_group: Any = None,
        window: Literal["steps", "weighted"] = "steps",
        min_groups: int | float = 0.0,
    ) -> None:
        self.num_phases = check_positive_int(num_phases, "num_phases")
        self.refresh_every = check_positive_int(refresh_every, "refresh_every")
        self.p_min = check_probability(p_min, "p_min")
        self.power = check_power(power, "power")
        self.process_group = check_process_group(process_group, "process_group")
        self.window = check_option(window, "window", ("steps", "weighted"))
        self.min_groups = float(check_range(min_groups, "min_groups", low=0.0))
        self.reset()

    def reset(self) -> None:
        """Forget every buffered score and return to the state before the first update."""
        c = self.num_phases
        self._keep = torch.ones(c, dtype=torch.float32)
        self._window_sum = torch.zeros(c, dtype=torch.float64)
        self._window_count = torch.zeros(c, dtype=torch.int64)
        self._window_weighted_sum = torch.zeros(c, dtype=torch.float64)
        self._window_weight = torch.zeros(c, dtype=torch.float64)
        self._window_steps = torch.zeros((), dtype=torch.int64)
        self._num_updates = torch.zeros((), dtype=torch.int64)

    @property
    def keep_probabilities(self) -> Float[Tensor, " phase"]:
        """The current keep probabilities $p_c$, `(phase,)` float32 (a copy)."""
        return self._keep.clone()

    @property
    def num_updates(self) -> Tensor:
        """Number of `update` calls since construction or the last `reset`, a 0-d int64 tensor."""
        return self._num_updates.clone()

    def _to(self, device: torch.device) -> None:
        if self._keep.device != device:
            self._keep = self._keep.to(device)
            self._window_sum = self._window_sum.to(device)
            self._window_count = self._window_count.to(device)
            self._window_weighted_sum = self._window_weighted_sum.to(device)
            self._window_weight = self._window_weight.to(device)
            self._window_steps = self._window_steps.to(device)
            self._num_updates = self._num_updates.to(device)

    def update(
        self,
        scores: Float[Tensor, " phase"],
        defined: Bool[Tensor, " phase"] | None = None,
        *,
        weight: Float[Tensor, " phase"] | None = None,
        validate_args: bool = False,
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

        # The counters are tensors and every step runs the same ops (no Python branch on the
        # step), so a compiled `update` is one graph for every step.
        self._num_updates = self._num_updates + 1
        self._window_sum = self._window_sum + step_score
        self._window_count = self._window_count + step_defined.to(torch.int64)
        self._window_weighted_sum = self._window_weighted_sum + stats[0]
        self._window_weight = self._window_weight + stats[1]
        self._window_steps = self._window_steps + 1
        first = self._map(step_score, step_defined & (stats[1] >= self.min_groups))
        keep = torch.where(self._num_updates == 1, first, self._keep)
        refresh = self._window_steps >= self.refresh_every
        window_defined = (self._window_count > 0) & (self._window_weight >= self.min_groups)
        if self.window == "weighted":
            weight_sum = torch.where(window_defined, self._window_weight, 1.0)
            mean = self._window_weighted_sum / weight_sum
        else:
            mean = self._window_sum / self._window_count.clamp_min(1)  # Eq. 7
        fresh = self._map(mean, window_defined)
        self._keep = torch.where(refresh & window_defined.any(), fresh, keep)
        self._window_sum = torch.where(refresh, 0.0, self._window_sum)
        self._window_count = torch.where(refresh, 0, self._window_count)
        self._window_weighted_sum = torch.where(refresh, 0.0, self._window_weighted_sum)
        self._window_weight = torch.where(refresh, 0.0, self._window_weight)
        self._window_steps = torch.where(refresh, 0, self._window_steps)
        return self._keep.clone()

    def _map(self, scores: Tensor, defined: Tensor) -> Tensor:
        p = keep_probabilities(
            scores, defined, p_min=self.p_min, power=self.power, validate_args=False
        )
        return p.to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """Return the buffer state: tensors (copies), the step counters as 0-d int64 tensors."""
        return {
            "keep_probabilities": self._keep.clone(),
            "window_sum": self._window_sum.clone(),
            "window_count": self._window_count.clone(),
            "window_weighted_sum": self._window_weighted_sum.clone(),
            "window_weight": self._window_weight.clone(),
            "window_steps": self._window_steps.clone(),
            "num_updates": self._num_updates.clone(),
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
        kinds = {
            "keep_probabilities": "float",
            "window_sum": "float",
            "window_count": "int",
            "window_weighted_sum": "float",
            "window_weight": "float",
        }
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
        window_steps = _counter(state["window_steps"], "state['window_steps']")
        num_updates = _counter(state["num_updates"], "state['num_updates']")
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
        for key in ("window_weighted_sum", "window_weight"):
            value = tensors[key].to(device=device, dtype=torch.float64).clone()
            setattr(self, f"_{key}", value)
        self._window_steps = torch.tensor(window_steps, dtype=torch.int64, device=device)
        self._num_updates = torch.tensor(num_updates, dtype=torch.int64, device=device)

    def __repr__(self) -> str:
        return (
            f"PhaseScoreBuffer(num_phases={self.num_phases}, refresh_every={self.refresh_every}, "
            f"p_min={self.p_min}, power={self.power}, window={self.window!r}, "
            f"min_groups={self.min_groups}, num_updates={int(self._num_updates)})"
        )


def _counter(value: Any, name: str) -> int:
    """A saved step counter: a non-negative int or a 0-d integer tensor, as a Python int."""
    if isinstance(value, Tensor):
        check_tensor(value, name, ndim=0, dtypes="int")
        value = int(value)
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {value}.")
        return value
    return check_positive_int(value, name, allow_zero=True)
