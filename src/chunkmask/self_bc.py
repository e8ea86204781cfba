r"""Self behaviour cloning: a buffer of the policy's own successes, a BC loss, adaptive weights.

The action-chunked PPO paper (2026) adds to the PPO objective an auxiliary behaviour-cloning loss
$-\log \pi_\theta(a \mid o)$ on a demonstration buffer that training itself keeps filling with
successful, high-quality trials, and adapts the weight between the two losses online:

$$
\mathcal{L}(\theta) = \mathcal{L}_{PPO}(\theta) + \lambda_k\, \mathcal{L}_{BC}(\theta), \qquad
\mathcal{L}_{BC}(\theta) = -\frac{1}{|\mathcal{B}|}\sum_{(o_t, a_t) \in \mathcal{B}}
    \log \pi_\theta(a_t \mid o_t).
$$

Only the paper's summary is public, so the buffer's admission and eviction rules and the weight
rule are choices. They are pluggable here:

- `SuccessBuffer` stores whole trajectories (any dict of equally shaped tensors) with their
  steps-to-success and task; an *admission* policy decides whether a trajectory may enter and an
  *eviction* policy which entry leaves when the buffer is full. The defaults (`AdmitSuccessful`,
  `EvictSlowest`) keep, per task, the fastest successes, drop the oldest among equally fast ones,
  and keep the tasks balanced.
- `bc_loss` is the masked negative log-likelihood of buffered chunks.
- `ConstantBCWeight`, `SuccessRateBCWeight` (driven by the recent success rate) and
  `LossBalanceBCWeight` (balances the magnitudes of the two losses or of their gradients) are
  stateful weight rules; `ProductBCWeight` composes them.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from chunkmask._checks import (
    check_option,
    check_positive_int,
    check_range,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from chunkmask.losses import aggregate_loss
from chunkmask.selection import Selection

__all__ = [
    "AdmitSuccessful",
    "BCWeight",
    "ConstantBCWeight",
    "EntryInfo",
    "EvictOldest",
    "EvictSlowest",
    "LossBalanceBCWeight",
    "ProductBCWeight",
    "SuccessBuffer",
    "SuccessRateBCWeight",
    "bc_loss",
]


class EntryInfo(NamedTuple):
    """What admission and eviction policies know about a trajectory.

    Attributes:
        success: whether the trial succeeded.
        steps: environment steps to success (lower is better); for a failure, its length.
        task: a hashable task id (an int, a task name).
        added: insertion counter: larger is more recent.
    """

    success: bool
    steps: int
    task: Hashable
    added: int


AdmissionPolicy = Callable[[EntryInfo, Sequence[EntryInfo], int], bool]
"""`(candidate, entries, capacity) -> admit?`"""

EvictionPolicy = Callable[[EntryInfo, Sequence[EntryInfo]], int | None]
"""`(candidate, entries of a full buffer) -> index to evict, or None to reject the candidate`."""


class AdmitSuccessful:
    """Admit successful trials, optionally only those that succeed within `max_steps`.

    Args:
        max_steps: largest steps-to-success admitted, or None for no limit.

    Example:
        >>> admit = AdmitSuccessful(max_steps=100)
        >>> admit(EntryInfo(True, 80, 0, 0), [], 8), admit(EntryInfo(True, 120, 0, 1), [], 8)
        (True, False)
    """

    def __init__(self, max_steps: int | None = None) -> None:
        self.max_steps = None if max_steps is None else check_positive_int(max_steps, "max_steps")

    def __call__(self, candidate: EntryInfo, entries: Sequence[EntryInfo], capacity: int) -> bool:
        """Return whether `candidate` may enter."""
        if not candidate.success:
            return False
        return self.max_steps is None or candidate.steps <= self.max_steps

    def __repr__(self) -> str:
        return f"AdmitSuccessful(max_steps={self.max_steps})"


class EvictSlowest:
    """When full, drop the slowest success of the most represented task (ties: the oldest).

    The default eviction keeps the best `K` trajectories by steps-to-success while keeping tasks
    balanced and preferring recent entries:

    1. if `max_age` is set and some entry is older than `max_age` insertions, evict the oldest
       such entry (stale behaviour of a long-gone policy);
    2. otherwise the *target task* is the task with the most entries once the candidate is
       counted (ties favour the candidate's own task), so no task can crowd out another;
    3. within the target task (the candidate included when it belongs to it) the entry with the
       most steps-to-success goes, the oldest among equals; if that is the candidate itself, the
       candidate is rejected.

    Args:
        max_age: evict entries older than this many insertions first; None disables ageing.
        balance_tasks: apply rule 2; if False the whole buffer is one pool.

    Example:
        >>> evict = EvictSlowest()
        >>> entries = [EntryInfo(True, 50, "a", 0), EntryInfo(True, 70, "a", 1),
        ...            EntryInfo(True, 90, "b", 2)]
        >>> evict(EntryInfo(True, 40, "a", 3), entries)  # slowest of task "a"
        1
        >>> evict(EntryInfo(True, 95, "b", 4), entries) is None  # "b" keeps its faster entry
        True
    """

    def __init__(self, max_age: int | None = None, *, balance_tasks: bool = True) -> None:
        self.max_age = None if max_age is None else check_positive_int(max_age, "max_age")
        self.balance_tasks = bool(balance_tasks)

    def __call__(self, candidate: EntryInfo, entries: Sequence[EntryInfo]) -> int | None:
        """Return the index of the entry to evict, or None to reject `candidate`."""
        if not entries:
            return None
        if self.max_age is not None:
            stale = [i for i, e in enumerate(entries) if candidate.added - e.added > self.max_age]
            if stale:
                return min(stale, key=lambda i: entries[i].added)
        if self.balance_tasks:
            counts: dict[Hashable, int] = {}
            for e in entries:
                counts[e.task] = counts.get(e.task, 0) + 1
            counts[candidate.task] = counts.get(candidate.task, 0) + 1
            most = max(counts.values())
            target = (
                candidate.task
                if counts[candidate.task] == most
                else next(t for t, c in counts.items() if c == most)
            )
            pool = [i for i, e in enumerate(entries) if e.task == target]
        else:
            target = candidate.task
            pool = list(range(len(entries)))
        # Slowest first, then oldest; the candidate is the newest so it loses only strict ties
        # on steps against nothing: it is rejected only when strictly slower than every peer.
        worst = max(pool, key=lambda i: (entries[i].steps, -entries[i].added))
        if (not self.balance_tasks or target == candidate.task) and candidate.steps > entries[
            worst
        ].steps:
            return None
        return worst

    def __repr__(self) -> str:
        return f"EvictSlowest(max_age={self.max_age}, balance_tasks={self.balance_tasks})"


class EvictOldest:
    """First in, first out: when full, drop the oldest entry.

    Example:
        >>> EvictOldest()(EntryInfo(True, 5, 0, 9), [EntryInfo(True, 1, 0, 4), EntryInfo(True, 9, 0, 2)])
        1
    """

    def __call__(self, candidate: EntryInfo, entries: Sequence[EntryInfo]) -> int | None:
        """Return the index of the oldest entry."""
        if not entries:
            return None
        return min(range(len(entries)), key=lambda i: entries[i].added)

    def __repr__(self) -> str:
        return "EvictOldest()"


def _as_int_list(x: Any, name: str, n: int) -> list[Any]:
    if isinstance(x, Tensor):
        if x.ndim != 1 or x.shape[0] != n:
            raise ValueError(f"`{name}` must have shape ({n},), got {tuple(x.shape)}.")
        return x.tolist()
    values = list(x)
    if len(values) != n:
        raise ValueError(f"`{name}` must have {n} entries, got {len(values)}.")
    return values


class SuccessBuffer:
    """A bounded buffer of successful trajectories for self behaviour cloning.

    Each entry is a dict of tensors describing one trajectory in the padded per-chunk layout the
    rollout uses, e.g. `{"obs": (N, obs_dim), "actions": (N, H, D), "valid": (N,)}`; every entry
    must have the same keys, shapes and dtypes so that `sample` can stack them. Entries are
    detached and cloned on the way in.

    Admission (`admission(candidate, entries, capacity) -> bool`) runs first; when the buffer is
    full, eviction (`eviction(candidate, entries) -> index | None`) picks the entry to replace or
    rejects the candidate. The defaults, `AdmitSuccessful()` and `EvictSlowest()`, keep the best
    `capacity` successes by steps-to-success with tasks balanced and recent entries preferred
    among equals.

    Args:
        capacity: the largest number of trajectories held.
        admission: admission policy; defaults to `AdmitSuccessful()`.
        eviction: eviction policy; defaults to `EvictSlowest()`.

    Raises:
        ValueError: if `capacity` is not a positive int.
        TypeError: if a policy is not callable.

    Example:
        >>> import torch
        >>> buf = SuccessBuffer(capacity=2)
        >>> for steps in (60, 40, 50, 70):
        ...     _ = buf.add({"obs": torch.full((3, 2), float(steps))}, steps=steps, success=True)
        >>> sorted(e.steps for e in buf.info)
        [40, 50]
        >>> buf.sample(4, generator=torch.Generator().manual_seed(0))["obs"].shape
        torch.Size([4, 3, 2])
    """

    def __init__(
        self,
        capacity: int,
        *,
        admission: AdmissionPolicy | None = None,
        eviction: EvictionPolicy | None = None,
    ) -> None:
        self.capacity = check_positive_int(capacity, "capacity")
        self.admission = AdmitSuccessful() if admission is None else admission
        self.eviction = EvictSlowest() if eviction is None else eviction
        if not callable(self.admission):
            raise TypeError(f"`admission` must be callable, got {type(self.admission).__name__}.")
        if not callable(self.eviction):
            raise TypeError(f"`eviction` must be callable, got {type(self.eviction).__name__}.")
        self._entries: list[dict[str, Tensor]] = []
        self._info: list[EntryInfo] = []
        self._counter = 0
        self._spec: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def info(self) -> list[EntryInfo]:
        """Metadata of the held entries, in storage order."""
        return list(self._info)

    def _check_entry(self, trajectory: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not isinstance(trajectory, Mapping) or not trajectory:
            raise TypeError(
                f"`trajectory` must be a non-empty dict of tensors, got {type(trajectory).__name__}."
            )
        spec = {}
        for key, value in trajectory.items():
            check_tensor(value, f"trajectory[{key!r}]")
            spec[key] = (tuple(value.shape), value.dtype)
        if self._spec is not None and spec != self._spec:
            raise ValueError(
                f"`trajectory` must have the keys, shapes and dtypes of the held entries "
                f"{self._spec}, got {spec}."
            )
        return {k: v.detach().clone() for k, v in trajectory.items()}

    def add(
        self,
        trajectory: Mapping[str, Tensor],
        *,
        steps: int,
        success: bool = True,
        task: Hashable = 0,
    ) -> bool:
        """Offer one trajectory; return whether it was stored.

        Args:
            trajectory: dict of tensors of one trajectory.
            steps: steps to success (or the length of a failed trial).
            success: whether the trial succeeded.
            task: hashable task id.

        Raises:
            TypeError: if `trajectory` is not a dict of tensors.
            ValueError: if its keys, shapes or dtypes differ from the held entries', or `steps`
                is negative.
        """
        entry = self._check_entry(trajectory)
        steps = check_positive_int(int(steps), "steps", allow_zero=True)
        candidate = EntryInfo(bool(success), steps, task, self._counter)
        self._counter += 1
        if not self.admission(candidate, self.info, self.capacity):
            return False
        if len(self._entries) < self.capacity:
            self._entries.append(entry)
            self._info.append(candidate)
        else:
            victim = self.eviction(candidate, self.info)
            if victim is None:
                return False
            if not 0 <= int(victim) < len(self._entries):
                raise ValueError(
                    f"`eviction` must return an index in [0, {len(self._entries)}) or None, "
                    f"got {victim}."
                )
            self._entries[victim] = entry
            self._info[victim] = candidate
        if self._spec is None:
            self._spec = {k: (tuple(v.shape), v.dtype) for k, v in entry.items()}
        return True

    def add_batch(
        self,
        batch: Mapping[str, Tensor],
        *,
        success: Bool[Tensor, " traj"] | Sequence[bool],
        steps: Int[Tensor, " traj"] | Sequence[int],
        task: Sequence[Hashable] | Tensor | None = None,
    ) -> list[bool]:
        """Offer every trajectory of a `(traj, ...)` batch, in order; return which were stored.

        Reads the flags on the host (one sync); meant for once per rollout.

        Args:
            batch: dict of `(traj, ...)` tensors.
            success: `(traj,)` bool outcome of each trajectory.
            steps: `(traj,)` steps to success (or length).
            task: `(traj,)` task ids; all 0 when None.

        Raises:
            TypeError: if `batch` is not a dict of tensors.
            ValueError: if the tensors disagree on the number of trajectories or the flags have
                another length.
        """
        if not isinstance(batch, Mapping) or not batch:
            raise TypeError(f"`batch` must be a non-empty dict of tensors, got {type(batch).__name__}.")
        sizes = set()
        for key, value in batch.items():
            check_tensor(value, f"batch[{key!r}]")
            if value.ndim == 0:
                raise ValueError(f"`batch[{key!r}]` must have a leading traj axis, got a 0-d tensor.")
            sizes.add(value.shape[0])
        if len(sizes) != 1:
            raise ValueError(
                f"`batch` tensors must share the leading traj size, got sizes {sorted(sizes)}."
            )
        n = sizes.pop()
        success_l = [bool(s) for s in _as_int_list(success, "success", n)]
        steps_l = [int(s) for s in _as_int_list(steps, "steps", n)]
        task_l = [0] * n if task is None else _as_int_list(task, "task", n)
        return [
            self.add({k: v[i] for k, v in batch.items()}, steps=steps_l[i], success=success_l[i],
                     task=task_l[i])
            for i in range(n)
        ]

    def sample_indices(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> Int[Tensor, " batch"]:
        """Draw `batch_size` entry indices uniformly with replacement.

        Raises:
            ValueError: if the buffer is empty or `batch_size` is not a positive int.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        if not self._entries:
            raise ValueError("`SuccessBuffer` must hold at least one entry to sample, got 0.")
        return torch.randint(len(self._entries), (batch_size,), generator=generator)

    def gather(self, indices: Int[Tensor, " batch"] | Sequence[int]) -> dict[str, Tensor]:
        """Stack the entries at `indices` into a dict of `(batch, ...)` tensors."""
        idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        if not idx:
            raise ValueError("`indices` must not be empty.")
        for i in idx:
            if not 0 <= i < len(self._entries):
                raise ValueError(f"`indices` must lie in [0, {len(self._entries)}), got {i}.")
        keys = self._entries[0].keys()
        return {k: torch.stack([self._entries[i][k] for i in idx]) for k in keys}

    def sample(
        self, batch_size: int, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """A minibatch of `batch_size` trajectories drawn uniformly with replacement.

        Deterministic for a given `generator` state and buffer content.

        Raises:
            ValueError: if the buffer is empty or `batch_size` is not a positive int.
        """
        return self.gather(self.sample_indices(batch_size, generator=generator))

    def clear(self) -> None:
        """Remove every entry (the insertion counter keeps running)."""
        self._entries.clear()
        self._info.clear()
        self._spec = None

    def state_dict(self) -> dict[str, Any]:
        """Entries, metadata and insertion counter (policies are configuration, not state)."""
        return {
            "capacity": self.capacity,
            "counter": self._counter,
            "entries": [{k: v.clone() for k, v in e.items()} for e in self._entries],
            "info": [tuple(i) for i in self._info],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by `state_dict`.

        Raises:
            TypeError: if `state` is not a dict.
            ValueError: if keys are missing, entries and metadata disagree, or there are more
                entries than this buffer's capacity.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        missing = {"capacity", "counter", "entries", "info"} - set(state)
        if missing:
            raise ValueError(f"`state` is missing keys {sorted(missing)}.")
        entries, info = list(state["entries"]), list(state["info"])
        if len(entries) != len(info):
            raise ValueError(
                f"`state['entries']` and `state['info']` must have the same length, got "
                f"{len(entries)} and {len(info)}."
            )
        if len(entries) > self.capacity:
            raise ValueError(
                f"`state` holds {len(entries)} entries, more than `capacity` {self.capacity}."
            )
        self.clear()
        for entry, meta in zip(entries, info, strict=True):
            self._entries.append(self._check_entry(entry))
            self._info.append(EntryInfo(*meta))
            if self._spec is None:
                self._spec = {k: (tuple(v.shape), v.dtype) for k, v in entry.items()}
        self._counter = int(state["counter"])

    def __repr__(self) -> str:
        return (
            f"SuccessBuffer(capacity={self.capacity}, size={len(self)}, "
            f"admission={self.admission!r}, eviction={self.eviction!r})"
        )


LossAggMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]


def bc_loss(
    logp: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    selection: Selection | None = None,
    loss_agg_mode: LossAggMode = "token-mean",
    event_size: int = 1,
) -> Float[Tensor, ""]:
    r"""Negative log-likelihood of buffered action chunks under the current policy.

    $$
    \mathcal{L}_{BC} = -\frac{1}{E \sum_{i,t} m_{i,t}} \sum_{i,t} m_{i,t}
        \log\pi_\theta(a_{i,t} \mid o_{i,t})
    $$

    in the default `token-mean` mode, with $\log\pi_\theta(a_{i,t} \mid o_{i,t})$ the chunk
    log-probability (`chunkmask.ppo.chunk_log_prob`) of buffered chunk $t$ of trajectory $i$ and
    $E$ = `event_size` (e.g. $H D$ to report a per-dimension NLL, which keeps the BC weight
    comparable across chunk sizes). Other modes are those of `chunkmask.losses.aggregate_loss`,
    trajectories being the sequences. The auxiliary self behaviour-cloning loss of the
    action-chunked PPO paper (2026).

    Args:
        logp: chunk log-probabilities, `(traj, chunk)` with `mask`, or packed `(M,)` with
            `selection`, or `(M,)` flat chunks with neither (each chunk its own sequence).
        mask: bool, True for chunks that count (padding may hold NaN). Defaults to all True.
        selection: the `Selection` a packed batch came from, for per-trajectory modes.
        loss_agg_mode: aggregation mode.
        event_size: divide by this many action elements per chunk.

    Returns:
        0-d loss; gradients are 0 at masked chunks.

    Raises:
        TypeError: if `logp` is not floating point or `mask` is not bool.
        ValueError: on a mask of another shape, a `logp` that is neither 1-D nor 2-D, or a bad
            option.

    Example:
        >>> import torch
        >>> lp = torch.tensor([[-2.0, -4.0], [-1.0, float("nan")]], requires_grad=True)
        >>> loss = bc_loss(lp, torch.tensor([[True, True], [True, False]]), event_size=2)
        >>> round(loss.item(), 4)  # (2 + 4 + 1) / 2 / 3
        1.1667
    """
    check_tensor(logp, "logp", ndim=(1, 2), dtypes="float")
    if mask is None:
        mask = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    check_tensor(mask, "mask", dtypes="bool")
    check_same_shape(mask, "mask", logp, "logp")
    check_same_device(mask, "mask", logp, "logp")
    check_option(loss_agg_mode, "loss_agg_mode", tuple(LossAggMode.__args__))
    event_size = check_positive_int(event_size, "event_size")
    nll = -torch.where(mask, logp, 0) / event_size
    segment = num_segments = None
    if logp.ndim == 1:
        if selection is not None:
            if not isinstance(selection, Selection):
                raise TypeError(
                    f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}."
                )
            segment = selection.packed_traj_index(size=logp.shape[0])
            num_segments = selection.num_traj
        nll, mask = nll[:, None], mask[:, None]
    elif selection is not None:
        raise ValueError(
            "`logp` must be a packed (M,) batch when `selection` is given, got shape "
            f"{tuple(logp.shape)}."
        )
    return aggregate_loss(nll, mask, loss_agg_mode, segment=segment, num_segments=num_segments)


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"`{name}` must be a scalar, got shape {tuple(value.shape)}.")
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return value


