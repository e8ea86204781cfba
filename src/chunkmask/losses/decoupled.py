r"""The decoupled PPO loss for stale (off-policy) samples, and the proximal interpolation.

With asynchronous rollouts three policies meet in the loss (Hilton et al. 2022, "Batch size
invariance for policy optimization", arXiv 2110.00641; AReaL, arXiv 2505.24298, Eq. 5):
$\pi_{behav}$ generated the sample, $\pi_{prox}$ is the clipping anchor (a recent policy), and
$\pi_\theta$ is trained. The clipped surrogate is taken against $\pi_{prox}$, and an importance
weight corrects from $\pi_{behav}$ to $\pi_{prox}$:

$$
w_t = \frac{\pi_{prox}(a_t)}{\pi_{behav}(a_t)}, \qquad
L_t = w_t \max\big(-A_t \rho_t,\, -A_t \operatorname{clip}(\rho_t, 1-\varepsilon_{low},
    1+\varepsilon_{high})\big), \qquad \rho_t = \frac{\pi_\theta(a_t)}{\pi_{prox}(a_t)}.
$$
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_option,
    check_positive_int,
    check_range,
    check_same_device,
    check_same_shape,
    check_tensor,
    resolve_mask,
    values_checkable,
)
from chunkmask.aggregation import AggregationMode, Normalizer, compute_dtype
from chunkmask.losses.policy import _policy_loss
from chunkmask.selection import Selection

__all__ = ["DecoupledPPOLossOutput", "decoupled_ppo_loss", "interpolate_proximal_logp"]

Values = Float[Tensor, " packed"] | Float[Tensor, "packed token"]


class DecoupledPPOLossOutput(NamedTuple):
    r"""Result of `decoupled_ppo_loss`; every field is a 0-d tensor.

    Attributes:
        loss: the total loss to minimise (policy, entropy and KL terms).
        policy_loss: the aggregated behaviour-weighted clipped surrogate.
        entropy_loss: the aggregated entropy (0 without `entropy`).
        kl_loss: the aggregated KL to the reference policy (0 without `ref_logp`).
        clip_frac_low: fraction of valid tokens clipped at $1 - \varepsilon_{low}$.
        clip_frac_high: fraction of valid tokens clipped at $1 + \varepsilon_{high}$.
        dual_clip_frac: fraction of valid tokens hit by the dual clip.
        approx_kl: mean over valid tokens of $\log\pi_{prox} - \log\pi_\theta$.
        ratio_mean: mean of $\rho_t$ over valid tokens.
        capped_frac: fraction of valid tokens whose behaviour weight was outside
            `[behaviour_weight_floor, behaviour_weight_cap]` (masked or clamped).
        behaviour_weight_mean: mean behaviour weight $w_t$ over valid tokens, after the cap.
        staleness_mean: mean staleness over valid tokens (0 without `staleness`).
    """

    loss: Tensor
    policy_loss: Tensor
    entropy_loss: Tensor
    kl_loss: Tensor
    clip_frac_low: Tensor
    clip_frac_high: Tensor
    dual_clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor
    capped_frac: Tensor
    behaviour_weight_mean: Tensor
    staleness_mean: Tensor


def decoupled_ppo_loss(
    logp: Values,
    proximal_logp: Values,
    behaviour_logp: Values,
    advantages: Values,
    selection: Selection | None = None,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "packed token"] | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    behaviour_weight_cap: float | None = 2.0,
    behaviour_weight_floor: float | None = None,
    cap_mode: Literal["mask", "clamp"] = "mask",
    staleness: Real[Tensor, " packed"] | Real[Tensor, "packed token"] | None = None,
    log_ratio_clamp: float = 20.0,
    loss_agg_mode: AggregationMode = "token-mean",
    entropy: Values | None = None,
    entropy_coef: float = 0.0,
    ref_logp: Values | None = None,
    kl_coef: float = 0.0,
    kl_type: Literal["k1", "k2", "k3"] = "k3",
    dp_size: int = 1,
    batch_num_tokens: Normalizer | None = None,
    global_batch_size: Normalizer | None = None,
    loss_scale_factor: Normalizer | None = None,
    validate_args: bool = False,
) -> DecoupledPPOLossOutput:
    r"""The decoupled PPO loss: clip against $\pi_{prox}$, correct from $\pi_{behav}$.

    $$
    L_t = w_t\, \ell^{clip}_t(\rho_t), \qquad
    \rho_t = e^{\log\pi_\theta - \log\pi_{prox}}, \qquad
    w_t = e^{\log\pi_{prox} - \log\pi_{behav}} \;\text{(detached)},
    $$

    with $\ell^{clip}$ the clipped surrogate of `clipped_surrogate` (clip-higher and optional dual
    clip), reduced by `aggregate_loss` in the layouts of `masked_grpo_loss`: a packed batch with
    its `Selection` (PCM's chunks) or `(rows, token)` rows, and the same data-parallel normalisers.
    See AReaL (arXiv 2505.24298, Eq. 5) and RLinf's decoupled actor loss.

    The behaviour weight is bounded (AReaL uses caps of 2 to 5, RLinf 2):

    - `cap_mode="mask"`: a token with $w_t$ above `behaviour_weight_cap` (or below
      `behaviour_weight_floor`) gets weight 0, so it passes no gradient; it still counts in the
      normalisers, as in AReaL, so masking does not rescale the other tokens;
    - `cap_mode="clamp"`: $w_t$ is clamped into the bounds.

    With `proximal_logp == behaviour_logp` (no staleness) $w_t = 1$ and the loss is exactly the
    on-policy `masked_grpo_loss` with `old_logp = proximal_logp`.

    Args:
        logp: current log-probabilities, packed `(M, K)`/`(M,)` or `(rows, token)`.
        proximal_logp: log-probabilities under the proximal policy (recomputed with recent weights,
            or `interpolate_proximal_logp`), shape of `logp`.
        behaviour_logp: log-probabilities recorded at rollout time, shape of `logp`.
        advantages: advantages, shape of `logp` or a leading part of it.
        selection: the `Selection` of a packed batch, or None.
        mask: bool, shape of `logp`, True for valid tokens. Defaults to all True.
        clip_low: $\varepsilon_{low}$ in `[0, 1]`.
        clip_high: $\varepsilon_{high} \ge 0$.
        dual_clip: dual-clip constant $c > 1$, or None.
        behaviour_weight_cap: the upper bound of $w_t$ (`> 0`), or None for none.
        behaviour_weight_floor: the lower bound of $w_t$ (`>= 0`, below the cap), or None.
        cap_mode: `"mask"` or `"clamp"`.
        staleness: per-row or per-token staleness (e.g. `staleness(versions, v)`), for the
            `staleness_mean` diagnostic only; shape of `logp` or a leading part of it.
        log_ratio_clamp: clamp of both log-ratios before `exp`.
        loss_agg_mode: one of `AGGREGATION_MODES`.
        entropy: per-token entropy, or None.
        entropy_coef: entropy bonus coefficient.
        ref_logp: reference-policy log-probabilities, or None.
        kl_coef: KL penalty coefficient.
        kl_type: `"k1"`, `"k2"` or `"k3"`.
        dp_size: the data-parallel world size; see `aggregate_loss`.
        batch_num_tokens: global token count for token-mean (required when `dp_size > 1`).
        global_batch_size: global number of non-empty sequences (seq modes).
        loss_scale_factor: the seq-mean-token-sum-norm divisor.
        validate_args: run the value checks on accelerators too; on the CPU in eager mode they
            always run.

    Returns:
        A `DecoupledPPOLossOutput` of 0-d tensors.

    Raises:
        TypeError: on wrong tensor dtypes or a bad `selection`.
        ValueError: on mismatched shapes, bad clip or cap values (`floor >= cap`), an unknown
            option, or non-finite valid inputs.

    Example:
        >>> import torch
        >>> logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
        >>> prox = torch.tensor([[-1.0, -1.0]])
        >>> behav = torch.tensor([[-1.5, -0.2]])  # weights e^0.5 = 1.65 and e^-0.8 = 0.45
        >>> out = decoupled_ppo_loss(logp, prox, behav, torch.tensor([1.0]))
        >>> round(out.loss.item(), 4), out.capped_frac.item()
        (-1.049, 0.0)
    """
    check_tensor(behaviour_logp, "behaviour_logp", dtypes="float")
    check_tensor(logp, "logp", dtypes="float")
    check_same_shape(behaviour_logp, "behaviour_logp", logp, "logp")
    check_same_device(behaviour_logp, "behaviour_logp", logp, "logp")
    check_tensor(proximal_logp, "proximal_logp", dtypes="float")
    check_same_shape(proximal_logp, "proximal_logp", logp, "logp")
    check_same_device(proximal_logp, "proximal_logp", logp, "logp")
    check_option(cap_mode, "cap_mode", ("mask", "clamp"))
    if behaviour_weight_cap is not None:
        behaviour_weight_cap = check_range(
            behaviour_weight_cap, "behaviour_weight_cap", low=0.0, low_open=True
        )
    if behaviour_weight_floor is not None:
        high = behaviour_weight_cap
        behaviour_weight_floor = check_range(
            behaviour_weight_floor, "behaviour_weight_floor", low=0.0, high=high, high_open=True
        )
    log_ratio_clamp = check_range(log_ratio_clamp, "log_ratio_clamp", low=0.0, low_open=True)
    if staleness is not None:
        check_tensor(staleness, "staleness", dtypes=("float", "int"))
        check_same_device(staleness, "staleness", logp, "logp")
        if not 1 <= staleness.ndim <= logp.ndim or staleness.shape != logp.shape[: staleness.ndim]:
            raise ValueError(
                f"`staleness` must have the shape of `logp` {tuple(logp.shape)} or a leading part "
                f"of it, got {tuple(staleness.shape)}."
            )
    ok = resolve_mask(mask, "mask", logp, "logp")
    if values_checkable(behaviour_logp, validate_args):
        check_finite(behaviour_logp, "behaviour_logp", where=ok)

    dtype = compute_dtype(logp.dtype)
    with torch.no_grad():
        prox = torch.where(ok, proximal_logp.detach().to(dtype), 0.0)
        behav = torch.where(ok, behaviour_logp.detach().to(dtype), 0.0)
        weight = torch.exp(torch.clamp(prox - behav, -log_ratio_clamp, log_ratio_clamp))
        outside = torch.zeros_like(ok)
        if behaviour_weight_cap is not None:
            outside = outside | (weight > behaviour_weight_cap)
        if behaviour_weight_floor is not None:
            outside = outside | (weight < behaviour_weight_floor)
        if cap_mode == "mask":
            weight = torch.where(outside, 0.0, weight)
        else:
            low = 0.0 if behaviour_weight_floor is None else behaviour_weight_floor
            weight = weight.clamp(low, behaviour_weight_cap)
    out = _policy_loss(
        logp,
        proximal_logp,
        advantages,
        selection,
        ok,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
        loss_agg_mode=loss_agg_mode,
        estimator="masked",
        inclusion=None,
        entropy=entropy,
        entropy_coef=entropy_coef,
        ref_logp=ref_logp,
        kl_coef=kl_coef,
        kl_type=kl_type,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
        validate_args=validate_args,
        token_weights=weight,
        old_name="proximal_logp",
    )
    with torch.no_grad():
        count = ok.sum().clamp_min(1).to(dtype)

        def mean(x: Tensor) -> Tensor:
            return torch.where(ok, x.to(dtype), 0.0).sum() / count

        if staleness is None:
            stale = out.loss.new_zeros(())
        else:
            shaped = staleness.reshape(staleness.shape + (1,) * (logp.ndim - staleness.ndim))
            stale = mean(shaped.expand(logp.shape))
        return DecoupledPPOLossOutput(
            *out,
            mean(outside),
            mean(weight),
            stale,
        )


def interpolate_proximal_logp(
    behaviour_logp: Float[Tensor, "*batch"],
    current_logp: Float[Tensor, "*batch"],
    behaviour_version: Int[Tensor, "*lead"] | int,
    proximal_version: int,
    current_version: int,
) -> Float[Tensor, "*batch"]:
    r"""A proximal log-probability interpolated log-linearly between behaviour and current.

    $$
    \log\pi_{prox} = \log\pi_{behav} + \alpha\,(\log\pi_\theta - \log\pi_{behav}), \qquad
    \alpha = \frac{v_{prox} - v_b}{v - v_b} \in [0, 1],
    $$

    clamped to $[0, 1]$ (RLinf's approximation when no forward pass with the proximal weights is
    affordable). A sample with $v_b = v$ gets its current log-probability; one generated after the
    proximal version ($v_{prox} < v_b < v$) gets its behaviour log-probability ($\alpha = 0$, no
    correction). `current_logp` is detached.

    Args:
        behaviour_logp: log-probabilities recorded at rollout time.
        current_logp: log-probabilities under the current weights, same shape.
        behaviour_version: the version each sample was generated with, in `[0, current_version]`
            (checked on the CPU in eager mode): an int, or an integer tensor whose shape is a
            leading part of `behaviour_logp`'s.
        proximal_version: $v_{prox} \le v$.
        current_version: the learner's version $v$.

    Returns:
        The interpolated log-probabilities, the shape and dtype of `behaviour_logp`, detached.

    Raises:
        TypeError: on non-float log-probabilities or non-integer versions.
        ValueError: on mismatched shapes or versions out of order.

    Example:
        >>> import torch
        >>> interpolate_proximal_logp(torch.tensor([-2.0, -2.0]), torch.tensor([-1.0, -1.0]),
        ...                           torch.tensor([2, 4]), proximal_version=3, current_version=4)
        tensor([-1.5000, -1.0000])
    """
    check_tensor(behaviour_logp, "behaviour_logp", dtypes="float")
    check_tensor(current_logp, "current_logp", dtypes="float")
    check_same_shape(current_logp, "current_logp", behaviour_logp, "behaviour_logp")
    check_same_device(current_logp, "current_logp", behaviour_logp, "behaviour_logp")
    current_version = check_positive_int(current_version, "current_version", allow_zero=True)
    proximal_version = check_positive_int(proximal_version, "proximal_version", allow_zero=True)
    if proximal_version > current_version:
        raise ValueError(
            f"`proximal_version` must be <= `current_version` ({current_version}), got "
            f"{proximal_version}."
        )
    if isinstance(behaviour_version, Tensor):
        check_tensor(behaviour_version, "behaviour_version", dtypes="int")
        check_same_device(behaviour_version, "behaviour_version", behaviour_logp, "behaviour_logp")
        if (behaviour_version.ndim > behaviour_logp.ndim
                or behaviour_version.shape != behaviour_logp.shape[: behaviour_version.ndim]):
            raise ValueError(
                f"`behaviour_version` must have a leading part of the shape of `behaviour_logp` "
                f"{tuple(behaviour_logp.shape)}, got {tuple(behaviour_version.shape)}."
            )
        vb = behaviour_version.to(torch.float64)
        vb = vb.reshape(vb.shape + (1,) * (behaviour_logp.ndim - vb.ndim))
        if values_checkable(behaviour_version, False) and behaviour_version.numel():
            if bool((behaviour_version > current_version).any()) or bool(
                (behaviour_version < 0).any()
            ):
                raise ValueError(
                    f"`behaviour_version` must lie in [0, `current_version`={current_version}], "
                    f"got values in [{int(behaviour_version.min())}, "
                    f"{int(behaviour_version.max())}]."
                )
    else:
        vb_int = check_positive_int(behaviour_version, "behaviour_version", allow_zero=True)
        if vb_int > current_version:
            raise ValueError(
                f"`behaviour_version` must be <= `current_version` ({current_version}), got "
                f"{vb_int}."
            )
        vb = torch.tensor(float(vb_int), dtype=torch.float64, device=behaviour_logp.device)
    span = current_version - vb
    alpha = torch.where(span > 0, (proximal_version - vb) / torch.where(span > 0, span, 1.0), 1.0)
    alpha = alpha.clamp(0.0, 1.0)
    behav = behaviour_logp.detach()
    step = current_logp.detach().to(behav.dtype) - behav
    return behav + alpha.to(behav.dtype) * step
