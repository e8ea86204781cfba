r"""Online rules for the weight $\lambda_k$ between the PPO and self-BC losses.

$$
\mathcal{L}(\theta) = \mathcal{L}_{PPO}(\theta) + \lambda_k\, \mathcal{L}_{BC}(\theta)
$$

(the action-chunked PPO paper, 2026, adapts $\lambda_k$ online; its rule is not public, so the
rules here are choices): `ConstantBCWeight`, `SuccessRateBCWeight` (driven by the recent success
rate), `LossBalanceBCWeight` (balances the magnitudes of the two losses or of their gradients),
and `ProductBCWeight`, which composes them. Each is a small stateful object with `value`,
`update(**stats)` and `state_dict`.
"""

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from chunkmask._checks import check_option, check_positive_int, check_range, check_real

__all__ = [
    "BCWeight",
    "ConstantBCWeight",
    "LossBalanceBCWeight",
    "ProductBCWeight",
    "SuccessRateBCWeight",
]


def _scalar(value: Any, name: str) -> float:
    """A finite real number, or a one-element floating tensor read as one (one sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"`{name}` must be a scalar, got shape {tuple(value.shape)}.")
        value = value.detach().reshape(()).item()
    return check_real(value, name)


class BCWeight:
    r"""Base class of the stateful PPO/BC weight rules.

    A rule holds the current weight $\lambda_k$ (`value`) and updates it from training
    statistics once per iteration with `update(**stats)`, where `stats` may hold
    `success_rate` (recent rollout success rate in [0, 1]), `ppo_scale` and `bc_scale`
    (non-negative magnitudes of the two losses or of their gradients). A rule ignores statistics
    it does not use and raises `ValueError` when one it needs is missing. Rules are plain Python
    objects with `state_dict()` / `load_state_dict()`; `update` reads tensors on the host, so call
    it once per iteration, not inside a compiled step.
    """

    _state_keys: tuple[str, ...] = ()
    _state_ranges: dict[str, tuple[float, float | None]] = {}

    @property
    def value(self) -> float:
        r"""The current weight $\lambda_k$."""
        raise NotImplementedError

    def update(self, **stats: Any) -> float:
        """Fold in one iteration's statistics and return the new weight."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The rule's state."""
        return {k: getattr(self, k) for k in self._state_keys}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by `state_dict`.

        Raises:
            TypeError: if `state` is not a dict.
            ValueError: if a key is missing or a value is out of range or not finite (`steps` must
                be an int >= 0).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        missing = set(self._state_keys) - set(state)
        if missing:
            raise ValueError(f"`state` is missing keys {sorted(missing)}.")
        values = {}
        for k in self._state_keys:
            name = f"state[{k!r}]"
            if k == "steps":
                values[k] = check_positive_int(state[k], name, allow_zero=True)
            else:
                low, high = self._state_ranges.get(k, (0.0, None))
                values[k] = check_range(state[k], name, low=low, high=high)
        for k, v in values.items():
            setattr(self, k, v)

    @staticmethod
    def _need(stats: Mapping[str, Any], name: str, rule: str) -> float:
        if stats.get(name) is None:
            raise ValueError(f"`{name}` must be given to {rule}.update, got None.")
        return _scalar(stats[name], name)


class ConstantBCWeight(BCWeight):
    r"""A fixed weight $\lambda_k = \lambda$.

    Example:
        >>> ConstantBCWeight(0.1).update(success_rate=0.5)
        0.1
    """

    def __init__(self, weight: float = 0.1) -> None:
        self.weight = check_range(weight, "weight", low=0.0)

    @property
    def value(self) -> float:
        """The fixed weight."""
        return self.weight

    def update(self, **stats: Any) -> float:
        """Return the fixed weight."""
        return self.weight

    def __repr__(self) -> str:
        return f"ConstantBCWeight({self.weight})"


class SuccessRateBCWeight(BCWeight):
    r"""A weight driven by the recent rollout success rate.

    $$
    \bar s_k = \beta \bar s_{k-1} + (1 - \beta) s_k, \qquad
    \lambda_k = \lambda_{lo} + (\lambda_{hi} - \lambda_{lo})\, f(\bar s_k),
    $$

    with $f(s) = (1 - s)^p$ for `direction="decreasing"` (the default: lean on cloning the
    buffered successes while the policy fails often, hand over to PPO as it succeeds) and
    $f(s) = s^p$ for `direction="increasing"` (trust the buffer more as it fills with good
    trials). The first `update` replaces the initial average `initial` unless `warm_start` is
    False. $\lambda_k$ always lies in $[\lambda_{lo}, \lambda_{hi}]$ and is monotone in
    $\bar s_k$.

    Args:
        low: $\lambda_{lo} \ge 0$.
        high: $\lambda_{hi} \ge \lambda_{lo}$.
        momentum: $\beta \in [0, 1)$, the averaging of success rates across iterations.
        power: $p > 0$.
        direction: `"decreasing"` or `"increasing"` in the success rate.
        initial: initial $\bar s_0 \in [0, 1]$.
        warm_start: the first update sets $\bar s$ to the observed rate.

    Example:
        >>> rule = SuccessRateBCWeight(low=0.0, high=1.0, momentum=0.5)
        >>> rule.update(success_rate=0.2), rule.update(success_rate=0.6)
        (0.8, 0.6)
    """

    _state_keys = ("average", "steps")
    _state_ranges = {"average": (0.0, 1.0)}

    def __init__(
        self,
        low: float = 0.01,
        high: float = 0.5,
        *,
        momentum: float = 0.8,
        power: float = 1.0,
        direction: Literal["decreasing", "increasing"] = "decreasing",
        initial: float = 0.0,
        warm_start: bool = True,
    ) -> None:
        self.low = check_range(low, "low", low=0.0)
        self.high = check_range(high, "high", low=self.low)
        self.momentum = check_range(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        self.power = check_range(power, "power", low=0.0, low_open=True)
        self.direction = check_option(direction, "direction", ("decreasing", "increasing"))
        self.average = check_range(initial, "initial", low=0.0, high=1.0)
        self.warm_start = bool(warm_start)
        self.steps = 0

    @property
    def value(self) -> float:
        """The current weight."""
        s = self.average if self.direction == "increasing" else 1.0 - self.average
        return self.low + (self.high - self.low) * s**self.power

    def update(self, **stats: Any) -> float:
        """Fold in `success_rate` and return the new weight.

        Raises:
            ValueError: if `success_rate` is missing or outside [0, 1].
        """
        rate = self._need(stats, "success_rate", type(self).__name__)
        rate = check_range(rate, "success_rate", low=0.0, high=1.0)
        if self.steps == 0 and self.warm_start:
            self.average = rate
        else:
            self.average = self.momentum * self.average + (1.0 - self.momentum) * rate
        self.steps += 1
        return self.value

    def __repr__(self) -> str:
        return (
            f"SuccessRateBCWeight(low={self.low}, high={self.high}, momentum={self.momentum}, "
            f"power={self.power}, direction={self.direction!r})"
        )


class LossBalanceBCWeight(BCWeight):
    r"""A weight that keeps the BC term at a fixed ratio of the PPO term's magnitude.

    $$
    \bar m^{PPO}_k = \beta \bar m^{PPO}_{k-1} + (1-\beta)\, m^{PPO}_k, \quad
    \bar m^{BC}_k = \beta \bar m^{BC}_{k-1} + (1-\beta)\, m^{BC}_k, \quad
    \lambda_k = \mathrm{clip}\Big(\rho\, \frac{\bar m^{PPO}_k}{\max(\bar m^{BC}_k, \epsilon)},
        \lambda_{lo}, \lambda_{hi}\Big)
    $$

    so that $\lambda_k \bar m^{BC}_k \approx \rho\, \bar m^{PPO}_k$: the BC term contributes a
    fixed share $\rho$ of the PPO term whatever their natural scales. The magnitudes $m$ are
    whatever the caller passes as `ppo_scale` and `bc_scale`: absolute loss values, or (better,
    since the PPO surrogate with whitened advantages hovers around 0) the norms of the two
    losses' gradients with respect to the shared parameters, in the spirit of GradNorm (Chen et
    al. 2018, https://arxiv.org/abs/1711.02257). The averages start from the first observation.

    Args:
        ratio: target share $\rho > 0$.
        momentum: $\beta \in [0, 1)$.
        low: $\lambda_{lo} \ge 0$.
        high: $\lambda_{hi} \ge \lambda_{lo}$.
        initial: weight before the first update, clipped into $[\lambda_{lo}, \lambda_{hi}]$.
        eps: $\epsilon > 0$ guarding the division.

    Example:
        >>> rule = LossBalanceBCWeight(ratio=0.5, momentum=0.0)
        >>> rule.update(ppo_scale=2.0, bc_scale=4.0)
        0.25
    """

    _state_keys = ("ppo_average", "bc_average", "steps")

    def __init__(
        self,
        ratio: float = 0.5,
        *,
        momentum: float = 0.9,
        low: float = 0.0,
        high: float = 10.0,
        initial: float = 0.1,
        eps: float = 1e-8,
    ) -> None:
        self.ratio = check_range(ratio, "ratio", low=0.0, low_open=True)
        self.momentum = check_range(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        self.low = check_range(low, "low", low=0.0)
        self.high = check_range(high, "high", low=self.low)
        self.initial = min(max(check_range(initial, "initial", low=0.0), self.low), self.high)
        self.eps = check_range(eps, "eps", low=0.0, low_open=True)
        self.ppo_average = 0.0
        self.bc_average = 0.0
        self.steps = 0

    @property
    def value(self) -> float:
        """The current weight."""
        if self.steps == 0:
            return self.initial
        raw = self.ratio * self.ppo_average / max(self.bc_average, self.eps)
        return min(max(raw, self.low), self.high)

    def update(self, **stats: Any) -> float:
        """Fold in `ppo_scale` and `bc_scale` and return the new weight.

        Raises:
            ValueError: if either scale is missing or negative.
        """
        name = type(self).__name__
        ppo = check_range(self._need(stats, "ppo_scale", name), "ppo_scale", low=0.0)
        bc = check_range(self._need(stats, "bc_scale", name), "bc_scale", low=0.0)
        if self.steps == 0:
            self.ppo_average, self.bc_average = ppo, bc
        else:
            m = self.momentum
            self.ppo_average = m * self.ppo_average + (1 - m) * ppo
            self.bc_average = m * self.bc_average + (1 - m) * bc
        self.steps += 1
        return self.value

    def __repr__(self) -> str:
        return (
            f"LossBalanceBCWeight(ratio={self.ratio}, momentum={self.momentum}, low={self.low}, "
            f"high={self.high})"
        )


class ProductBCWeight(BCWeight):
    """Compose rules by multiplying their weights; `update` forwards the statistics to each.

    For example, `ProductBCWeight(LossBalanceBCWeight(0.5), SuccessRateBCWeight(0.0, 1.0))`
    balances magnitudes and fades the BC term out as the success rate rises.

    Example:
        >>> rule = ProductBCWeight(ConstantBCWeight(0.5), SuccessRateBCWeight(0.0, 1.0))
        >>> rule.update(success_rate=0.2)
        0.4
    """

    def __init__(self, *rules: BCWeight) -> None:
        if not rules:
            raise ValueError("`rules` must hold at least one rule, got none.")
        for i, r in enumerate(rules):
            if not isinstance(r, BCWeight):
                raise TypeError(f"`rules[{i}]` must be a BCWeight, got {type(r).__name__}.")
        self.rules = tuple(rules)

    @property
    def value(self) -> float:
        """The product of the rules' weights."""
        out = 1.0
        for r in self.rules:
            out *= r.value
        return out

    def update(self, **stats: Any) -> float:
        """Update every rule with `stats`; return the product."""
        for r in self.rules:
            r.update(**stats)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The rules' states, in order."""
        return {"rules": [r.state_dict() for r in self.rules]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state produced by `state_dict`.

        Raises:
            ValueError: if the number of rule states differs.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        if "rules" not in state:
            raise ValueError(f"`state` is missing keys ['rules'], got keys {sorted(state)}.")
        if len(state["rules"]) != len(self.rules):
            raise ValueError(
                f"`state['rules']` must hold {len(self.rules)} states, got {len(state['rules'])}."
            )
        for r, s in zip(self.rules, state["rules"], strict=True):
            r.load_state_dict(s)

    def __repr__(self) -> str:
        return f"ProductBCWeight{self.rules!r}"