class BCWeight:
    r"""Base class of the stateful PPO/BC weight rules.

    A rule holds the current weight $\lambda_k$ (`value`) and updates it from training
    statistics once per iteration with `update(**stats)`, where `stats` may hold
    `success_rate` (recent rollout success rate in [0, 1]), `ppo_scale` and `bc_scale`
    (non-negative magnitudes of the two losses or of their gradients). A rule ignores statistics
    it does not use and raises `ValueError` when one it needs is missing. Rules are plain Python
    objects with `state_dict()` / `load_state_dict()`; `update` reads tensors on the host, so call
    it once per iteration, not inside a compiled step.
    """

    _state_keys: tuple[str, ...] = ()

    @property
    def value(self) -> float:
        r"""The current weight $\lambda_k$."""
        raise NotImplementedError

    def update(self, **stats: Any) -> float:
        """Fold in one iteration's statistics and return the new weight."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The rule's state."""
        return {k: getattr(self, k) for k in self._state_keys}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by `state_dict`.

        Raises:
            TypeError: if `state` is not a dict.
            ValueError: if a key is missing.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        missing = set(self._state_keys) - set(state)
        if missing:
            raise ValueError(f"`state` is missing keys {sorted(missing)}.")
        for k in self._state_keys:
            setattr(self, k, state[k])

    @staticmethod
    def _need(stats: Mapping[str, Any], name: str, rule: str) -> float:
        if stats.get(name) is None:
            raise ValueError(f"`{name}` must be given to {rule}.update, got None.")
        return _scalar(stats[name], name)


