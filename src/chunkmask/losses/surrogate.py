"""The per-token clipped surrogate of Eq. (2) and the KL estimators the policy losses share."""

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_same_device,
    check_same_shape,
    check_tensor,
    values_checkable,
)
from chunkmask.aggregation import compute_dtype
from chunkmask.losses.options import KL_TYPES, Clip, check_spec

__all__ = ["KL_TYPES", "SurrogateOutput", "clipped_surrogate"]


class SurrogateOutput(NamedTuple):
    r"""Per-token result of `clipped_surrogate`; every field has the shape of `logp`.

    Attributes:
        loss: the surrogate loss $L_t$ to minimise (the negated clipped objective).
        ratio: the importance ratio $\rho_t$ (after the log-ratio clamp).
        clipped_low: bool, the lower bound $1 - \varepsilon_{low}$ is active ($A_t < 0$ and
            $\rho_t < 1 - \varepsilon_{low}$), so the token passes no gradient.
        clipped_high: bool, the upper bound $1 + \varepsilon_{high}$ is active ($A_t > 0$ and
            $\rho_t > 1 + \varepsilon_{high}$), so the token passes no gradient.
        dual_clipped: bool, the dual clip $-A_t c$ is active ($A_t < 0$, $\rho_t > c$); all
            False when the dual clip is off.
    """

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    dual_clipped: Tensor


def broadcast_advantages(
    advantages: Tensor, ref: Tensor, name: str = "advantages", ref_name: str = "logp"
) -> Tensor:
    """Append singleton axes so `advantages` (a leading-prefix shape of `ref`) broadcasts."""
    scalar_ok = advantages.ndim > 0 or ref.ndim == 0
    if not scalar_ok or advantages.ndim > ref.ndim or advantages.shape != ref.shape[: advantages.ndim]:
        raise ValueError(
            f"`{name}` must have the shape of `{ref_name}` {tuple(ref.shape)} or a leading part "
            "of it, "
            f"got {tuple(advantages.shape)}."
        )
    return advantages.reshape(advantages.shape + (1,) * (ref.ndim - advantages.ndim))


def clipped_surrogate(
    logp: Float[Tensor, "*batch"],
    *,
    old_logp: Float[Tensor, "*batch"],
    advantages: Float[Tensor, "*adv"],
    clip: Clip = Clip(),
    validate_args: bool = False,
) -> SurrogateOutput:
    r"""Compute the per-token clipped surrogate loss with clip-higher and optional dual clip.

    $$
    \rho_t = \exp\!\big(\operatorname{clamp}(\log\pi_\theta - \log\pi_{old}, -\kappa, \kappa)\big),
    \qquad
    L^{1}_t = \max\!\big(-A_t\rho_t,\; -A_t\operatorname{clip}(\rho_t, 1-\varepsilon_{low},
        1+\varepsilon_{high})\big),
    $$
    $$
    L_t = \begin{cases} \min(L^{1}_t, -A_t c) & A_t < 0 \text{ and dual clip on}\\
        L^{1}_t & \text{otherwise.}\end{cases}
    $$

    See Eq. (2) of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154. The
    asymmetric bounds are DAPO's "clip-higher" (Yu et al. 2025, arXiv 2503.14476, Eq. 10:
    `clip_high` is $\varepsilon_{high}$); the dual clip is Ye et al. (2020), arXiv 1912.09729,
    with verl's convention (`clip_ratio_c`, default 3 there, off here). $L_t$ is the negated
    objective, ready to minimise.

    The surrogate is computed in float32 for half/bfloat16/float32 inputs and in float64 for
    float64 inputs; all outputs use that dtype (the flags are bool).

    Args:
        logp: `(*batch)` log-probabilities of the taken tokens under the current policy.
        old_logp: `(*batch)` log-probabilities under the behaviour policy.
        advantages: the advantage of each token, with the shape of `logp` or a leading part of it
            (e.g. `(packed,)` against `(packed, token)`; 0-d only with a 0-d `logp`), broadcast along the
            trailing axes.
        clip: the ratio clipping (`Clip`: $\varepsilon_{low}$ in `[0, 1]`,
            $\varepsilon_{high} \ge 0$, the dual-clip constant $c > 1$ or None, and the clamp
            $\kappa > 0$ on the log ratio before `exp`, verl: 20).
        validate_args: check that the inputs are finite (one host sync on an accelerator).

    Returns:
        A `SurrogateOutput` of per-token tensors, each of the shape of `logp`.

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: if shapes do not match, a `clip` field is out of range, or (with
            `validate_args`) an input holds NaN/Inf.

    Examples:
        >>> import torch
        >>> logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
        >>> out = clipped_surrogate(logp, old_logp=torch.zeros(1, 3), advantages=torch.tensor([1.0]))
        >>> out.loss, out.clipped_high
        (tensor([[-1.2800, -0.5000, -1.0000]]), tensor([[ True, False, False]]))
    """
    check_tensor(logp, "logp", dtypes="float")
    check_tensor(old_logp, "old_logp", dtypes="float")
    check_tensor(advantages, "advantages", dtypes="float")
    check_same_shape(old_logp, "old_logp", logp, "logp")
    check_same_device(old_logp, "old_logp", logp, "logp")
    check_same_device(advantages, "advantages", logp, "logp")
    clip = check_spec(clip, "clip", Clip)
    adv = broadcast_advantages(advantages, logp)
    if values_checkable(logp, validate_args):
        for value, name in ((logp, "logp"), (old_logp, "old_logp"), (advantages, "advantages")):
            check_finite(value, name)
    dtype = compute_dtype(torch.promote_types(logp.dtype, advantages.dtype))
    return surrogate(
        logp.to(dtype),
        old_logp.to(dtype),
        adv.to(dtype),
        clip.low,
        clip.high,
        clip.dual,
        clip.log_ratio_clamp,
    )


def surrogate(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float,
) -> SurrogateOutput:
    log_ratio = torch.clamp(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clip_active = loss_clipped > loss_unclipped
    negative = adv < 0
    clipped_low = clip_active & negative
    clipped_high = clip_active & (adv > 0)
    if dual_clip is None:
        dual_clipped = torch.zeros_like(clip_active)
    else:
        floor = -adv * dual_clip
        dual_clipped = negative & (loss > floor)
        loss = torch.where(negative, torch.minimum(loss, floor), loss)
    shape = torch.broadcast_shapes(loss.shape, logp.shape)
    return SurrogateOutput(
        loss.expand(shape),
        ratio.expand(shape),
        clipped_low.expand(shape),
        clipped_high.expand(shape),
        dual_clipped.expand(shape),
    )


def kl_estimate(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate (Schulman's k1/k2/k3)."""
    if kl_type == "k1":
        return logp - ref_logp
    if kl_type == "k2":
        return 0.5 * (logp - ref_logp).square()
    log_ratio = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)


