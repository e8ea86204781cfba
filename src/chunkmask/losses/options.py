r"""The option groups every clipped policy loss shares: `Clip`, `Regularizers`, `Behaviour`.

Each is a small immutable NamedTuple, so one value configures every loss that takes it, and a
loss signature carries one keyword per concept instead of four repeated options.
"""

from typing import Any, Literal, NamedTuple

from torch import Tensor

from chunkmask._checks import check_option, check_range, check_real, check_tensor

__all__ = ["KL_TYPES", "Behaviour", "Clip", "Regularizers"]

KL_TYPES: tuple[str, ...] = ("k1", "k2", "k3")
"""Schulman's KL estimators accepted by the policy losses (`k3` is verl's `low_var_kl`)."""


class Clip(NamedTuple):
    r"""The clipping of the importance ratio in the surrogate of Eq. (2).

    Attributes:
        low: $\varepsilon_{low}$ in `[0, 1]`: the ratio is clipped at $1 - \varepsilon_{low}$.
        high: $\varepsilon_{high} \ge 0$ (DAPO's clip-higher; 0.28 as in RLinf, SimpleVLA-RL).
        dual: the dual-clip constant $c > 1$ (Ye et al. 2020; verl's `clip_ratio_c`), or None.
        log_ratio_clamp: $\kappa > 0$, the clamp on the log ratio before `exp` (verl: 20).

    Example:
        >>> Clip(high=0.4).high, Clip().low
        (0.4, 0.2)
    """

    low: float = 0.2
    high: float = 0.28
    dual: float | None = None
    log_ratio_clamp: float = 20.0

    def checked(self, name: str = "clip") -> "Clip":
        """Return the spec with every field range-checked (free: Python numbers only).

        Raises:
            ValueError: if a field lies outside its range.
        """
        low = check_range(self.low, f"{name}.low", low=0.0, high=1.0)
        high = check_range(self.high, f"{name}.high", low=0.0)
        dual = None
        if self.dual is not None:
            dual = check_range(self.dual, f"{name}.dual", low=1.0, low_open=True)
        clamp = check_range(self.log_ratio_clamp, f"{name}.log_ratio_clamp", low=0.0, low_open=True)
        return Clip(low, high, dual, clamp)


class Regularizers(NamedTuple):
    r"""The entropy bonus and the KL penalty to a reference policy.

    The total loss is `policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss`, both terms
    aggregated like the policy loss. KL estimators (Schulman 2020), with
    $\delta = \log\pi_{ref} - \log\pi_\theta$: k1 $= -\delta$, k2 $= \delta^2/2$, k3
    $= e^{\delta} - \delta - 1$ with $\delta$ clamped to $\pm 20$ and the result to $\pm 10$
    (verl's `low_var_kl`).

    Attributes:
        entropy: per-token policy entropy, the shape of the loss's `logp`, or None.
        entropy_coef: the entropy bonus coefficient (needs `entropy` when non-zero).
        ref_logp: reference-policy log-probabilities, the shape of `logp`, or None.
        kl_coef: the KL penalty coefficient (needs `ref_logp` when non-zero).
        kl_type: `"k1"`, `"k2"` or `"k3"`.
    """

    entropy: Tensor | None = None
    entropy_coef: float = 0.0
    ref_logp: Tensor | None = None
    kl_coef: float = 0.0
    kl_type: Literal["k1", "k2", "k3"] = "k3"

    def checked(self, name: str = "regularizers") -> "Regularizers":
        """Return the spec with its Python fields checked and its tensors type-checked.

        Raises:
            TypeError: if a tensor field is not a floating tensor or a coefficient not a number.
            ValueError: on an unknown `kl_type` or a non-zero coefficient without its tensor.
        """
        entropy_coef = check_real(self.entropy_coef, f"{name}.entropy_coef")
        kl_coef = check_real(self.kl_coef, f"{name}.kl_coef")
        check_option(self.kl_type, f"{name}.kl_type", KL_TYPES)
        for value, field in ((self.entropy, "entropy"), (self.ref_logp, "ref_logp")):
            if value is not None:
                check_tensor(value, f"{name}.{field}", dtypes="float")
        if entropy_coef != 0.0 and self.entropy is None:
            raise ValueError(
                f"`{name}.entropy` is required when `{name}.entropy_coef` is non-zero, got "
                f"{entropy_coef}."
            )
        if kl_coef != 0.0 and self.ref_logp is None:
            raise ValueError(
                f"`{name}.ref_logp` is required when `{name}.kl_coef` is non-zero, got {kl_coef}."
            )
        return Regularizers(self.entropy, entropy_coef, self.ref_logp, kl_coef, self.kl_type)


class Behaviour(NamedTuple):
    r"""The behaviour policy of the decoupled loss: its log-probabilities and its weight's bounds.

    The behaviour weight $w_t = \pi_{prox}(a_t)/\pi_{behav}(a_t)$ (detached) corrects stale
    samples from the policy that generated them to the proximal anchor; AReaL caps it at 2 to 5,
    RLinf at 2.

    Attributes:
        logp: log-probabilities recorded at rollout time, the shape of the loss's `logp`.
        cap: the upper bound of $w_t$ (`> 0`), or None for none.
        floor: the lower bound (`>= 0`, below `cap`), or None.
        mode: `"mask"` gives a token outside the bounds weight 0 (it still counts in the
            normalisers, as in AReaL); `"clamp"` clamps $w_t$ into them.
    """

    logp: Tensor
    cap: float | None = 2.0
    floor: float | None = None
    mode: Literal["mask", "clamp"] = "mask"

    def checked(self, name: str = "behaviour") -> "Behaviour":
        """Return the spec with every field checked.

        Raises:
            TypeError: if `logp` is not a floating tensor.
            ValueError: on a non-positive cap, a floor outside `[0, cap)` or an unknown mode.
        """
        check_tensor(self.logp, f"{name}.logp", dtypes="float")
        check_option(self.mode, f"{name}.mode", ("mask", "clamp"))
        cap = None if self.cap is None else check_range(
            self.cap, f"{name}.cap", low=0.0, low_open=True
        )
        floor = None
        if self.floor is not None:
            floor = check_range(self.floor, f"{name}.floor", low=0.0, high=cap, high_open=True)
        return Behaviour(self.logp, cap, floor, self.mode)


def check_spec(value: Any, name: str, cls: type) -> Any:
    """Check that `value` is an instance of the option group `cls` and return it checked."""
    if not isinstance(value, cls):
        raise TypeError(
            f"`{name}` must be a chunkmask.{cls.__name__}, got {type(value).__name__} {value!r}."
        )
    return value.checked(name)
