"""How a loss's inputs map to `aggregate_loss` rows and sequences: one rule for every loss."""

from typing import Any, NamedTuple

from torch import Tensor

from chunkmask._checks import check_packed_rows, check_same_device, resolve_mask
from chunkmask.aggregation import LossNormalizers, aggregate_loss
from chunkmask.batch._selection import Selection


class Layout(NamedTuple):
    """A loss's batch as `(rows, token)` rows grouped into sequences.

    Attributes:
        mask: the resolved bool mask, the shape of the reference input.
        segment: `(rows,)` trajectory id of each row, or None (each row its own sequence).
        num_segments: the number of trajectories with `segment`, else None.
        horizon: the padded length of a sequence in tokens, the default `loss_scale_factor`.
        tokens: tokens per row (1 for one value per chunk).
    """

    mask: Tensor
    segment: Tensor | None
    num_segments: int | None
    horizon: int
    tokens: int

    def rows(self, x: Tensor) -> Tensor:
        """`x` (the shape of the reference input) as a `(rows, token)` matrix."""
        return x[:, None] if self.mask.ndim == 1 else x

    def aggregate(
        self, values: Tensor, mode: str, norms: LossNormalizers, validate_args: bool
    ) -> Tensor:
        """`aggregate_loss` of `values` (the shape of the reference input) on this layout.

        `norms.loss_scale_factor` defaults to the horizon.
        """
        scale = self.horizon if norms.loss_scale_factor is None else norms.loss_scale_factor
        return aggregate_loss(
            self.rows(values),
            self.rows(self.mask),
            mode,
            dp_size=norms.dp_size,
            batch_num_tokens=norms.batch_num_tokens,
            global_batch_size=norms.global_batch_size,
            loss_scale_factor=scale,
            segment=self.segment,
            num_segments=self.num_segments,
            validate_args=validate_args,
        )


def resolve_layout(
    ref: Tensor, name: str, selection: Any, mask: Any, validate_args: bool
) -> Layout:
    """Resolve `selection` and `mask` against the reference input `ref` (named `name`).

    - With a `Selection`, `ref` is packed: `(M,)` (one value per selected chunk) or `(M, K)`
      (K tokens per chunk); the sequences are trajectories and the horizon is `selection.k * K`.
    - Without one, `ref` is `(rows, token)` with one sequence per row (horizon `token`), or `(m,)`
      with each entry its own sequence (horizon 1).
    """
    if ref.ndim not in (1, 2):
        layouts = "packed (M,) or (M, K)" if selection is not None else "(rows, token) or (m,)"
        raise ValueError(
            f"`{name}` must be {layouts}, got {ref.ndim} dimensions (shape {tuple(ref.shape)})."
        )
    mask = resolve_mask(mask, "mask", ref, name)
    tokens = 1 if ref.ndim == 1 else ref.shape[1]
    if selection is None:
        horizon = tokens
        return Layout(mask, None, None, horizon, tokens)
    if not isinstance(selection, Selection):
        raise TypeError(f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}.")
    check_same_device(selection.mask, "selection", ref, name)
    check_packed_rows(ref.shape[0], name, selection.mask, validate_args)
    segment = selection.packed_traj_index(size=ref.shape[0])
    return Layout(mask, segment, selection.num_traj, selection.k * tokens, tokens)
