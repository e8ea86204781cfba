r"""Exact first-order inclusion probabilities of Plackett-Luce sampling.

The Horvitz-Thompson estimator of the masked loss weights each selected chunk by $1/\pi$, with
$\pi$ the probability that `plackett_luce_sample` draws it. Successive sampling is a race of
exponential clocks, so $\pi$ is a one-dimensional integral of Poisson-binomial probabilities,
computed here by Gauss-Legendre quadrature (Eq. 10 of Anonymous et al. (2026), Probabilistic
Chunk Masking, arXiv 2605.16154, gives the sampling rule).
"""

import numpy as np
import torch
from jaxtyping import Bool, Float64, Integer, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite_nonnegative,
    check_positive_int,
    check_same_device,
    check_shape,
    check_tensor,
    resolve_valid,
)

__all__ = ["inclusion_probabilities"]


def _poisson_binomial_prefix(q: Tensor, k: int) -> Tensor:
    """Prefix distributions of a Poisson-binomial count, truncated at `k` outcomes.

    `q`: `(..., n)` success probabilities. Returns `(..., n + 1, k)` where `[..., j, r]` is the
    probability that exactly `r` of the first `j` items succeed (for `r < k`).
    """
    n = q.shape[-1]
    out = q.new_zeros(*q.shape[:-1], n + 1, k)
    current = q.new_zeros(*q.shape[:-1], k)
    current[..., 0] = 1.0
    out[..., 0, :] = current
    for j in range(n):
        qj = q[..., j : j + 1]
        shifted = torch.cat([torch.zeros_like(current[..., :1]), current[..., :-1]], dim=-1)
        current = current * (1.0 - qj) + shifted * qj
        out[..., j + 1, :] = current
    return out


