r"""Selector diagnostics: what a chunk selection costs in gradient signal, on the user's own model.

Whether chunk masking is safe depends on the model and the task, not on the method alone: if the
chunks' gradient contributions are nearly independent, keeping $B$ of $T$ chunks multiplies the
gradient's second moment by about $T/B$, and when the full batch gradient is itself mostly noise
that extra noise costs learning directly. These tools measure it, from gradients the caller
computes, with no dependency on any trainer:

- `GradientSketch` maps a model's gradient to a small fixed-size vector (a CountSketch, a random
  linear map $R$ with $\mathbb{E}[R^\top R] = I$), so that many batches' gradients can be kept and
  compared without storing full gradients;
- `selector_statistics` compares, over independent batches, the full-batch gradient $g$ with a
  selector's estimate $\hat g_S$ on the same batch:
  the second-moment inflation $\mathbb{E}\lVert\hat g_S\rVert^2 / \mathbb{E}\lVert g\rVert^2$,
  the signal ratio $\langle \mathbb{E}\hat g_S, \mathbb{E} g\rangle / \lVert\mathbb{E} g\rVert^2$
  (1 for an unbiased estimator), the full gradient's own signal fraction
  $\lVert\mathbb{E} g\rVert^2 / \mathbb{E}\lVert g\rVert^2$, and the predicted per-step efficiency,
  each with a jackknife standard error over batches;
- `phase_shares` splits a selector's signal and second moment by phase;
- `gradient_cosine` is the cheap online probe: the cosine between the masked and the full gradient
  of one batch.

Products of means use unbiased cross-batch estimates,
$\widehat{\langle \mathbb{E}x, \mathbb{E}y\rangle} = \frac{1}{n(n-1)}\sum_{b \ne b'}
\langle x_b, y_{b'}\rangle$, so that batch noise does not inflate the signal.
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_positive_int,
    check_same_shape,
    check_tensor,
)

__all__ = [
    "GradientSketch",
    "PhaseShares",
    "SelectorStatistics",
    "gradient_cosine",
    "phase_shares",
    "selector_statistics",
]

_PRIME = 2_147_483_647  # 2^31 - 1: products of two values below it fit in int64
_BLOCK = 1 << 22


class GradientSketch:
    r"""A CountSketch of a flat gradient: a fixed random linear map $z = R g$.

    It preserves inner products in expectation, $\mathbb{E}_R[\langle Rx, Ry\rangle] =
    \langle x, y\rangle$. Element $i$ of the concatenated gradient goes to bucket $h(i)$ with sign $s(i)$, both from
    seeded multiply-shift hashes modulo $2^{31} - 1$, so the map is fixed by `seed`, needs no
    stored matrix, and costs one pass over the gradient. Inner products are preserved in
    expectation over the seed, with a relative error of order $1/\sqrt{\text{dim}}$ for one seed.
    Models with more than $2^{31}$ gradient elements wrap their index and so share hashes; that
    only adds collisions.

    Args:
        dim: the sketch size $d$.
        seed: the seed of the hash functions.

    Raises:
        TypeError: if `dim` or `seed` is not an int.
        ValueError: if `dim` is not positive or `seed` is negative.

    Example:
        >>> import torch
        >>> sketch = GradientSketch(dim=256, seed=0)
        >>> w = torch.nn.Linear(32, 8)
        >>> w(torch.randn(4, 32)).square().sum().backward()
        >>> z = sketch([p.grad for p in w.parameters()])
        >>> z.shape, z.dtype
        (torch.Size([256]), torch.float64)
    """

    def __init__(self, dim: int = 4096, *, seed: int = 0) -> None:
        self.dim = check_positive_int(dim, "dim")
        self.seed = check_positive_int(seed, "seed", allow_zero=True)
        g = torch.Generator().manual_seed(self.seed)
        a, b, c, e = torch.randint(1, _PRIME, (4,), generator=g, dtype=torch.int64).tolist()
        self._hash = (a, b, c, e)

    def _buckets(self, index: Tensor) -> tuple[Tensor, Tensor]:
        a, b, c, e = self._hash
        index = index % _PRIME
        bucket = ((a * index + b) % _PRIME) % self.dim
        sign = (((c * index + e) % _PRIME) % 2) * 2 - 1
        return bucket, sign

    def __call__(self, grads: Iterable[Tensor | None]) -> Float[Tensor, " dim"]:
        """Sketch the concatenation of `grads` (None entries count as zeros of no size).

        Args:
            grads: the gradients of the parameters, in a fixed order (e.g.
                `[p.grad for p in model.parameters()]`); any float dtype and device.

        Returns:
            `(dim,)` float64 sketch on the device of the first gradient (CPU if none).

        Raises:
            TypeError: if `grads` is not an iterable of gradients, or an entry is neither None
                nor a floating tensor.
            ValueError: if a gradient holds NaN/Inf.
        """
        grads = _gradient_list(grads, "grads")
        device = next((g.device for g in grads if isinstance(g, Tensor)), torch.device("cpu"))
        out = torch.zeros(self.dim, dtype=torch.float64, device=device)
        offset = 0
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            check_tensor(grad, f"grads[{i}]", dtypes="float")
            flat = grad.detach().reshape(-1).to(device=device, dtype=torch.float64)
            check_finite(flat, f"grads[{i}]")
            for start in range(0, flat.numel(), _BLOCK):
                part = flat[start : start + _BLOCK]
                index = torch.arange(
                    offset + start, offset + start + part.numel(), device=device, dtype=torch.int64
                )
                bucket, sign = self._buckets(index)
                out.index_add_(0, bucket, part * sign)
            offset += flat.numel()
        return out

    def __repr__(self) -> str:
        return f"GradientSketch(dim={self.dim}, seed={self.seed})"


def _gradient_list(x: object, name: str) -> list[object]:
    """A list of gradients from `x` (one tensor or an iterable); TypeError naming `name` else."""
    if isinstance(x, Tensor):
        return [x]
    if x is None or isinstance(x, (str, bytes)) or not isinstance(x, Iterable):
        raise TypeError(
            f"`{name}` must be a tensor or a sequence of per-parameter gradients (tensors or "
            f"None), got {type(x).__name__}."
        )
    return list(x)


def gradient_cosine(
    a: Sequence[Tensor | None] | Tensor,
    b: Sequence[Tensor | None] | Tensor,
    *,
    validate_args: bool = False,
) -> Float[Tensor, ""]:
    r"""Cosine between two gradients of the same parameters (the online probe).

    $\cos = \langle a, b\rangle / (\lVert a\rVert \lVert b\rVert)$ over the concatenated
    tensors, in float64; 0 when either is zero. Use it every $K$ steps with the masked gradient
    and one full backward on the same batch. Each side is divided by its largest absolute entry
    before the products (the cosine does not change), so gradients of any finite magnitude,
    1e-200 or 1e200, give the same finite result.

    Args:
        a: a list of per-parameter gradients (None counts as zeros), or one tensor.
        b: the same structure as `a`.
        validate_args: check that every entry is finite (one host sync). Without it a NaN or
            Inf entry makes the result NaN.

    Returns:
        0-d float64 tensor in `[-1, 1]`.

    Raises:
        TypeError: if `a` or `b` is not a tensor or a sequence, or on entries that are not
            floating tensors or None.
        ValueError: if the structures or shapes differ, or (with `validate_args`) an entry
            holds NaN/Inf.

    Example:
        >>> import torch
        >>> gradient_cosine([torch.tensor([1.0, 0.0]), None], [torch.tensor([1.0, 1.0]), None])
        tensor(0.7071, dtype=torch.float64)
    """
    a_list = _gradient_list(a, "a")
    b_list = _gradient_list(b, "b")
    if len(a_list) != len(b_list):
        raise ValueError(
            f"`b` must hold as many gradients as `a` ({len(a_list)}), got {len(b_list)}."
        )
    pairs = []
    for i, (x, y) in enumerate(zip(a_list, b_list, strict=True)):
        if x is None and y is None:
            continue
        if x is None or y is None:
            ref = y if x is None else x
            check_tensor(ref, f"{'b' if x is None else 'a'}[{i}]", dtypes="float")
            x = torch.zeros_like(ref) if x is None else x
            y = torch.zeros_like(ref) if y is None else y
        check_tensor(x, f"a[{i}]", dtypes="float")
        check_tensor(y, f"b[{i}]", dtypes="float")
        check_same_shape(y, f"b[{i}]", x, f"a[{i}]")
        x, y = x.detach(), y.detach().to(x.device)
        if validate_args:
            check_finite(x, f"a[{i}]")
            check_finite(y, f"b[{i}]")
        pairs.append((x, y))
    if not pairs:
        return torch.zeros((), dtype=torch.float64)
    # Largest |entry| of each side (NaN propagates; an empty tensor contributes 0).
    scale_a = torch.stack([_abs_max(x) for x, _ in pairs]).amax()
    scale_b = torch.stack([_abs_max(y) for _, y in pairs]).amax()
    scale_a = torch.where(scale_a > 0, scale_a, 1.0)
    scale_b = torch.where(scale_b > 0, scale_b, 1.0)
    dot = aa = bb = None
    for x, y in pairs:
        x64 = x.double().reshape(-1) / scale_a
        y64 = y.double().reshape(-1) / scale_b
        parts = (x64 @ y64, x64 @ x64, y64 @ y64)
        dot, aa, bb = parts if dot is None else (dot + parts[0], aa + parts[1], bb + parts[2])
    den = torch.sqrt(aa * bb)
    return torch.where(den == 0, 0.0, dot / torch.where(den == 0, 1.0, den)).clamp(-1.0, 1.0)


def _abs_max(x: Tensor) -> Tensor:
    """Largest absolute entry of `x` as a 0-d float64 tensor (0 for an empty tensor)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    return x.abs().amax().double()


