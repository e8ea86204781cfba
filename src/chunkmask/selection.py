"""The `Selection` type every selector returns, and the packed order it defines.

A selection names, for each trajectory, the chunk slots that enter the actor update. The packed
layout that `chunkmask.shrink`, `chunkmask.unshrink` and the losses share is row-major over the
selected slots: trajectory 0's selected chunks in ascending chunk order, then trajectory 1's, and
so on. A packed batch has `M = selection.counts.sum()` items.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Int64
from torch import Tensor

from chunkmask._checks import check_positive_int, check_same_device, check_tensor


class Selection(NamedTuple):
    """Which chunks of each trajectory are kept, in a fixed-size, compile-friendly layout.

    Attributes:
        indices: `(traj, k)` int64 chunk indices. The valid slots come first, in ascending chunk
            order; flagged (invalid) slots hold 0.
        mask: `(traj, k)` bool, True for a slot that holds a selected chunk. Each row is a prefix of
            Trues: a row has fewer than `k` Trues only when fewer than `k` chunks were available.
        num_chunks: `(traj,)` int64 number of valid (available) chunks `T_i` of each trajectory,
            the full length that the Horvitz-Thompson estimator normalises by.
        chunks_total: the padded number of chunk slots `N` (a Python int).
    """

    indices: Int64[Tensor, "traj k"]
    mask: Bool[Tensor, "traj k"]
    num_chunks: Int64[Tensor, " traj"]
    chunks_total: int

    @property
    def counts(self) -> Int64[Tensor, " traj"]:
        """Number of selected chunks per trajectory, `|S_i|`."""
        return self.mask.sum(dim=1)

    @property
    def num_traj(self) -> int:
        """Number of trajectories."""
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        """Number of slots per trajectory (the requested budget)."""
        return self.indices.shape[1]

    def num_selected(self) -> int:
        """Total number of selected chunks `M` as a Python int (one host sync)."""
        return int(self.mask.sum())

    def packed_traj_index(self, size: int | None = None) -> Int64[Tensor, " packed"]:
        """Trajectory id of each packed item, `(M,)`.

        Args:
            size: `M`, the number of packed items. Passing it (for example `logp.shape[0]` of an
                already packed tensor) avoids a host sync; when None it is read from the mask.
        """
        if size is None:
            size = self.num_selected()
        ends = torch.cumsum(self.counts, dim=0)
        position = torch.arange(size, device=self.indices.device)
        return torch.searchsorted(ends, position, right=True).clamp_max(max(self.num_traj - 1, 0))

    def packed_slot_index(self, size: int | None = None) -> tuple[Tensor, Tensor]:
        """`(traj, slot)` coordinates of each packed item, each `(M,)` int64."""
        if size is None:
            size = self.num_selected()
        counts = self.counts
        ends = torch.cumsum(counts, dim=0)
        position = torch.arange(size, device=self.indices.device)
        traj = torch.searchsorted(ends, position, right=True)
        # Clamp keeps the gather in range if `size` exceeds the true count; callers check sizes.
        traj = traj.clamp_max(self.num_traj - 1)
        slot = position - (ends - counts)[traj]
        return traj, slot.clamp(0, max(self.k - 1, 0))

    def flat_index(self, size: int | None = None) -> Int64[Tensor, " packed"]:
        """Row-major flat index `traj * N + chunk` of each packed item, `(M,)`."""
        traj, slot = self.packed_slot_index(size)
        chunk = self.indices[traj, slot]
        return traj * self.chunks_total + chunk

    def chunk_mask(self) -> Bool[Tensor, "traj chunk"]:
        """Dense `(traj, N)` bool mask of the selected chunks."""
        dense = torch.zeros(
            self.num_traj, self.chunks_total + 1, dtype=torch.bool, device=self.indices.device
        )
        # Flagged slots are routed to a spare column N and dropped.
        target = torch.where(self.mask, self.indices, self.chunks_total)
        dense.scatter_(1, target, True)
        return dense[:, : self.chunks_total]

    @staticmethod
    def from_mask(
        mask: Bool[Tensor, "traj chunk"],
        valid: Bool[Tensor, "traj chunk"] | None = None,
        *,
        k: int | None = None,
    ) -> "Selection":
        """Build a selection from a dense `(traj, N)` bool mask of chosen chunks.

        `Selection.from_mask(valid)` selects every valid chunk: the full-GRPO batch in the same
        packed layout.

        Args:
            mask: `(traj, N)` bool mask of the chunks to select.
            valid: `(traj, N)` bool mask of the available chunks; `num_chunks` counts it. Defaults
                to `mask` itself.
            k: number of slots; defaults to `N`. Must be at least the largest row count (checked
                only when `k < N`, with one host sync).

        Raises:
            TypeError: if `mask` is not a bool tensor.
            ValueError: if `mask` is not 2-D, `valid` has another shape or device, `mask` selects
                a chunk outside `valid`, or a row selects more than `k` chunks.

        Examples:
            >>> import torch
            >>> sel = Selection.from_mask(torch.tensor([[True, False, True], [False, True, False]]))
            >>> sel.indices.tolist(), sel.mask.tolist(), sel.flat_index().tolist()
            ([[0, 2, 0], [1, 0, 0]], [[True, True, False], [True, False, False]], [0, 2, 4])
        """
        check_tensor(mask, "mask", ndim=2, dtypes="bool")
        if valid is not None:
            check_tensor(valid, "valid", ndim=2, dtypes="bool")
            if valid.shape != mask.shape:
                raise ValueError(
                    f"`valid` must have the same shape as `mask` {tuple(mask.shape)}, "
                    f"got {tuple(valid.shape)}."
                )
            check_same_device(valid, "valid", mask, "mask")
            outside = int((mask & ~valid).sum())
            if outside:
                raise ValueError(
                    f"`mask` must select only valid chunks, got {outside} outside `valid`."
                )
        n = mask.shape[1]
        k = n if k is None else check_positive_int(k, "k")
        if k < n:
            most = int(mask.sum(1).max()) if mask.numel() else 0
            if most > k:
                raise ValueError(f"`k` must be at least the largest row count {most}, got {k}.")
        position = torch.arange(n, device=mask.device).expand_as(mask)
        # Selected chunks sort first, in ascending chunk order; the rest get key n + position.
        key = torch.where(mask, position, position + n)
        order = torch.sort(key, dim=1, stable=True).indices
        counts = mask.sum(1)
        if k <= n:
            indices = order[:, :k]
        else:
            pad = torch.zeros(mask.shape[0], k - n, dtype=torch.int64, device=mask.device)
            indices = torch.cat([order, pad], dim=1)
        slot_mask = torch.arange(k, device=mask.device) < counts[:, None]
        indices = torch.where(slot_mask, indices, 0)
        num_chunks = counts if valid is None else valid.sum(1)
        return Selection(indices, slot_mask, num_chunks, n)
