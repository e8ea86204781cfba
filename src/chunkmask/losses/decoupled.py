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

from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from chunkmask._checks import (
    check_positive_int,
    check_same_device,
    check_same_shape,
    check_tensor,
    values_checkable,
)
from chunkmask.aggregation import AggregationMode, LossNormalizers
from chunkmask.batch._selection import Selection
from chunkmask.losses.options import Behaviour, Clip, Regularizers
from chunkmask.losses.policy import PolicyLossOutput, _policy_loss

__all__ = ["decoupled_ppo_loss", "interpolate_proximal_logp"]

Values = Float[Tensor, " packed"] | Float[Tensor, "packed token"]


def decoupled_ppo_loss(
    logp: Values,
    *,
    proximal_logp: Values,
    behaviour: Behaviour,
    advantages: Values,
    selection: Selection | None = None,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "packed token"] | None = None,
    clip: Clip = Clip(),
    loss_agg_mode: AggregationMode = "token-mean",
    estimator: Literal["masked", "horvitz_thompson"] = "masked",
    regularizers: Regularizers | None = None,
    norms: LossNormalizers | None = None,
    validate_args: bool = False,
) -> PolicyLossOutput:
    r"""The decoupled PPO loss: clip against $\pi_{prox}$, correct from $\pi_{behav}$.

    $$
    L_t = w_t\, \ell^{clip}_t(\rho_t), \qquad
    \rho_t = e^{\log\pi_\theta - \log\pi_{prox}}, \qquad
    w_t = e^{\log\pi_{prox} - \log\pi_{behav}} \;\text{(detached)},
    $$

    with $\ell^{clip}$ the clipped surrogate of `clipped_surrogate` (clip-higher and optional dual
    clip). It is `masked_grpo_loss` with $\pi_{prox}$ as the anchor and the bounded behaviour
    weight on every token, so it takes the same layouts (a packed batch with its `Selection`, or
    `(rows, token)` rows), the same estimators (Horvitz-Thompson reads
    `selection.packed_inclusion()`), the same regularizers and the same data-parallel
    normalisers. See AReaL (arXiv 2505.24298, Eq. 5) and RLinf's decoupled actor loss.

    The behaviour weight is bounded by `behaviour` (`Behaviour.cap`, `.floor`, `.mode`):

    - `mode="mask"`: a token with $w_t$ above the cap (or below the floor) gets weight 0, so it
      passes no gradient; it still counts in the normalisers, as in AReaL, so masking does not
      rescale the other tokens;
    - `mode="clamp"`: $w_t$ is clamped into the bounds.

    With `behaviour.logp == proximal_logp` (no staleness) $w_t = 1$ and the loss is exactly
    `masked_grpo_loss` with `old_logp = proximal_logp` in the same mode.

    Args:
        logp: current log-probabilities, packed `(M, K)`/`(M,)` or `(rows, token)`.
        proximal_logp: log-probabilities under the proximal policy (recomputed with recent weights,
            or `interpolate_proximal_logp`), shape of `logp` (keyword-only).
        behaviour: the behaviour log-probabilities recorded at rollout time and the bounds on
            the weight (`Behaviour`).
        advantages: advantages, shape of `logp` or a leading part of it.
        selection: the `Selection` of a packed batch, or None.
        mask: bool, shape of `logp`, True for valid tokens. Defaults to all True.
        clip: the ratio clipping (`Clip`); its log-ratio clamp also bounds $\log w_t$.
        loss_agg_mode: one of `AGGREGATION_MODES`.
        estimator: `"masked"` or `"horvitz_thompson"` (needs a `selection` with inclusion).
        regularizers: the entropy bonus and KL penalty (`Regularizers`), or None.
        norms: the data-parallel normalisers (`LossNormalizers`), or None.
        validate_args: run the value checks (finite valid inputs, packed rows, inclusion).

    Returns:
        A `PolicyLossOutput` of 0-d tensors; `capped_frac` and `behaviour_weight_mean` report the
        behaviour weight.

    Raises:
        TypeError: on wrong tensor dtypes, a bad `selection` or an option group of the wrong type.
        ValueError: on mismatched shapes, bad clip or bound values (`floor >= cap`), an unknown
            option, or (with `validate_args`) non-finite valid inputs.

    Example:
        >>> import torch
        >>> logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
        >>> prox = torch.tensor([[-1.0, -1.0]])
        >>> behav = torch.tensor([[-1.5, -0.2]])  # weights e^0.5 = 1.65 and e^-0.8 = 0.45
        >>> out = decoupled_ppo_loss(logp, proximal_logp=prox, behaviour=Behaviour(behav),
        ...                          advantages=torch.tensor([1.0]))
        >>> round(out.loss.item(), 4), out.capped_frac.item()
        (-1.049, 0.0)
    """
    options = (clip, loss_agg_mode, estimator, regularizers or Regularizers(), norms)
    return _policy_loss(
        logp,
        (proximal_logp, "proximal_logp"),
        advantages,
        selection,
        mask,
        options,
        validate_args,
        behaviour=behaviour,
    )


def interpolate_proximal_logp(
    behaviour_logp: Float[Tensor, "*batch"],
    current_logp: Float[Tensor, "*batch"],
    behaviour_version: Int[Tensor, "*lead"] | int,
    proximal_version: int,
    current_version: int,
    *,
    validate_args: bool = False,
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
            (a tensor's values are checked with `validate_args`): an int, or an integer tensor
            whose shape is a leading part of `behaviour_logp`'s.
        proximal_version: $v_{prox} \le v$.
        current_version: the learner's version $v$.
        validate_args: check a tensor `behaviour_version`'s values (one host sync).

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
        if values_checkable(behaviour_version, validate_args) and behaviour_version.numel():
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
