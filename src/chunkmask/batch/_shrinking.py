"""Physically shrink a batch to the selected chunks, and scatter results back.

PCM saves compute only if unselected chunks never reach the actor's forward pass. `shrink`
gathers the selected chunks out of every per-chunk tensor of a batch (observations, tokens,
behaviour log-probabilities, masks, broadcast advantages) into packed `(M, ...)` tensors, in the
packed order defined by `chunkmask.Selection`; `unshrink` is the inverse scatter. Nothing is
multiplied by a 0/1 mask instead (Sec. 4.5 of the PCM paper).

Inclusion probabilities need no shrinking: a selection drawn by a sampler that knows them carries
them, and `selection.packed_inclusion()` returns them in this same packed order. That is what the
Horvitz-Thompson estimator of the masked loss reads.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from chunkmask._checks import check_positive_int
from chunkmask.batch._selection import Selection


def _map_tree(fn: Callable[[Tensor, str], Any], tree: Any, path: str) -> Any:
    """Apply ``fn`` to every tensor leaf of a dict / list / tuple / NamedTuple / dataclass tree."""
    if isinstance(tree, Tensor):
        return fn(tree, path)
    if isinstance(tree, dict):
        return type(tree)(
            (key, _map_tree(fn, value, f"{path}[{key!r}]")) for key, value in tree.items()
        )
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_tree(fn, getattr(tree, f), f"{path}.{f}") for f in tree._fields))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tree(fn, value, f"{path}[{i}]") for i, value in enumerate(tree))
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {
            f.name: _map_tree(fn, getattr(tree, f.name), f"{path}.{f.name}")
            for f in dataclasses.fields(tree)
            if f.init
        }
        return dataclasses.replace(tree, **changes)
    return tree


def _check_selection(selection: Any, validate_args: bool) -> Selection:
    if not isinstance(selection, Selection):
        raise TypeError(
            f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}."
        )
    return selection.check("selection", values=validate_args)


def shrink(
    tree: Any,
    selection: Selection,
    *,
    size: int | None = None,
    validate_args: bool = False,
) -> Any:
    r"""Gather the selected chunks of every per-chunk tensor into a packed batch.

    For a trajectory $i$ with selected set $S_i$ (Eq. 10), the packed batch holds
    $\{x_{i,t} : t \in S_i\}$ for every per-chunk tensor $x$, ordered trajectory by trajectory and,
    within a trajectory, by ascending chunk index. Its size is $M = \sum_i |S_i|$. This is the
    physical shrinking of Sec. 4.5 of Anonymous et al. (2026), Probabilistic Chunk Masking,
    arXiv 2605.16154: the forward and backward passes then see only $M$ chunks.

    Leaves are handled by rank:

    - a tensor shaped `(traj, N, ...)` is gathered to `(M, ...)`;
    - a 1-D tensor shaped `(traj,)` (a per-trajectory value such as an advantage) is broadcast
      to its chunks, `(M,)`;
    - anything else that is not a tensor (ints, strings, None) passes through unchanged.

    Containers (dict, list, tuple, NamedTuple, dataclass) keep their type. Gradients flow back
    to the inputs. NaN/Inf in unselected chunks never reach the output.

    Args:
        tree: a pytree of tensors shaped `(traj, N, ...)` or `(traj,)`.
        selection: the `Selection` to apply.
        size: the number of selected chunks `M`, if known. Passing it avoids the one host sync
            that reading `M` from the selection costs (with `validate_args=False`).
        validate_args: check `size` and the selection's invariants (`Selection.check`; one host
            sync).

    Returns:
        The same structure with each tensor leaf packed to `(M, ...)`.

    Raises:
        TypeError: if `selection` is not a `Selection` or `size` not an int.
        ValueError: if a tensor leaf's leading sizes are neither `(traj, N)` nor `(traj,)`,
            `size` is negative or disagrees with the selection, or (with `validate_args`) the
            selection breaks its invariants (e.g. a hand-built index outside `[0, N)`).

    Examples:
        >>> import torch
        >>> from chunkmask import Selection, shrink
        >>> valid = torch.tensor([[True, True, True], [True, True, False]])
        >>> sel = Selection.from_mask(torch.tensor([[False, True, True], [True, False, False]]), valid)
        >>> batch = shrink({"obs": torch.arange(6.0).reshape(2, 3), "adv": torch.tensor([1.0, -1.0])}, sel)
        >>> batch["obs"].tolist(), batch["adv"].tolist()
        ([1.0, 2.0, 3.0], [1.0, 1.0, -1.0])
    """
    selection = _check_selection(selection, validate_args)
    if size is not None:
        size = check_positive_int(size, "size", allow_zero=True)
        if validate_args and size != selection.num_selected():
            raise ValueError(
                f"`size` must equal the number of selected chunks {selection.num_selected()}, "
                f"got {size}."
            )
    else:
        size = selection.num_selected()
    traj, slot = selection.packed_slot_index(size)
    chunk = selection.indices[traj, slot]
    num_traj, num_chunks = selection.num_traj, selection.chunks_total

    def gather(x: Tensor, path: str) -> Tensor:
        if x.ndim >= 2 and x.shape[0] == num_traj and x.shape[1] == num_chunks:
            return x[traj.to(x.device), chunk.to(x.device)]
        if x.ndim == 1 and x.shape[0] == num_traj:
            return x[traj.to(x.device)]
        raise leaf_shape_error(path, x, num_traj, num_chunks)

    return _map_tree(gather, tree, "tree")


def leaf_shape_error(path: str, x: Tensor, num_traj: int, num_chunks: int) -> ValueError:
    """The error for a tree leaf that is neither `(traj, N, ...)` nor `(traj,)`."""
    return ValueError(
        f"`{path}` must be shaped (traj, N, ...) = ({num_traj}, {num_chunks}, ...) or "
        f"(traj,) = ({num_traj},), got {tuple(x.shape)}."
    )


def unshrink(
    tree: Any,
    selection: Selection,
    *,
    fill: float | bool | int = 0.0,
    validate_args: bool = False,
) -> Any:
    r"""Scatter packed `(M, ...)` tensors back to padded `(traj, N, ...)` tensors.

    The inverse of `shrink`: position $(i, t)$ of the output holds the packed item of chunk $t$ of
    trajectory $i$ when $t \in S_i$, and `fill` otherwise. Gradients flow back to the packed
    inputs (the filled positions carry none).

    Args:
        tree: a pytree of packed tensors shaped `(M, ...)`, in the packed order of `selection`.
        selection: the `Selection` that produced the packing.
        fill: the value of unselected positions (cast to each leaf's dtype).
        validate_args: check each leaf's `M` and the selection's invariants (`Selection.check`;
            one host sync).

    Returns:
        The same structure with each tensor leaf shaped `(traj, N, ...)`.

    Raises:
        TypeError: if `selection` is not a `Selection`.
        ValueError: if a leaf is 0-d or its first size is not the number of selected chunks, or
            (with `validate_args`) the selection breaks its invariants.

    Examples:
        >>> import torch
        >>> from chunkmask import Selection, unshrink
        >>> sel = Selection.from_mask(torch.tensor([[False, True, True], [True, False, False]]))
        >>> unshrink(torch.tensor([1.0, 2.0, 3.0]), sel, fill=-1.0).tolist()
        [[-1.0, 1.0, 2.0], [3.0, -1.0, -1.0]]
    """
    selection = _check_selection(selection, validate_args)
    if isinstance(fill, Tensor) or not isinstance(fill, (bool, int, float)):
        raise TypeError(f"`fill` must be a Python bool, int or float, got {type(fill).__name__}.")
    expected = selection.num_selected() if validate_args else None

    def scatter(x: Tensor, path: str) -> Tensor:
        if x.ndim == 0:
            raise ValueError(
                f"`{path}` must have a packed leading dimension (M, ...), got a 0-d tensor."
            )
        if expected is not None and x.shape[0] != expected:
            raise ValueError(
                f"`{path}` must have {expected} packed items (the selected chunks) in its first "
                f"dimension, got shape {tuple(x.shape)}."
            )
        traj, slot = selection.packed_slot_index(x.shape[0])
        chunk = selection.indices[traj, slot]
        out = x.new_full((selection.num_traj, selection.chunks_total, *x.shape[1:]), fill)
        return torch.index_put(out, (traj.to(x.device), chunk.to(x.device)), x)

    return _map_tree(scatter, tree, "tree")
