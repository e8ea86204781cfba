"""The chunk-level PPO value loss, with value clipping and a Huber or squared error."""

from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_option,
    check_range,
    check_same_device,
    check_same_shape,
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

__all__ = ["value_loss"]


def _huber(error: Tensor, delta: float) -> Tensor:
    abs_err = error.abs()
    return torch.where(abs_err <= delta, 0.5 * error.square(), delta * (abs_err - 0.5 * delta))


def value_loss(
    values: Float[Tensor, " packed"] | Float[Tensor, "rows chunk"],
    *,
    returns: Float[Tensor, " packed"] | Float[Tensor, "rows chunk"],
    selection: Selection | None = None,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "rows chunk"] | None = None,
    old_values: Float[Tensor, " packed"] | Float[Tensor, "rows chunk"] | None = None,
    value_clip: float | None = 0.2,
    loss_type: Literal["huber", "mse"] = "huber",
    huber_delta: float = 10.0,
    loss_agg_mode: AggregationMode = "token-mean",
    norms: LossNormalizers | None = None,
    validate_args: bool = False,
) -> Float[Tensor, ""]:
    r"""The PPO value loss per chunk, with optional value clipping and a Huber or squared error.

    $$
    V^{clip}_t = V^{old}_t + \mathrm{clip}(V_t - V^{old}_t, -c, c), \qquad
    \ell_t = \max\big(L(V_t - \hat G_t),\ L(V^{clip}_t - \hat G_t)\big)
    $$

    with $L$ the Huber loss $L_\delta(e) = \tfrac12 e^2$ for $|e| \le \delta$ and
    $\delta(|e| - \tfrac12\delta)$ beyond, or $\tfrac12 e^2$ (`loss_type="mse"`). Without
    `old_values` or with `value_clip=None` the unclipped $L(V_t - \hat G_t)$ is used. The defaults (Huber
    $\delta = 10$, value clip 0.2) are RLinf's chunk-level PPO defaults. The per-chunk losses are
    reduced by `aggregate_loss` with a chunk as the token, in the layouts of `chunked_ppo_loss`
    (padded `(traj, chunk)`, packed `(M,)` with `selection`, or flat `(m,)`), with the same
    data-parallel normalisers.

    Args:
        values: current value predictions.
        returns: value targets $\hat G_t$ (from `chunk_gae`), same shape.
        selection: the `Selection` a packed batch came from; None otherwise.
        mask: bool, True for chunks that count. Defaults to all True.
        old_values: the values recorded at rollout time, for clipping.
        value_clip: value clip $c > 0$, or None for no clipping.
        loss_type: `"huber"` or `"mse"`.
        huber_delta: Huber threshold $\delta > 0$.
        loss_agg_mode: one of `AGGREGATION_MODES`, over chunks.
        norms: the data-parallel normalisers (`LossNormalizers`, e.g. from `loss_normalizers`),
            or None for one rank's defaults; see `aggregate_loss`.
        validate_args: run the value checks (finite valid inputs, one row per selected chunk); they read tensor
            contents (one host sync).

    Returns:
        0-d loss tensor.

    Raises:
        TypeError: on non-float inputs, a non-bool mask or a bad `selection`.
        ValueError: on mismatched shapes, a non-positive `value_clip` or `huber_delta`, an unknown
            option, or non-finite valid inputs.

    Example:
        >>> import torch
        >>> v = torch.tensor([[0.0, 1.0]], requires_grad=True)
        >>> loss = value_loss(v, returns=torch.tensor([[1.0, 30.0]]),
        ...                   old_values=torch.tensor([[0.0, 1.0]]))
        >>> round(loss.item(), 4)  # (0.5 + 10 * (29 - 5)) / 2
        120.25
    """
    check_tensor(values, "values", dtypes="float")
    check_tensor(returns, "returns", dtypes="float")
    check_same_shape(returns, "returns", values, "values")
    check_same_device(returns, "returns", values, "values")
    layout = resolve_layout(values, "values", selection, mask, validate_args)
    mask = layout.mask
    check_option(loss_type, "loss_type", ("huber", "mse"))
    check_option(loss_agg_mode, "loss_agg_mode", AGGREGATION_MODES)
    huber_delta = check_range(huber_delta, "huber_delta", low=0.0, low_open=True)
    if value_clip is not None:
        value_clip = check_range(value_clip, "value_clip", low=0.0, low_open=True)
    if old_values is not None:
        check_tensor(old_values, "old_values", dtypes="float")
        check_same_shape(old_values, "old_values", values, "values")
        check_same_device(old_values, "old_values", values, "values")
    if values_checkable(values, validate_args):
        for value, name in ((values, "values"), (returns, "returns"), (old_values, "old_values")):
            if value is not None:
                check_finite(value, name, where=mask)
    dtype = compute_dtype(values.dtype)
    v = torch.where(mask, values.to(dtype), 0)
    g = torch.where(mask, returns.to(dtype), 0)

    def err(e: Tensor) -> Tensor:
        return _huber(e, huber_delta) if loss_type == "huber" else 0.5 * e.square()

    per_chunk = err(v - g)
    if old_values is not None and value_clip is not None:
        old = torch.where(mask, old_values.to(dtype), 0)
        clipped = old + (v - old).clamp(-value_clip, value_clip)
        per_chunk = torch.maximum(per_chunk, err(clipped - g))
    return layout.aggregate(
        per_chunk,
        loss_agg_mode,
        check_norms(norms),
        validate_args,
    )
