"""The self behaviour-cloning loss: negative log-likelihood of buffered successful chunks."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_option,
    check_positive_int,
    check_tensor,
    values_checkable,
)
from chunkmask.aggregation import (
    AGGREGATION_MODES,
    AggregationMode,
    LossNormalizers,
    check_norms,
    compute_dtype,
)
from chunkmask.batch._selection import Selection
from chunkmask.losses._layout import resolve_layout

__all__ = ["bc_loss"]


def bc_loss(
    logp: Float[Tensor, " packed"] | Float[Tensor, "rows chunk"],
    *,
    selection: Selection | None = None,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "rows chunk"] | None = None,
    loss_agg_mode: AggregationMode = "token-mean",
    event_size: int = 1,
    norms: LossNormalizers | None = None,
    validate_args: bool = False,
) -> Float[Tensor, ""]:
    r"""Negative log-likelihood of buffered action chunks under the current policy.

    $$
    \mathcal{L}_{BC} = -\frac{1}{E \sum_{i,t} m_{i,t}} \sum_{i,t} m_{i,t}
        \log\pi_\theta(a_{i,t} \mid o_{i,t})
    $$

    in the default `token-mean` mode, with $\log\pi_\theta(a_{i,t} \mid o_{i,t})$ the chunk
    log-probability (`chunk_log_prob`) of buffered chunk $t$ of trajectory $i$ and $E$ =
    `event_size` (e.g. $H D$ to report a per-dimension NLL, which keeps the BC weight comparable
    across chunk sizes). Other modes are those of `aggregate_loss`, in the layouts of
    `chunked_ppo_loss` (padded `(traj, chunk)`, packed `(M,)` with `selection`, or flat `(m,)`),
    with the same data-parallel normalisers. The auxiliary self behaviour-cloning loss of the
    action-chunked PPO paper (2026).

    Args:
        logp: chunk log-probabilities.
        selection: the `Selection` a packed batch came from; None otherwise.
        mask: bool, True for chunks that count (padding may hold NaN). Defaults to all True.
        loss_agg_mode: one of `AGGREGATION_MODES`.
        event_size: divide by this many action elements per chunk.
        norms: the data-parallel normalisers (`LossNormalizers`, e.g. from `loss_normalizers`),
            or None for one rank's defaults; see `aggregate_loss`.
        validate_args: run the value checks (they read tensor contents: one host sync).

    Returns:
        0-d loss; gradients are 0 at masked chunks.

    Raises:
        TypeError: if `logp` is not floating point, `mask` is not bool or `selection` is not a
            `Selection`.
        ValueError: on a mask of another shape, a bad layout, a bad option, or a non-finite
            valid `logp`.

    Example:
        >>> import torch
        >>> lp = torch.tensor([[-2.0, -4.0], [-1.0, float("nan")]], requires_grad=True)
        >>> loss = bc_loss(lp, mask=torch.tensor([[True, True], [True, False]]), event_size=2)
        >>> round(loss.item(), 4)  # (2 + 4 + 1) / 2 / 3
        1.1667
    """
    check_tensor(logp, "logp", dtypes="float")
    layout = resolve_layout(logp, "logp", selection, mask, validate_args)
    mask = layout.mask
    check_option(loss_agg_mode, "loss_agg_mode", AGGREGATION_MODES)
    event_size = check_positive_int(event_size, "event_size")
    if values_checkable(logp, validate_args):
        check_finite(logp, "logp", where=mask)
    nll = -torch.where(mask, logp.to(compute_dtype(logp.dtype)), 0) / event_size
    return layout.aggregate(
        nll,
        loss_agg_mode,
        check_norms(norms),
        validate_args,
    )