class SelectorStatistics(NamedTuple):
    r"""Result of `selector_statistics`: 0-d float64 tensors and the batch count.

    Attributes:
        second_moment_ratio: $\mathbb{E}\lVert\hat g_S\rVert^2 / \mathbb{E}\lVert g\rVert^2$, the
            second-moment inflation of the selector (1 for the full gradient; about $T/B$ for
            independent chunk gradients).
        second_moment_ratio_se: its jackknife standard error.
        signal_ratio: $\langle \mathbb{E}\hat g_S, \mathbb{E} g\rangle / \lVert\mathbb{E}
            g\rVert^2$ (1 for an unbiased selector; below 1 for one that shrinks the signal).
        signal_ratio_se: its jackknife standard error.
        full_signal_fraction: $\lVert\mathbb{E} g\rVert^2 / \mathbb{E}\lVert g\rVert^2$ of the full
            gradient, in `[0, 1]` in expectation: how much of a batch gradient is signal.
        full_signal_fraction_se: its jackknife standard error.
        efficiency: predicted per-step progress relative to the full gradient,
            $\max(\text{signal\_ratio}, 0)^2 / \text{second\_moment\_ratio}$ (SGD with the
            best positive step size on a locally quadratic loss: a selector whose mean gradient
            points against the full gradient's makes no progress, not a positive one).
        efficiency_se: its jackknife standard error.
        num_batches: the number of independent batches.
    """

    second_moment_ratio: Tensor
    second_moment_ratio_se: Tensor
    signal_ratio: Tensor
    signal_ratio_se: Tensor
    full_signal_fraction: Tensor
    full_signal_fraction_se: Tensor
    efficiency: Tensor
    efficiency_se: Tensor
    num_batches: int