class ConstantBCWeight(BCWeight):
    r"""A fixed weight $\lambda_k = \lambda$.

    Example:
        >>> ConstantBCWeight(0.1).update(success_rate=0.5)
        0.1
    """

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = check_range(weight, "weight", low=0.0)

    @property
    def value(self) -> float:
        """The fixed weight."""
        return self.weight

    def update(self, **stats: Any) -> float:
        """Return the fixed weight."""
        return self.weight

    def __repr__(self) -> str:
        return f"ConstantBCWeight({self.weight})"


class SuccessRateBCWeight(BCWeight):
    r"""A weight driven by the recent rollout success rate.

    $$
    \bar s_k = \beta \bar s_{k-1} + (1 - \beta) s_k, \qquad
    \lambda_k = \lambda_{lo} + (\lambda_{hi} - \lambda_{lo})\, f(\bar s_k),
    $$

    with $f(s) = (1 - s)^p$ for `direction="decreasing"` (the default: lean on cloning the
    buffered successes while the policy fails often, hand over to PPO as it succeeds) and
    $f(s) = s^p$ for `direction="increasing"` (trust the buffer more as it fills with good
    trials). The first `update` replaces the initial average `initial` unless `warm_start` is
    False. $\lambda_k$ always lies in $[\lambda_{lo}, \lambda_{hi}]$ and is monotone in
    $\bar s_k$.

    Args:
        low: $\lambda_{lo} \ge 0$.
        high: $\lambda_{hi} \ge \lambda_{lo}$.
        momentum: $\beta \in [0, 1)$, the averaging of success rates across iterations.
        power: $p > 0$.
        direction: `"decreasing"` or `"increasing"` in the success rate.
        initial: initial $\bar s_0 \in [0, 1]$.
        warm_start: the first update sets $\bar s$ to the observed rate.

    Example:
        >>> rule = SuccessRateBCWeight(low=0.0, high=1.0, momentum=0.5)
        >>> rule.update(success_rate=0.2), rule.update(success_rate=0.6)
        (0.8, 0.6)
    """

    _state_keys = ("average", "steps")

    def __init__(
        self,
        low: float = 0.01,
        high: float = 0.5,
        *,
        momentum: float = 0.8,
        power: float = 1.0,
        direction: Literal["decreasing", "increasing"] = "decreasing",
        initial: float = 0.0,
        warm_start: bool = True,
    ) -> None:
        self.low = check_range(low, "low", low=0.0)
        self.high = check_range(high, "high", low=self.low)
        self.momentum = check_range(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        self.power = check_range(power, "power", low=0.0, low_open=True)
        self.direction = check_option(direction, "direction", ("decreasing", "increasing"))
        self.average = check_range(initial, "initial", low=0.0, high=1.0)
        self.warm_start = bool(warm_start)
        self.steps = 0

    @property
    def value(self) -> float:
        """The current weight."""
        s = self.average if self.direction == "increasing" else 1.0 - self.average
        return self.low + (self.high - self.low) * s**self.power

    def update(self, **stats: Any) -> float:
        """Fold in `success_rate` and return the new weight.

        Raises:
            ValueError: if `success_rate` is missing or outside [0, 1].
        """
        rate = self._need(stats, "success_rate", type(self).__name__)
        rate = check_range(rate, "success_rate", low=0.0, high=1.0)
        if self.steps == 0 and self.warm_start:
            self.average = rate
        else:
            self.average = self.momentum * self.average + (1.0 - self.momentum) * rate
        self.steps += 1
        return self.value

    def __repr__(self) -> str:
        return (
            f"SuccessRateBCWeight(low={self.low}, high={self.high}, momentum={self.momentum}, "
            f"power={self.power}, direction={self.direction!r})"
        )


class LossBalanceBCWeight(BCWeight):
    r"""A weight that keeps the BC term at a fixed ratio of the PPO term's magnitude.

    $$
    \bar m^{PPO}_k = \beta \bar m^{PPO}_{k-1} + (1-\beta)\, m^{PPO}_k, \quad
    \bar m^{BC}_k = \beta \bar m^{BC}_{k-1} + (1-\beta)\, m^{BC}_k, \quad
    \lambda_k = \mathrm{clip}\Big(\rho\, \frac{\bar m^{PPO}_k}{\max(\bar m^{BC}_k, \epsilon)},
        \lambda_{lo}, \lambda_{hi}\Big)
    $$

    so that $\lambda_k \bar m^{BC}_k \approx \rho\, \bar m^{PPO}_k$: the BC term contributes a
    fixed share $\rho$ of the PPO term whatever their natural scales. The magnitudes $m$ are
    whatever the caller passes as `ppo_scale` and `bc_scale`: absolute loss values, or (better,
    since the PPO surrogate with whitened advantages hovers around 0) the norms of the two
    losses' gradients with respect to the shared parameters, in the spirit of GradNorm (Chen et
    al. 2018, https://arxiv.org/abs/1711.02257). The averages start from the first observation.

    Args:
        ratio: target share $\rho > 0$.
        momentum: $\beta \in [0, 1)$.
        low: $\lambda_{lo} \ge 0$.
        high: $\lambda_{hi} \ge \lambda_{lo}$.
        initial: weight before the first update, clipped into $[\lambda_{lo}, \lambda_{hi}]$.
        eps: $\epsilon > 0$ guarding the division.

    Example:
        >>> rule = LossBalanceBCWeight(ratio=0.5, momentum=0.0)
        >>> rule.update(ppo_scale=2.0, bc_scale=4.0)
        0.25
    """

    _state_keys = ("ppo_average", "bc_average", "steps")

    def __init__(
        self,
        ratio: float = 0.5,
        *,
        momentum: float = 0.9,
        low: float = 0.0,
        high: float = 10.0,
        initial: float = 0.1,
        eps: float = 1e-8,
    ) -> None:
        self.ratio = check_range(ratio, "ratio", low=0.0, low_open=True)
        self.momentum = check_range(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        self.low = check_range(low, "low", low=0.0)
        self.high = check_range(high, "high", low=self.low)
        self.initial = min(max(check_range(initial, "initial", low=0.0), self.low), self.high)
        self.eps = check_range(eps, "eps", low=0.0, low_open=True)
        self.ppo_average = 0.0
        self.bc_average = 0.0
        self.steps = 0

    @property
    def value(self) -> float:
        """The current weight."""
        if self.steps == 0:
            return self.initial
        raw = self.ratio * self.ppo_average / max(self.bc_average, self.eps)
        return min(max(raw, self.low), self.high)

    def update(self, **stats: Any) -> float:
        """Fold in `ppo_scale` and `bc_scale` and return the new weight.

        Raises:
            ValueError: if either scale is missing or negative.
        """
        name = type(self).__name__
        ppo = check_range(self._need(stats, "ppo_scale", name), "ppo_scale", low=0.0)
        bc = check_range(self._need(stats, "bc_scale", name), "bc_scale", low=0.0)
        if self.steps == 0:
            self.ppo_average, self.bc_average = ppo, bc
        else:
            m = self.momentum
            self.ppo_average = m * self.ppo_average + (1 - m) * ppo
            self.bc_average = m * self.bc_average + (1 - m) * bc
        self.steps += 1
        return self.value

    def __repr__(self) -> str:
        return (
            f"LossBalanceBCWeight(ratio={self.ratio}, momentum={self.momentum}, low={self.low}, "
            f"high={self.high})"
        )


class ProductBCWeight(BCWeight):
    """Compose rules by multiplying their weights; `update` forwards the statistics to each.

    For example, `ProductBCWeight(LossBalanceBCWeight(0.5), SuccessRateBCWeight(0.0, 1.0))`
    balances magnitudes and fades the BC term out as the success rate rises.

    Example:
        >>> rule = ProductBCWeight(ConstantBCWeight(0.5), SuccessRateBCWeight(0.0, 1.0))
        >>> rule.update(success_rate=0.2)
        0.4
    """

    def __init__(self, *rules: BCWeight) -> None:
        if not rules:
            raise ValueError("`rules` must hold at least one rule, got none.")
        for i, r in enumerate(rules):
            if not isinstance(r, BCWeight):
                raise TypeError(f"`rules[{i}]` must be a BCWeight, got {type(r).__name__}.")
        self.rules = tuple(rules)

    @property
    def value(self) -> float:
        """The product of the rules' weights."""
        out = 1.0
        for r in self.rules:
            out *= r.value
        return out

    def update(self, **stats: Any) -> float:
        """Update every rule with `stats`; return the product."""
        for r in self.rules:
            r.update(**stats)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The rules' states, in order."""
        return {"rules": [r.state_dict() for r in self.rules]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by `state_dict`.

        Raises:
            ValueError: if the number of rule states differs.
        """
        if not isinstance(state, Mapping) or "rules" not in state:
            raise ValueError("`state` must be a dict with key 'rules'.")
        if len(state["rules"]) != len(self.rules):
            raise ValueError(
                f"`state['rules']` must hold {len(self.rules)} states, got {len(state['rules'])}."
            )
        for r, s in zip(self.rules, state["rules"], strict=True):
            r.load_state_dict(s)

    def __repr__(self) -> str:
        return f"ProductBCWeight{self.rules!r}"
