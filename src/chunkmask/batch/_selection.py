r"""The `Selection` type every selector returns, and the packed order it defines.

A selection names, for each trajectory, the chunk slots that enter the actor update. The packed
layout that `chunkmask.shrink`, `chunkmask.unshrink` and the losses share is row-major over the
selected slots: trajectory 0's selected chunks in ascending chunk order, then trajectory 1's, and
so on. A packed batch has `M = selection.counts.sum()` items.

A selection can also carry the inclusion probability $\pi_{i,t} = P(t \in S_i)$ of each selected
chunk (`Selection.inclusion`), filled by every sampler that knows it (`pps_sample`,
`plackett_luce_sample(..., inclusion=True)`, `uniform_sample`, `stratified_sample`,
`top_phase_sample` and the masker built with `inclusion=True`). `Selection.packed_inclusion()`
gives them in the packed order of `shrink`: it is what the Horvitz-Thompson estimator of the
masked loss reads.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int64
from torch import Tensor

from chunkmask._checks import check_positive_int, check_same_device, check_shape, check_tensor


class Selection(NamedTuple):
    r"""Which chunks of each trajectory are kept, in a fixed-size, compile-friendly layout.

    Attributes:
        indices: `(traj, k)` int64 chunk indices. The valid slots come first, in ascending chunk
            order; flagged (invalid) slots hold 0.
        mask: `(traj, k)` bool, True for a slot that holds a selected chunk. Each row is a prefix of
            Trues: a row has fewer than `k` Trues only when fewer than `k` chunks were available.
        num_chunks: `(traj,)` int64 number of valid (available) chunks `T_i` of each trajectory,
            the full length that the Horvitz-Thompson estimator normalises by.
        chunks_total: the padded number of chunk slots `N` (a Python int).
        inclusion: `(traj, k)` floating-point inclusion probability $\pi_{i,t} \in (0, 1]$ of
            the chunk in each selected slot (1.0 at flagged slots), or None when the selector
            does not know them. `packed_inclusion()` returns them in packed order, for the
            Horvitz-Thompson estimator.
    """

    indices: Int64[Tensor, "traj k"]
    mask: Bool[Tensor, "traj k"]
    num_chunks: Int64[Tensor, " traj"]
    chunks_total: int
    inclusion: Float[Tensor, "traj k"] | None = None

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

    def check(self, name: str = "selection", *, values: bool = True) -> "Selection":
        """Check the layout invariants of a (possibly hand-built) selection; return it.

        Metadata (types, dtypes, shapes, devices) always; with `values` also the contents (one
        host sync): every valid slot holds a chunk in `[0, chunks_total)`, valid slots form a
        prefix of each row in strictly ascending chunk order, `num_chunks` lies in
        `[0, chunks_total]`, and `inclusion` (when present) lies in `(0, 1]` at selected slots
        and is 1 at flagged ones.

        Args:
            name: the argument name to report in errors.
            values: also check the contents.

        Raises:
            TypeError: if a field has the wrong type or dtype.
            ValueError: if a shape, device or (with `values`) a value breaks the invariants.
        """
        if not isinstance(self, Selection):
            raise TypeError(f"`{name}` must be a chunkmask.Selection, got {type(self).__name__}.")
        check_tensor(self.indices, f"{name}.indices", ndim=2, dtypes=(torch.int64,))
        check_tensor(self.mask, f"{name}.mask", ndim=2, dtypes="bool")
        check_tensor(self.num_chunks, f"{name}.num_chunks", ndim=1, dtypes="int")
        check_positive_int(self.chunks_total, f"{name}.chunks_total", allow_zero=True)
        if self.mask.shape != self.indices.shape:
            raise ValueError(
                f"`{name}.mask` must have the shape of `{name}.indices` "
                f"{tuple(self.indices.shape)}, got {tuple(self.mask.shape)}."
            )
        if self.num_chunks.shape[0] != self.indices.shape[0]:
            raise ValueError(
                f"`{name}.num_chunks` must have shape ({self.indices.shape[0]},), got "
                f"{tuple(self.num_chunks.shape)}."
            )
        check_same_device(self.mask, f"{name}.mask", self.indices, f"{name}.indices")
        check_same_device(self.num_chunks, f"{name}.num_chunks", self.indices, f"{name}.indices")
        if self.inclusion is not None:
            check_tensor(self.inclusion, f"{name}.inclusion", ndim=2, dtypes="float")
            check_shape(self.inclusion, f"{name}.inclusion", tuple(self.indices.shape))
            check_same_device(
                self.inclusion, f"{name}.inclusion", self.indices, f"{name}.indices"
            )
        if not values or self.indices.numel() == 0:
            return self
        n = self.chunks_total
        out = self.mask & ((self.indices < 0) | (self.indices >= n))
        if bool(out.any()):
            raise ValueError(
                f"`{name}.indices` must lie in [0, {n}) (`chunks_total`) at selected slots, got "
                f"{self.indices[out].tolist()[:5]}."
            )
        if bool((self.mask[:, 1:] & ~self.mask[:, :-1]).any()):
            raise ValueError(f"`{name}.mask` must be a prefix of Trues in every row.")
        rising = self.indices[:, 1:] > self.indices[:, :-1]
        if bool((self.mask[:, 1:] & ~rising).any()):
            raise ValueError(
                f"`{name}.indices` must be strictly ascending over the selected slots of a row."
            )
        if bool(((self.num_chunks < 0) | (self.num_chunks > n)).any()):
            raise ValueError(
                f"`{name}.num_chunks` must lie in [0, {n}], got {self.num_chunks.tolist()[:5]}."
            )
        if self.inclusion is not None:
            pi = self.inclusion
            bad = torch.where(self.mask, ~((pi > 0) & (pi <= 1)), pi != 1)
            if bool(bad.any()):
                raise ValueError(
                    f"`{name}.inclusion` must lie in (0, 1] at selected slots and be 1 at flagged "
                    f"slots, got {pi[bad].tolist()[:5]}."
                )
        return self

    def _size(self, size: int | None) -> int:
        if size is None:
            return self.num_selected()
        return check_positive_int(size, "size", allow_zero=True)

    def rows(self, index: "int | slice | Tensor", *, validate_args: bool = False) -> "Selection":
        """The selection of some trajectories only: `index` picks rows, as `x[index]` would.

        `Selection` is a `NamedTuple`, so `sel[i]` keeps its tuple meaning (the `i`-th field);
        row indexing is this method instead.

        Args:
            index: an int in `[0, traj)` (a one-row selection), a slice (Python semantics, step
                >= 1), a `(traj,)` bool mask, or a 1-D integer tensor of row numbers in
                `[0, traj)` (repeats allowed).
            validate_args: check that an index tensor holds no out-of-range row (one host sync).

        Returns:
            A `Selection` of the chosen trajectories, with the same `k` and `chunks_total`.

        Raises:
            TypeError: if `index` is none of the above (a bool, float or float tensor).
            ValueError: if an int or tensor index is negative or `>= traj`, a bool mask has
                another length, or a slice step is not positive.

        Examples:
            >>> import torch
            >>> sel = Selection.from_mask(torch.tensor([[True, False], [False, True], [True, True]]))
            >>> sel.rows(torch.tensor([2, 0])).indices.tolist(), sel.rows(1).counts.tolist()
            ([[0, 1], [0, 0]], [1])
        """
        num_traj = self.num_traj
        if isinstance(index, slice):
            for part in ("start", "stop", "step"):
                value = getattr(index, part)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise TypeError(
                        f"`index` slice {part} must be an int or None, got "
                        f"{type(value).__name__} {value!r}."
                    )
            if index.step is not None and index.step <= 0:
                raise ValueError(f"`index` slice step must be >= 1, got {index.step}.")
            pick = index
        elif isinstance(index, Tensor):
            if index.dtype == torch.bool:
                check_tensor(index, "index", ndim=1)
                if index.shape[0] != num_traj:
                    raise ValueError(
                        f"`index` bool mask must have shape ({num_traj},) (one entry per "
                        f"trajectory), got {tuple(index.shape)}."
                    )
            else:
                check_tensor(index, "index", ndim=1, dtypes="int")
                if validate_args and index.numel():
                    low, high = int(index.min()), int(index.max())
                    if low < 0 or high >= num_traj:
                        raise ValueError(
                            f"`index` must hold rows in [0, {num_traj}), got values in "
                            f"[{low}, {high}]."
                        )
            check_same_device(index, "index", self.indices, "selection")
            pick = index.to(torch.int64) if index.dtype != torch.bool else index
        else:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(
                    f"`index` must be an int, a slice, a bool mask or an integer tensor, got "
                    f"{type(index).__name__} {index!r}."
                )
            if not 0 <= index < num_traj:
                raise ValueError(f"`index` must lie in [0, {num_traj}), got {index}.")
            pick = slice(index, index + 1)
        inclusion = None if self.inclusion is None else self.inclusion[pick]
        return Selection(
            self.indices[pick], self.mask[pick], self.num_chunks[pick], self.chunks_total, inclusion
        )

    @staticmethod
    def cat(selections: "Sequence[Selection]") -> "Selection":
        """Concatenate selections along the trajectory axis (e.g. data-parallel shards).

        The packed order of the result is the packed order of each input in turn, so a packed
        tensor of the union is `torch.cat` of the inputs' packed tensors.

        Args:
            selections: a non-empty list or tuple of `Selection`s with equal `k`, `chunks_total`
                and device, either all with `inclusion` or all without.

        Returns:
            One `Selection` holding every trajectory, in input order.

        Raises:
            TypeError: if `selections` is not a list or tuple of `Selection`s.
            ValueError: if it is empty or the selections differ in `k`, `chunks_total`, device or
                in whether they carry `inclusion`.

        Examples:
            >>> import torch
            >>> a = Selection.from_mask(torch.tensor([[True, False]]))
            >>> b = Selection.from_mask(torch.tensor([[False, True], [True, True]]))
            >>> Selection.cat([a, b]).flat_index().tolist()
            [0, 3, 4, 5]
        """
        if isinstance(selections, Selection) or not isinstance(selections, (list, tuple)):
            raise TypeError(
                f"`selections` must be a list or tuple of Selection, got "
                f"{type(selections).__name__}."
            )
        if not selections:
            raise ValueError("`selections` must hold at least one Selection, got none.")
        first = selections[0]
        for i, sel in enumerate(selections):
            if not isinstance(sel, Selection):
                raise TypeError(
                    f"`selections[{i}]` must be a Selection, got {type(sel).__name__}."
                )
            if sel.k != first.k or sel.chunks_total != first.chunks_total:
                raise ValueError(
                    f"`selections[{i}]` must have the k and chunks_total of `selections[0]` "
                    f"(k={first.k}, chunks_total={first.chunks_total}), got k={sel.k}, "
                    f"chunks_total={sel.chunks_total}."
                )
            check_same_device(sel.indices, f"selections[{i}]", first.indices, "selections[0]")
            if (sel.inclusion is None) != (first.inclusion is None):
                have = "carries" if first.inclusion is not None else "does not carry"
                raise ValueError(
                    f"`selections[{i}]` must carry `inclusion` exactly when `selections[0]` does "
                    f"(it {have} them), got "
                    f"{'none' if sel.inclusion is None else 'inclusion probabilities'}."
                )
        inclusion = None
        if first.inclusion is not None:
            dtype = torch.promote_types(first.inclusion.dtype, torch.float32)
            for sel in selections:
                dtype = torch.promote_types(dtype, sel.inclusion.dtype)
            inclusion = torch.cat([s.inclusion.to(dtype) for s in selections])
        return Selection(
            torch.cat([s.indices for s in selections]),
            torch.cat([s.mask for s in selections]),
            torch.cat([s.num_chunks for s in selections]),
            first.chunks_total,
            inclusion,
        )

    def with_inclusion(self, inclusion: "Float[Tensor, 'traj chunk'] | None") -> "Selection":
        r"""This selection carrying the inclusion probabilities of a dense `(traj, N)` tensor.

        Reads $\pi_{i,t}$ at each selected chunk into `Selection.inclusion` (1.0 at flagged
        slots); None drops them. Use it to attach the probabilities of a design computed
        elsewhere (e.g. `inclusion_probabilities(weights, budget)` of a Plackett-Luce draw).

        Args:
            inclusion: `(traj, N)` floating-point inclusion probabilities of every chunk, or None.

        Returns:
            A `Selection` with the same slots and `inclusion` filled (or None).

        Raises:
            TypeError: if `inclusion` is not a floating-point tensor.
            ValueError: if its shape is not `(traj, N)` or it lies on another device.

        Examples:
            >>> import torch
            >>> sel = Selection.from_mask(torch.tensor([[True, False, True]]), k=3)
            >>> sel.with_inclusion(torch.tensor([[0.5, 0.2, 0.25]])).inclusion.tolist()
            [[0.5, 0.25, 1.0]]
        """
        if inclusion is None:
            return self._replace(inclusion=None)
        check_tensor(inclusion, "inclusion", ndim=2, dtypes="float")
        check_shape(inclusion, "inclusion", (self.num_traj, self.chunks_total))
        check_same_device(inclusion, "inclusion", self.indices, "selection.indices")
        if self.chunks_total == 0:
            slots = inclusion.new_ones(self.indices.shape)
        else:
            slots = torch.gather(inclusion, 1, self.indices)
        return self._replace(inclusion=torch.where(self.mask, slots, 1.0))

    def with_packed_inclusion(
        self, packed: "Float[Tensor, ' packed'] | None"
    ) -> "Selection":
        r"""This selection carrying inclusion probabilities given in packed `(M,)` order.

        The inverse of `packed_inclusion`: item $m$ of `packed` becomes $\pi$ of the $m$-th
        selected slot (row-major, as `shrink` packs), 1.0 at flagged slots; None drops them. Use
        it when the probabilities travel with packed rows (a trainer that stores one row per
        chunk). No host sync: the scatter has static shapes.

        Args:
            packed: `(M,)` floating-point probabilities, `M = selection.num_selected()`, or None.

        Returns:
            A `Selection` with the same slots and `inclusion` filled (or None).

        Raises:
            TypeError: if `packed` is not a floating-point tensor.
            ValueError: if it is not 1-D, lies on another device, or (on the CPU) its length is
                not the number of selected chunks.

        Examples:
            >>> import torch
            >>> sel = Selection.from_mask(torch.tensor([[True, False, True], [False, True, False]]))
            >>> sel.with_packed_inclusion(torch.tensor([0.5, 0.25, 0.4])).inclusion.tolist()
            [[0.5, 0.25, 1.0], [0.4000000059604645, 1.0, 1.0]]
        """
        if packed is None:
            return self._replace(inclusion=None)
        check_tensor(packed, "packed", ndim=1, dtypes="float")
        check_same_device(packed, "packed", self.indices, "selection.indices")
        if packed.device.type == "cpu" and packed.shape[0] != self.num_selected():
            raise ValueError(
                f"`packed` must hold one probability per selected chunk ({self.num_selected()}), "
                f"got shape {tuple(packed.shape)}."
            )
        slots = torch.ones(self.mask.shape, dtype=packed.dtype, device=packed.device)
        return self._replace(inclusion=slots.masked_scatter(self.mask, packed))

    def packed_inclusion(self, size: int | None = None) -> Float[Tensor, " packed"] | None:
        """Inclusion probability of each packed item, `(M,)`, in the packed order of `shrink`.

        This is what the Horvitz-Thompson estimator of the masked loss reads
        (`masked_grpo_loss(..., selection=sel, estimator="horvitz_thompson")`).

        Args:
            size: `M`, as for `packed_traj_index` (avoids a host sync).

        Returns:
            The `(M,)` probabilities, or None when the selection carries none.

        Examples:
            >>> import torch
            >>> sel = Selection.from_mask(torch.tensor([[True, False, True], [False, True, False]]))
            >>> sel.with_inclusion(torch.tensor([[0.5, 0.2, 0.25], [0.1, 0.4, 0.3]])).packed_inclusion().tolist()
            [0.5, 0.25, 0.4000000059604645]
        """
        if self.inclusion is None:
            return None
        traj, slot = self.packed_slot_index(size)
        return self.inclusion[traj, slot]

    def packed_traj_index(self, size: int | None = None) -> Int64[Tensor, " packed"]:
        """Trajectory id of each packed item, `(M,)`.

        Args:
            size: `M`, the number of packed items. Passing it (for example `logp.shape[0]` of an
                already packed tensor) avoids a host sync; when None it is read from the mask.
        """
        size = self._size(size)
        ends = torch.cumsum(self.counts, dim=0)
        position = torch.arange(size, device=self.indices.device)
        return torch.searchsorted(ends, position, right=True).clamp_max(max(self.num_traj - 1, 0))

    def packed_slot_index(self, size: int | None = None) -> tuple[Tensor, Tensor]:
        """`(traj, slot)` coordinates of each packed item, each `(M,)` int64.

        Args:
            size: `M`, as for `packed_traj_index`.
        """
        size = self._size(size)
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
        packed layout. The result carries no `inclusion` (see `with_inclusion`).

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
