r"""A buffer of the policy's own successful trajectories, for self behaviour cloning.

The action-chunked PPO paper (2026) adds to the PPO objective a behaviour-cloning loss
(`chunkmask.bc_loss`) on a demonstration buffer that training itself keeps filling with
successful, high-quality trials. Only the paper's summary is public, so the buffer's rules are
choices, and pluggable: `SuccessBuffer` stores whole trajectories (any dict of equally shaped
tensors) with their steps-to-success and task; an *admission* policy decides whether a trajectory
may enter and an *eviction* policy which entry leaves when the buffer is full. The defaults
(`AdmitSuccessful`, `EvictSlowest`) keep, per task, the fastest successes, drop the oldest among
equally fast ones, and keep the tasks balanced.
"""

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from chunkmask._checks import check_bool, check_positive_int, check_tensor

__all__ = ["AdmitSuccessful", "EntryInfo", "EvictOldest", "EvictSlowest", "SuccessBuffer"]


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


def _check_task(task: Any, name: str) -> Hashable:
    """A task id: an int, a string or any hashable that is not a tensor (0-d int tensors -> int)."""
    if isinstance(task, Tensor):
        if task.ndim == 0 and not task.dtype.is_floating_point and task.dtype != torch.bool:
            return int(task)
        raise TypeError(f"`{name}` must be a hashable id (int, str), got a tensor of shape "
                        f"{tuple(task.shape)} and dtype {task.dtype}.")
    if task is None or isinstance(task, float) or not isinstance(task, Hashable):
        raise TypeError(f"`{name}` must be a hashable id (int, str), got {type(task).__name__} "
                        f"{task!r}.")
    return task


def _check_entry_info(value: Any, name: str) -> EntryInfo:
    """Check an `EntryInfo` (or a tuple of its four fields); return it as an `EntryInfo`."""
    if not isinstance(value, tuple) or len(value) != 4:
        raise TypeError(f"`{name}` must be an EntryInfo (success, steps, task, added), got "
                        f"{type(value).__name__} {value!r}.")
    success, steps, task, added = value
    return EntryInfo(
        check_bool(success, f"{name}.success"),
        check_positive_int(steps, f"{name}.steps", allow_zero=True),
        _check_task(task, f"{name}.task"),
        check_positive_int(added, f"{name}.added", allow_zero=True),
    )


def _check_policy_call(candidate: Any, entries: Any) -> None:
    """The arguments a buffer passes to its policies, checked when a user calls one directly."""
    _check_entry_info(candidate, "candidate")
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError(f"`entries` must be a sequence of EntryInfo, got {type(entries).__name__}.")
    for i, e in enumerate(entries):
        _check_entry_info(e, f"entries[{i}]")


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
        _check_policy_call(candidate, entries)
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
        _check_policy_call(candidate, entries)
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
        _check_policy_call(candidate, entries)
        if not entries:
            return None
        return min(range(len(entries)), key=lambda i: entries[i].added)

    def __repr__(self) -> str:
        return "EvictOldest()"


def _as_list(x: Any, name: str) -> list[Any]:
    """The entries of a 1-D sequence `x`; TypeError naming `name` for None or a non-sequence."""
    if x is None or isinstance(x, (str, bytes, Mapping)) or not isinstance(x, Iterable):
        raise TypeError(
            f"`{name}` must be a 1-D tensor or a sequence, got {type(x).__name__} {x!r}."
        )
    return list(x)


def _as_int_list(x: Any, name: str, n: int) -> list[Any]:
    if isinstance(x, Tensor):
        if x.ndim != 1 or x.shape[0] != n:
            raise ValueError(f"`{name}` must have shape ({n},), got {tuple(x.shape)}.")
        return x.tolist()
    values = _as_list(x, name)
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
        candidate = EntryInfo(
            check_bool(success, "success"),
            check_positive_int(steps, "steps", allow_zero=True),
            _check_task(task, "task"),
            self._counter,
        )
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
            if isinstance(victim, bool) or not isinstance(victim, int):
                raise TypeError(
                    f"`eviction` must return an int index or None, got {type(victim).__name__}."
                )
            if not 0 <= victim < len(self._entries):
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
            TypeError: if `batch` is not a dict of tensors, or `success`, `steps` or `task` is
                not a 1-D tensor or a sequence (None, for `success` or `steps`).
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
        if isinstance(success, Tensor):
            check_tensor(success, "success", ndim=1, dtypes="bool")
        if isinstance(steps, Tensor):
            check_tensor(steps, "steps", ndim=1, dtypes="int")
        success_l = [check_bool(s, f"success[{i}]")
                     for i, s in enumerate(_as_int_list(success, "success", n))]
        steps_l = [check_positive_int(s, f"steps[{i}]", allow_zero=True)
                   for i, s in enumerate(_as_int_list(steps, "steps", n))]
        task_l = [0] * n if task is None else [
            _check_task(t, f"task[{i}]") for i, t in enumerate(_as_int_list(task, "task", n))
        ]
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
        """Stack the entries at `indices` into a dict of `(batch, ...)` tensors.

        Raises:
            TypeError: if `indices` is not a 1-D integer tensor or a sequence of ints.
            ValueError: if `indices` is empty or an index is out of range.
        """
        if isinstance(indices, Tensor):
            check_tensor(indices, "indices", ndim=1, dtypes="int")
        idx = indices.tolist() if isinstance(indices, Tensor) else _as_list(indices, "indices")
        if not idx:
            raise ValueError("`indices` must not be empty.")
        for i in idx:
            check_positive_int(i, "indices", allow_zero=True)
            if not i < len(self._entries):
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
        metas = [_check_entry_info(m, f"state['info'][{i}]") for i, m in enumerate(info)]
        counter = check_positive_int(state["counter"], "state['counter']", allow_zero=True)
        newest = max((m.added for m in metas), default=-1)
        if counter <= newest:
            raise ValueError(
                f"`state['counter']` must exceed every entry's `added` ({newest}), got {counter}."
            )
        held = (self._entries, self._info, self._spec)
        self._entries, self._info, self._spec = [], [], None
        try:
            for entry, meta in zip(entries, metas, strict=True):
                self._entries.append(self._check_entry(entry))
                self._info.append(meta)
                if self._spec is None:
                    self._spec = {k: (tuple(v.shape), v.dtype) for k, v in entry.items()}
        except (TypeError, ValueError):
            self._entries, self._info, self._spec = held  # a refused state changes nothing
            raise
        self._counter = counter

    def __repr__(self) -> str:
        return (
            f"SuccessBuffer(capacity={self.capacity}, size={len(self)}, "
            f"admission={self.admission!r}, eviction={self.eviction!r})"
        )
