r"""Policy versions and staleness for asynchronous training: the admission gate and the filter.

In a fully asynchronous trainer (RL-VLA³, AReaL, RLinf) rollouts run on weights that may be a few
versions behind the learner. Each trajectory (or chunk) records the version $v_b$ of the weights
that generated it; with the learner at version $v$, its *staleness* is $v - v_b$. Two rules keep
the staleness bounded:

- **admission** (AReaL): a new rollout may start only while
  $\text{accepted} + \text{running} < (\eta + v + 1)\, B$ and fewer than `max_concurrent` run,
  with $\eta$ = `max_staleness` and $B$ = `batch_size` trajectories per update; then no accepted
  trajectory can be more than $\eta$ versions old when the learner consumes it;
- **filtering** (RLinf): drop a trajectory whose oldest chunk is more than $\eta$ versions behind.

`StalenessGate` holds the admission counters (thread-safe, no Ray dependency);
`staleness` and `staleness_filter` are pure tensor functions.
"""

import threading

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from chunkmask._checks import (
    check_positive_int,
    check_tensor,
    count_tensor,
    resolve_mask,
    values_checkable,
)

__all__ = ["StalenessGate", "staleness", "staleness_filter"]


def staleness(
    versions: Int[Tensor, " *batch"],
    current_version: int | Int[Tensor, ""],
    *,
    validate_args: bool = False,
) -> Int[Tensor, " *batch"]:
    r"""The staleness $v - v_b$ of samples generated at `versions`, the learner being at `current_version`.

    Args:
        versions: integer policy versions, any shape (per trajectory or per chunk).
        current_version: the learner's version, an int or a 0-d integer tensor.
        validate_args: check that every version is >= 0 and not newer than `current_version`
            (reads the values on the host: one sync on an accelerator). Without it a newer
            version gives a negative staleness.

    Returns:
        int64 staleness, the shape of `versions`.

    Raises:
        TypeError: on non-integer versions.
        ValueError: with `validate_args`, if a version is negative or newer than
            `current_version`.

    Example:
        >>> import torch
        >>> staleness(torch.tensor([3, 5, 4]), 5).tolist()
        [2, 0, 1]
    """
    check_tensor(versions, "versions", dtypes="int")
    current = count_tensor(current_version, "current_version", versions.device)
    out = current - versions.to(torch.int64)
    if values_checkable(versions, validate_args):
        _check_versions(versions, current, None)
    return out


def _check_versions(versions: Tensor, current: Tensor, valid: Tensor | None) -> None:
    """Value check: versions (at `valid`) are >= 0 and at most `current`. Synchronises."""
    if valid is not None:
        versions = versions[valid]
    if versions.numel() == 0:
        return
    low, high = int(versions.min()), int(versions.max())
    if low < 0:
        raise ValueError(f"`versions` must be >= 0, got {low}.")
    if high > int(current):
        raise ValueError(
            f"`versions` must not be newer than `current_version` ({int(current)}), got {high}."
        )


def staleness_filter(
    versions: Int[Tensor, " traj"] | Int[Tensor, "traj chunk"],
    current_version: int | Int[Tensor, ""],
    max_staleness: int,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    *,
    validate_args: bool = False,
) -> Bool[Tensor, " traj"]:
    r"""Keep the trajectories whose oldest chunk is at most `max_staleness` versions behind.

    $$
    \text{keep}_i = \big[\, v - \min_{t \text{ valid}} v_{i,t} \le \eta \,\big].
    $$

    A trajectory generated across a weight update (its chunks carry several versions) is judged
    by its oldest chunk, as in RLinf. A trajectory with no valid chunk (all padding, or a
    `(traj, 0)` tensor) is dropped. Both forms treat versions alike: with `validate_args` every
    version (every valid one, in the 2-D form) must be >= 0 and not newer than
    `current_version`; without it nothing reads the values, and a trajectory whose oldest chunk
    is newer than `current_version` has a negative staleness and is kept.

    Args:
        versions: `(traj,)` or `(traj, chunk)` integer versions.
        current_version: the learner's version.
        max_staleness: $\eta \ge 0$.
        valid: `(traj, chunk)` bool for per-chunk versions; padding is ignored. Defaults to all
            True.
        validate_args: check the versions' values (one host sync on an accelerator).

    Returns:
        `(traj,)` bool keep mask.

    Raises:
        TypeError: on non-integer versions or a non-bool `valid`.
        ValueError: on a bad rank or shape, a negative `max_staleness`, or (with
            `validate_args`) a negative version or one newer than `current_version`.

    Example:
        >>> import torch
        >>> v = torch.tensor([[4, 4, 5], [2, 3, 3], [5, 5, 5]])
        >>> staleness_filter(v, 5, max_staleness=2).tolist()
        [True, False, True]
    """
    check_tensor(versions, "versions", ndim=(1, 2), dtypes="int")
    max_staleness = check_positive_int(max_staleness, "max_staleness", allow_zero=True)
    if versions.ndim == 1:
        if valid is not None:
            raise ValueError("`valid` is only used with (traj, chunk) `versions`, got 1-D versions.")
        valid = torch.ones_like(versions, dtype=torch.bool)
        versions, valid = versions[:, None], valid[:, None]
    else:
        valid = resolve_mask(valid, "valid", versions, "versions")
    current = count_tensor(current_version, "current_version", versions.device)
    if values_checkable(versions, validate_args):
        _check_versions(versions, current, valid)
    if versions.shape[1] == 0:  # no chunk at all: every trajectory is dropped
        return torch.zeros(versions.shape[0], dtype=torch.bool, device=versions.device)
    big = torch.iinfo(torch.int64).max
    oldest = torch.where(valid, versions.to(torch.int64), big).amin(dim=1)
    has_chunks = valid.any(dim=1)
    age = staleness(torch.where(has_chunks, oldest, 0), current)
    return has_chunks & (age <= max_staleness)


