r"""Fixed-shape gather of the selected chunks: `(traj, N, ...)` to `(traj, k, ...)`.

`shrink` packs the selected chunks into `(M, ...)`, whose size `M` depends on the draw. Trainers
whose update loop is written per trajectory (SimpleVLA-RL's `dp_rob` actor walks a row of `T`
chunks in slices of `traj_mini_batch_size`), and code compiled with `torch.compile`, want a shape
that does not change from one step to the next. `gather_chunks` keeps the trajectory axis and
replaces the chunk axis by the `k` slots of the selection: slot `s` of trajectory `i` holds chunk
`selection.indices[i, s]`. Flagged slots (a trajectory with fewer than `k` available chunks) hold
chunk 0's data and must be masked with `selection.mask`; they cost compute but keep the shape.
"""

from typing import Any

import torch
from torch import Tensor

from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import _check_selection, _map_tree, leaf_shape_error


def gather_chunks(tree: Any, selection: Selection, *, validate_args: bool = False) -> Any:
    r"""Gather each trajectory's selected chunks into `k` fixed slots, `(traj, k, ...)`.

    For trajectory $i$ with selected set $S_i$ (Eq. 10 of Anonymous et al. (2026), Probabilistic
    Chunk Masking, arXiv 2605.16154), slot $s < |S_i|$ of the output holds chunk
    `selection.indices[i, s]`, in ascending chunk order; slots $s \ge |S_i|$ (where
    `selection.mask` is False) hold chunk 0 and carry no meaning. The output's shape depends only
    on `selection.k`, never on the draw, so the gather needs no host sync and compiles with
    static shapes. `shrink(tree, selection)` equals this gather restricted to
    `selection.mask`.

    Leaves are handled by rank:

    - a tensor shaped `(traj, N, ...)` becomes `(traj, k, ...)`;
    - a 1-D tensor shaped `(traj,)` (a per-trajectory value) passes through unchanged;
    - anything that is not a tensor passes through unchanged.

    Containers (dict, list, tuple, NamedTuple, dataclass) keep their type. Gradients flow back
    to the inputs' selected chunks.

    Args:
        tree: a pytree of tensors shaped `(traj, N, ...)` or `(traj,)`.
        selection: the `Selection` to apply.
        validate_args: check the selection's invariants (`Selection.check`; one host sync).

    Returns:
        The same structure with each `(traj, N, ...)` leaf gathered to `(traj, k, ...)`.

    Raises:
        TypeError: if `selection` is not a `Selection`.
        ValueError: if a tensor leaf's leading sizes are neither `(traj, N)` nor `(traj,)`, or
            (with `validate_args`) the selection breaks its invariants.

    Examples:
        >>> import torch
        >>> from chunkmask.batch import Selection, gather_chunks
        >>> sel = Selection.from_mask(torch.tensor([[False, True, True], [True, False, False]]), k=2)
        >>> gather_chunks({"obs": torch.arange(6.0).reshape(2, 3)}, sel)["obs"].tolist()
        [[1.0, 2.0], [3.0, 3.0]]
    """
    selection = _check_selection(selection, validate_args)
    num_traj, num_chunks = selection.num_traj, selection.chunks_total
    rows = torch.arange(num_traj, device=selection.indices.device)[:, None]

    def gather(x: Tensor, path: str) -> Tensor:
        if x.ndim >= 2 and x.shape[0] == num_traj and x.shape[1] == num_chunks:
            if num_chunks == 0:
                return x.new_zeros((num_traj, selection.k, *x.shape[2:]))
            return x[rows.to(x.device), selection.indices.to(x.device)]
        if x.ndim == 1 and x.shape[0] == num_traj:
            return x
        raise leaf_shape_error(path, x, num_traj, num_chunks)

    return _map_tree(gather, tree, "tree")


def scatter_chunks(
    tree: Any,
    selection: Selection,
    *,
    fill: float | bool | int = 0.0,
) -> Any:
    """Scatter `(traj, k, ...)` slot tensors back to `(traj, N, ...)`: the inverse of `gather_chunks`.

    Position `(i, t)` of the output holds slot `s` of trajectory `i` when
    `selection.indices[i, s] == t` at a selected slot, and `fill` otherwise; flagged slots are
    dropped. Gradients flow back to the selected slots.

    Args:
        tree: a pytree of tensors shaped `(traj, k, ...)`.
        selection: the `Selection` the slots came from.
        fill: the value of unselected positions (cast to each leaf's dtype).

    Returns:
        The same structure with each tensor leaf shaped `(traj, N, ...)`.

    Raises:
        TypeError: if `selection` is not a `Selection` or `fill` not a Python number.
        ValueError: if a tensor leaf's leading sizes are not `(traj, k)`.

    Examples:
        >>> import torch
        >>> from chunkmask.batch import Selection, scatter_chunks
        >>> sel = Selection.from_mask(torch.tensor([[False, True, True], [True, False, False]]), k=2)
        >>> scatter_chunks(torch.tensor([[1.0, 2.0], [3.0, 9.0]]), sel, fill=-1.0).tolist()
        [[-1.0, 1.0, 2.0], [3.0, -1.0, -1.0]]
    """
    selection = _check_selection(selection, False)
    if isinstance(fill, Tensor) or not isinstance(fill, (bool, int, float)):
        raise TypeError(f"`fill` must be a Python bool, int or float, got {type(fill).__name__}.")
    num_traj, k, n = selection.num_traj, selection.k, selection.chunks_total
    # Flagged slots go to a spare column N, cut off at the end.
    target = torch.where(selection.mask, selection.indices, n)

    def scatter(x: Tensor, path: str) -> Tensor:
        if x.ndim < 2 or x.shape[0] != num_traj or x.shape[1] != k:
            raise ValueError(
                f"`{path}` must be shaped (traj, k, ...) = ({num_traj}, {k}, ...), got "
                f"{tuple(x.shape)}."
            )
        out = x.new_full((num_traj, n + 1, *x.shape[2:]), fill)
        index = target.to(x.device).reshape(num_traj, k, *([1] * (x.ndim - 2))).expand(x.shape)
        return out.scatter(1, index, x)[:, :n]

    return _map_tree(scatter, tree, "tree")