def inclusion_probabilities(
    weights: Real[Tensor, "traj chunk"],
    budget: int | Integer[Tensor, " traj"],
    *,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    num_nodes: int = 64,
) -> Float64[Tensor, "traj chunk"]:
    r"""Exact first-order inclusion probabilities $\pi_t = P(t \in S)$ of `plackett_luce_sample`.

    `plackett_luce_sample(..., inclusion=True)` calls it and stores the probabilities of the
    selected chunks in `Selection.inclusion`; call it directly for every chunk's $\pi$.

    Successive sampling is a race of exponential clocks $T_j \sim \mathrm{Exp}(w_j)$: the sample
    is the $k$ first clocks to fire. Hence

    $$
    \pi_i = \int_0^\infty w_i e^{-w_i t}\,
        P\bigl(N_{-i}(t) \le k - 1\bigr)\, dt,
    $$

    where $N_{-i}(t)$ is the Poisson-binomial count of the other items whose clocks fired before
    $t$, with probabilities $q_j(t) = 1 - e^{-w_j t}$. The integral is computed by Gauss-Legendre
    quadrature on $t = \tau x / (1 - x)$, $x \in (0, 1)$, with the scale $\tau$ solving
    $\sum_j (1 - e^{-w_j \tau}) = k$ (Rosen's equation), and the leave-one-out Poisson-binomial
    probabilities by prefix and suffix dynamic programmes truncated at $k$ successes. Sampling
    follows Eq. (10) of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154;
    $1/\pi_t$ are the Horvitz-Thompson weights of the unbiased masked estimator.

    Notes:
        - Padding and zero-weight chunks get $\pi = 0$; when `k` is at least the number of
          positive-weight chunks, each of them gets $\pi = 1$.
        - Items with $w_i \tau > 2$ (likely to be drawn) are integrated in the equivalent
          complementary form $\pi_i = 1 - \int_0^\infty w_i e^{-w_i t}
          P(N_{-i}(t) \ge k)\, dt$, whose integrand, like the direct one for the other items,
          lives on the time scale $\tau$. This keeps the quadrature accurate when the weights
          span many orders of magnitude.
        - $\sum_t \pi_t = \min(k, \#\{t : w_t > 0\})$ up to quadrature error. With the default 64
          nodes the largest absolute error measured against enumeration (random cases, n <= 6)
          is about $10^{-13}$ for weight ratios up to $10^3$ and $10^{-8}$ up to $10^6$. 32
          nodes halve the cost and reach about $10^{-10}$ on such cases, but $2.5 \cdot 10^{-8}$
          on weights (0.5, 0.001, 0.001) with k = 2.
        - The cost is $O(\text{traj} \cdot \text{nodes} \cdot N \cdot k)$ in float64 with a
          Python loop over the `N` chunks; it synchronises with the host (the value check and
          the take-all shortcut). Compute it once per step, without gradient.

    Args:
        weights: `(traj, chunk)` non-negative chunk weights, as given to `plackett_luce_sample`.
        budget: the number of draws per trajectory $k \ge 1$, or a `(traj,)` integer tensor of
            per-trajectory budgets $b_i \ge 0$ (as `plackett_luce_sample`'s tensor `budget`); a
            budget of 0 gives $\pi = 0$.
        valid: `(traj, chunk)` bool, False at padding. Defaults to all True.
        num_nodes: number of Gauss-Legendre nodes (>= 1).

    Returns:
        `(traj, chunk)` float64 inclusion probabilities in $[0, 1]$.

    Raises:
        TypeError: if `weights` is not floating point, `valid` not bool, or `budget`/`num_nodes`
            not an int.
        ValueError: if shapes disagree, `budget` or `num_nodes` is not positive, or a valid
            weight is negative or not finite.

    Examples:
        >>> import torch
        >>> pi = inclusion_probabilities(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), 2)
        >>> [round(p, 6) for p in pi[0].tolist()]  # exact: 5/12, 11/15, 17/20, 0
        [0.416667, 0.733333, 0.85, 0.0]
    """
    check_tensor(weights, "weights", ndim=2, dtypes="float")
    num_nodes = check_positive_int(num_nodes, "num_nodes")
    if isinstance(budget, Tensor):
        check_tensor(budget, "budget", ndim=1, dtypes="int")
        check_shape(budget, "budget", (weights.shape[0],))
        check_same_device(budget, "budget", weights, "weights")
        if budget.numel() and int(budget.min()) < 0:
            raise ValueError(f"`budget` must be >= 0 per trajectory, got {int(budget.min())}.")
        row_k = budget.to(torch.int64)
    else:
        budget = check_positive_int(budget, "budget")
        row_k = torch.full((weights.shape[0],), budget, dtype=torch.int64, device=weights.device)
    valid = resolve_valid(valid, weights, ref_name="weights")
    check_finite_nonnegative(weights, "weights", valid, " at valid chunks")
    w = weights.detach().to(torch.float64)
    usable = valid & (w > 0) & (row_k > 0)[:, None]
    w = torch.where(usable, w, 0.0)
    num_traj, n = w.shape
    positive = usable.sum(1)
    take_all = positive <= row_k
    result = torch.where(usable, 1.0, 0.0).to(torch.float64)
    if n == 0 or num_traj == 0 or bool(take_all.all()):
        return result
    k = int(row_k.max())
    # PL is invariant to scaling the weights: put each row's maximum at 1.
    w = w / w.amax(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    # Rosen's tau: sum_j (1 - exp(-w_j tau)) = k, bisection in log tau.
    # At tau_lo = k / sum w the left side is <= k; at tau_hi (from the smallest weight) it is >= k.
    kk = row_k.to(torch.float64)
    kk = torch.minimum(kk, positive.to(torch.float64) - 0.5).clamp_min(0.5)
    w_min = torch.where(usable, w, float("inf")).amin(1).clamp_max(1.0)
    lo = torch.log(kk / w.sum(1).clamp_min(torch.finfo(torch.float64).tiny))
    hi = torch.log(-torch.log1p(-kk / positive.clamp_min(1)) / w_min)
    hi = torch.maximum(hi, lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        fired = -torch.expm1(-w * torch.exp(mid)[:, None]).sum(1)
        low_side = fired < kk
        lo = torch.where(low_side, mid, lo)
        hi = torch.where(low_side, hi, mid)
    tau = torch.exp(0.5 * (lo + hi))
    nodes, node_weights = np.polynomial.legendre.leggauss(num_nodes)
    x = torch.as_tensor((nodes + 1.0) / 2.0, dtype=torch.float64, device=w.device)
    xw = torch.as_tensor(node_weights / 2.0, dtype=torch.float64, device=w.device)
    t = tau[:, None] * (x / (1.0 - x))[None, :]  # (traj, node)
    jac = tau[:, None] * (xw / (1.0 - x) ** 2)[None, :]  # dt = jac dx
    wt = w[:, None, :] * t[:, :, None]  # (traj, node, chunk)
    q = -torch.expm1(-wt)  # P(clock j fired before t)
    prefix = _poisson_binomial_prefix(q, k)  # (traj, node, n + 1, k)
    suffix = _poisson_binomial_prefix(q.flip(-1), k).flip(-2)  # [..., j, r]: items j.. n-1
    # P(N_{-i} <= k_i - 1) = sum_{a + b <= k_i - 1} prefix[i][a] * suffix[i + 1][b], with the
    # dynamic programmes truncated at the largest budget k and row i reading its own k_i.
    suffix_cdf = torch.cumsum(suffix[..., 1:, :], dim=-1)  # (traj, node, n, k)
    a = torch.arange(k, device=w.device)
    last = (row_k.clamp_max(k) - 1)[:, None]  # (traj, 1)
    b = (last - a[None, :]).clamp_min(0)  # (traj, k): the cdf index k_i - 1 - a
    use = (a[None, :] <= last)[:, None, None, :]  # (traj, 1, 1, k)
    cdf_b = torch.gather(suffix_cdf, -1, b[:, None, None, :].expand(*suffix_cdf.shape[:-1], k))
    below = torch.where(use, prefix[..., :-1, :] * cdf_b, 0.0).sum(-1)  # (traj, node, n)
    density = w[:, None, :] * torch.exp(-wt)
    # Items whose clock rings well before tau (w_i tau > 2) are integrated in the complementary
    # form 1 - int w e^{-wt} P(N_{-i}(t) >= k) dt, whose integrand also lives on the scale tau.
    direct = (density * below * jac[:, :, None]).sum(1)
    complement = 1.0 - (density * (1.0 - below) * jac[:, :, None]).sum(1)
    pi = torch.where(w * tau[:, None] <= 2.0, direct, complement)
    pi = torch.where(usable, pi.clamp(0.0, 1.0), 0.0)
    return torch.where(take_all[:, None], result, pi)