class StalenessGate:
    r"""AReaL's admission rule for asynchronous rollouts, with a concurrency cap.

    A rollout may start when

    $$
    \text{accepted} + \text{running} < (\eta + v + 1)\, B \quad\text{and}\quad
    \text{running} < C,
    $$

    with $v$ the learner's version, $\eta$ = `max_staleness`, $B$ = `batch_size` (trajectories
    per update) and $C$ = `max_concurrent`. `accepted` counts finished trajectories handed to the
    learner since the start. When rollouts finish in the order they started, the learner,
    consuming $B$ per version in that order, never sees a trajectory started more than $\eta$
    versions before it. Rollouts that finish out of order (a long episode overtaken by short ones)
    can slip past the bound while the version advances: apply `staleness_filter` when the learner
    consumes a batch, as RLinf does, and count what it drops. Call `try_start(version)` before a
    rollout, then `finish(accepted=...)` when it ends (or is dropped). Thread-safe.

    Args:
        batch_size: $B \ge 1$.
        max_staleness: $\eta \ge 0$ (0 is synchronous: rollouts of version $v$ only fill batch
            $v$).
        max_concurrent: $C \ge 1$, or None for no cap.

    Raises:
        TypeError: if an argument is not an int.
        ValueError: if an argument is out of range.

    Example:
        >>> gate = StalenessGate(batch_size=2, max_staleness=0)
        >>> starts = [gate.try_start(version=0) for _ in range(3)]
        >>> starts
        [True, True, False]
        >>> gate.finish(accepted=True); gate.finish(accepted=True)
        >>> gate.try_start(version=0), gate.try_start(version=1)
        (False, True)
    """

    def __init__(
        self, batch_size: int, max_staleness: int = 1, *, max_concurrent: int | None = None
    ) -> None:
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.max_staleness = check_positive_int(max_staleness, "max_staleness", allow_zero=True)
        self.max_concurrent = (
            None if max_concurrent is None else check_positive_int(max_concurrent, "max_concurrent")
        )
        self._lock = threading.Lock()
        self.accepted = 0
        self.running = 0
        self.dropped = 0

    def capacity(self, version: int) -> int:
        """How many more rollouts may start now at learner version `version`."""
        version = check_positive_int(version, "version", allow_zero=True)
        with self._lock:
            return self._capacity(version)

    def _capacity(self, version: int) -> int:
        room = (self.max_staleness + version + 1) * self.batch_size - self.accepted - self.running
        if self.max_concurrent is not None:
            room = min(room, self.max_concurrent - self.running)
        return max(room, 0)

    def try_start(self, version: int) -> bool:
        """Reserve a slot for one rollout if the rule admits it; return whether it did."""
        version = check_positive_int(version, "version", allow_zero=True)
        with self._lock:
            if self._capacity(version) <= 0:
                return False
            self.running += 1
            return True

    def finish(self, *, accepted: bool) -> None:
        """Release a running slot: `accepted=True` if the trajectory went to the learner.

        Raises:
            TypeError: if `accepted` is not a bool.
            ValueError: if no rollout is running.
        """
        if not isinstance(accepted, bool):
            raise TypeError(f"`accepted` must be a bool, got {type(accepted).__name__}.")
        with self._lock:
            if self.running <= 0:
                raise ValueError("`finish` needs a running rollout, got running=0.")
            self.running -= 1
            if accepted:
                self.accepted += 1
            else:
                self.dropped += 1

    def state_dict(self) -> dict[str, int]:
        """The counters (running rollouts are not state: they are lost with the process)."""
        with self._lock:
            return {"accepted": self.accepted, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore `state_dict`'s counters; running is reset to 0.

        Raises:
            TypeError: if `state` is not a dict or a counter is not an int.
            ValueError: if a key is missing or a counter is negative.
        """
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        missing = {"accepted", "dropped"} - set(state)
        if missing:
            raise ValueError(f"`state` is missing keys {sorted(missing)}.")
        accepted = check_positive_int(state["accepted"], "state['accepted']", allow_zero=True)
        dropped = check_positive_int(state["dropped"], "state['dropped']", allow_zero=True)
        with self._lock:
            self.accepted, self.dropped, self.running = accepted, dropped, 0

    def __repr__(self) -> str:
        return (
            f"StalenessGate(batch_size={self.batch_size}, max_staleness={self.max_staleness}, "
            f"max_concurrent={self.max_concurrent}, accepted={self.accepted}, "
            f"running={self.running}, dropped={self.dropped})"
        )