def _check_batches(x: Tensor, name: str, ndim: int) -> None:
    check_tensor(x, name, ndim=ndim, dtypes="float")
    if x.shape[0] < 3:
        raise ValueError(
            f"`{name}` must hold at least 3 independent batches (for unbiased cross-batch products "
            f"and a jackknife), got {x.shape[0]} (shape {tuple(x.shape)})."
        )
    check_finite(x, name)


def _leave_one_out_cross(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased <E x, E y> from all batches, and with each batch left out."""
    n = x.shape[0]
    sx, sy = x.sum(0), y.sum(0)
    diag = (x * y).sum(-1)  # <x_b, y_b>
    full = (sx @ sy - diag.sum()) / (n * (n - 1))
    # Leaving batch b out: sums without b, diagonal without b.
    loo = ((sx - x) * (sy - y)).sum(-1) - (diag.sum() - diag)
    return full, loo / ((n - 1) * (n - 2))


def _jackknife_se(leave_one_out: Tensor) -> Tensor:
    n = leave_one_out.shape[0]
    centred = leave_one_out - leave_one_out.mean()
    return torch.sqrt((n - 1) / n * centred.square().sum())


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), torch.nan)


def _share(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, defined as 0 where ``den`` is exactly 0 (nothing to split)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def selector_statistics(
    full: Float[Tensor, "batch dim"], selected: Float[Tensor, "batch dim"]
) -> SelectorStatistics:
    r"""How a selector's gradient estimate compares with the full gradient, over batches.

    Row $b$ of `full` is the (sketched) full-batch gradient $g_b$ of batch $b$, row $b$ of
    `selected` the selector's estimate $\hat g_{S,b}$ on the same batch (one fresh selection per
    batch, so the expectation covers the selection too). The batches must be independent draws
    (different rollouts), the statistics being expectations over them:

    $$
    \text{inflation} = \frac{\frac1n\sum_b \lVert\hat g_{S,b}\rVert^2}
        {\frac1n\sum_b \lVert g_b\rVert^2}, \qquad
    \text{signal ratio} = \frac{\sum_{b\ne b'} \langle \hat g_{S,b}, g_{b'}\rangle}
        {\sum_{b \ne b'} \langle g_b, g_{b'}\rangle}.
    $$

    Standard errors are leave-one-batch-out jackknife estimates. With a signal fraction near 0
    the signal ratio is a ratio of two small, noisy numbers: read its SE before its value.

    Args:
        full: `(n, dim)` full-batch gradients (or their `GradientSketch`), `n >= 3`.
        selected: `(n, dim)` the selector's gradients on the same batches.

    Returns:
        A `SelectorStatistics`; a ratio with a zero denominator is NaN (say, an all-zero
        gradient), as is its SE.

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: if an input is not 2-D, the shapes differ, there are fewer than 3 batches, or
            an input holds NaN/Inf.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> full = torch.randn(50, 8, generator=g, dtype=torch.float64) + 1.0
        >>> stats = selector_statistics(full, full)  # the full gradient against itself
        >>> round(stats.second_moment_ratio.item(), 6), round(stats.signal_ratio.item(), 6)
        (1.0, 1.0)
    """
    _check_batches(full, "full", 2)
    _check_batches(selected, "selected", 2)
    check_same_shape(selected, "selected", full, "full")
    f, s = full.double(), selected.to(device=full.device, dtype=torch.float64)
    n = f.shape[0]
    f_sq, s_sq = f.square().sum(-1), s.square().sum(-1)
    m_f, m_s = f_sq.mean(), s_sq.mean()
    m_f_loo, m_s_loo = (f_sq.sum() - f_sq) / (n - 1), (s_sq.sum() - s_sq) / (n - 1)
    ff, ff_loo = _leave_one_out_cross(f, f)
    sf, sf_loo = _leave_one_out_cross(s, f)

    inflation, inflation_loo = _ratio(m_s, m_f), _ratio(m_s_loo, m_f_loo)
    signal, signal_loo = _ratio(sf, ff), _ratio(sf_loo, ff_loo)
    fraction, fraction_loo = _ratio(ff, m_f), _ratio(ff_loo, m_f_loo)
    eff = signal.clamp(min=0).square() / inflation
    eff_loo = signal_loo.clamp(min=0).square() / inflation_loo
    return SelectorStatistics(
        inflation,
        _jackknife_se(inflation_loo),
        signal,
        _jackknife_se(signal_loo),
        fraction,
        _jackknife_se(fraction_loo),
        eff,
        _jackknife_se(eff_loo),
        n,
    )


class PhaseShares(NamedTuple):
    r"""Result of `phase_shares`: `(phase,)` float64 tensors, each summing to 1 over phases.

    A share whose denominator is exactly 0 is 0 (see `phase_shares`): with all-zero `parts`
    every field is 0 and the shares sum to 0, not 1.

    Attributes:
        signal: $\langle \mathbb{E}\hat g_{S,p}, \mathbb{E} g\rangle /
            \langle \mathbb{E}\hat g_S, \mathbb{E} g\rangle$, phase $p$'s share of the selector's
            signal (can be negative: a phase that pushes against the full gradient).
        signal_se: jackknife standard errors of `signal`.
        second_moment: $\mathbb{E}\langle \hat g_{S,p}, \hat g_S\rangle /
            \mathbb{E}\lVert\hat g_S\rVert^2$, phase $p$'s share of the second moment.
        second_moment_se: jackknife standard errors of `second_moment`.
    """

    signal: Tensor
    signal_se: Tensor
    second_moment: Tensor
    second_moment_se: Tensor


def phase_shares(
    full: Float[Tensor, "batch dim"], parts: Float[Tensor, "batch phase dim"]
) -> PhaseShares:
    r"""Split a selector's signal and second moment by phase.

    `parts[b, p]` is the gradient of the selector's loss on batch $b$ restricted to the selected
    chunks of phase $p$ (same normalisers as the whole loss), so that
    $\hat g_{S,b} = \sum_p$ `parts[b, p]`. Shares use the unbiased cross-batch products of
    `selector_statistics` and leave-one-batch-out jackknife SEs.

    Args:
        full: `(n, dim)` full-batch gradients, `n >= 3`.
        parts: `(n, phase, dim)` per-phase parts of the selector's gradients.

    Returns:
        A `PhaseShares` of `(phase,)` tensors. A share whose denominator is exactly 0 is defined
        as 0, and so is its contribution to the jackknife: in particular a selector whose parts
        are all zero (it selected nothing, or its gradient vanished) has no signal or second
        moment to split, and every field is 0 (the shares then sum to 0, not 1).

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: on wrong ranks or sizes, fewer than 3 batches, or NaN/Inf.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(1)
        >>> parts = torch.randn(200, 2, 6, generator=g, dtype=torch.float64)
        >>> parts[:, 0] += 1.0  # phase 0 carries the signal, phase 1 only noise
        >>> shares = phase_shares(parts.sum(1), parts)
        >>> [round(x, 1) for x in shares.signal.tolist()], round(shares.signal.sum().item(), 6)
        ([1.0, 0.0], 1.0)
    """
    _check_batches(full, "full", 2)
    _check_batches(parts, "parts", 3)
    if parts.shape[0] != full.shape[0] or parts.shape[2] != full.shape[1]:
        raise ValueError(
            f"`parts` must have shape ({full.shape[0]}, phase, {full.shape[1]}) to match `full` "
            f"{tuple(full.shape)}, got {tuple(parts.shape)}."
        )
    f, p = full.double(), parts.to(device=full.device, dtype=torch.float64)
    n, phases = p.shape[0], p.shape[1]
    s = p.sum(1)
    sf, sf_loo = _leave_one_out_cross(s, f)
    per = [_leave_one_out_cross(p[:, k], f) for k in range(phases)]
    part_f = torch.stack([x for x, _ in per])
    part_f_loo = torch.stack([x for _, x in per])  # (phase, n)
    cross = (p * s[:, None]).sum(-1)  # (n, phase): <g_{S,p}, g_S> per batch
    s_sq = s.square().sum(-1)
    m = s_sq.mean()
    m_loo = (s_sq.sum() - s_sq) / (n - 1)
    cross_mean = cross.mean(0)
    cross_loo = (cross.sum(0) - cross) / (n - 1)  # (n, phase)
    signal = _share(part_f, sf)
    signal_loo = _share(part_f_loo, sf_loo[None])
    moment = _share(cross_mean, m)
    moment_loo = _share(cross_loo, m_loo[:, None])
    return PhaseShares(
        signal,
        torch.stack([_jackknife_se(signal_loo[k]) for k in range(phases)]),
        moment,
        torch.stack([_jackknife_se(moment_loo[:, k]) for k in range(phases)]),
    )
