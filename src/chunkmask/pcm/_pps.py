r"""Sampling with probability proportional to size: an unbiased masked update with a Neyman allocation.

With the Horvitz-Thompson estimator, $\hat g = \sum_{t \in S} g_t / \pi_t$, the inclusion
probabilities that minimise the variance at a fixed expected number of chunks $K$ are
proportional to the chunks' gradient norms, $\pi_t \propto \lVert g_t \rVert$ (capped at 1): the
Neyman allocation taken to single chunks. No gradient norm is known before the backward pass, so
`pps_sample` takes any non-negative size proxy; `chunk_score_norm` gives a free one from the
rollout's own log-probabilities, and `|A_i|` times it is the proxy the evidence study uses (a chunk
with advantage 0 has no policy gradient and is never drawn). Drawing is systematic PPS sampling
(Madow, 1949): exactly $K$ chunks (when $\sum \pi = K$ is whole) with exactly the inclusion
probabilities $\pi$, in one pass and with no rejection. The returned `Selection` carries the
probabilities of its chunks (`Selection.inclusion`); `selection.packed_inclusion()` is what the
Horvitz-Thompson estimator of `masked_grpo_loss(..., estimator="horvitz_thompson")` reads.
"""

from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite_nonnegative,
    check_generator,
    check_option,
    check_positive_int,
    check_shape,
    check_tensor,
    resolve_mask,
    resolve_valid,
)
from chunkmask.batch._selection import Selection

__all__ = ["chunk_score_norm", "pps_inclusion", "pps_sample"]


def pps_inclusion(
    sizes: Float[Tensor, "*batch unit"],
    budget: "int | Tensor",
    valid: Bool[Tensor, "*batch unit"] | None = None,
) -> Float[Tensor, "*batch unit"]:
    r"""Inclusion probabilities proportional to size, capped at 1, summing to `budget` per row.

    $$
    \pi_t = \min(1, c\, s_t), \qquad \sum_t \pi_t = \min(K, |\{t : s_t > 0\}|),
    $$

    solved exactly along the last dimension by water-filling: the largest units are capped at 1
    one by one until the rest fit. Units with size 0 (or not valid) get $\pi = 0$.

    Args:
        sizes: `(*batch, unit)` non-negative, finite size proxies.
        budget: the expected sample size $K \ge 0$ per row: an int, or an integer tensor of shape
            `*batch`.
        valid: `(*batch, unit)` bool, False for units that cannot be drawn (default: all).

    Returns:
        float64 probabilities in `[0, 1]`, the shape of `sizes`.

    Raises:
        TypeError: on a non-float `sizes`, a non-bool `valid` or a non-integer `budget`.
        ValueError: on mismatched shapes, a negative `budget`, or a negative or non-finite valid
            size.

    Example:
        >>> import torch
        >>> pps_inclusion(torch.tensor([4.0, 1.0, 1.0, 0.0]), 2).tolist()
        [1.0, 0.5, 0.5, 0.0]
    """
    check_tensor(sizes, "sizes", dtypes="float")
    if sizes.ndim == 0:
        raise ValueError("`sizes` must have at least 1 dimension (the units), got a scalar.")
    valid = resolve_mask(valid, "valid", sizes, "sizes")
    check_finite_nonnegative(sizes, "sizes", valid, " at valid units")
    batch_shape = sizes.shape[:-1]
    if isinstance(budget, Tensor):
        check_tensor(budget, "budget", dtypes="int")
        if budget.shape != batch_shape:
            raise ValueError(
                f"`budget` must be an int or have shape {tuple(batch_shape)} (the rows of "
                f"`sizes`), got {tuple(budget.shape)}."
            )
        if bool((budget < 0).any()):
            raise ValueError(f"`budget` must be >= 0, got {budget.min().item()}.")
        k = budget.to(device=sizes.device, dtype=torch.float64)
    else:
        k = torch.full(batch_shape, float(check_positive_int(budget, "budget", allow_zero=True)),
                       dtype=torch.float64, device=sizes.device)
    s = torch.where(valid, sizes.to(torch.float64), 0.0)
    if s.shape[-1] == 0:
        return s
    positive = (s > 0).sum(-1).to(torch.float64)
    k = torch.minimum(k, positive)[..., None]
    # Water-filling: with m units capped at 1, the rest get c * s, c = (K - m) / (rest's sum).
    ordered = s.sort(dim=-1, descending=True).values
    tail = ordered.flip(-1).cumsum(-1).flip(-1)  # tail[m] = sum of the m-th largest onwards
    m = torch.arange(s.shape[-1], device=s.device, dtype=torch.float64)
    c = (k - m) / torch.where(tail > 0, tail, 1.0)
    fits = (c * ordered <= 1.0 + 1e-12) & (m <= k)
    first = torch.where(fits, m, float(s.shape[-1])).amin(-1, keepdim=True)  # fewest caps
    c_star = c.gather(-1, first.clamp_max(s.shape[-1] - 1).long())
    capped_level = ordered.gather(-1, (first - 1).clamp_min(0).long())
    pi = torch.clamp(c_star * s, max=1.0)
    pi = torch.where((s >= capped_level) & (first > 0) & (s > 0), 1.0, pi)
    return torch.where(k > 0, pi, 0.0)


def _systematic(pi: Tensor, generator: torch.Generator | None) -> Tensor:
    """Systematic PPS draw along the last dim (one uniform per row).

    Unit t is drawn iff a point u + j lands in (C_{t-1}, C_t], C the cumulative probabilities,
    so P(drawn) = pi_t exactly for pi_t <= 1.
    """
    u = torch.rand((*pi.shape[:-1], 1), generator=generator, dtype=torch.float64, device="cpu")
    u = u.to(pi.device)
    upper = pi.cumsum(-1)
    lower = upper - pi
    return (torch.floor(upper - u) - torch.floor(lower - u)) > 0


def pps_sample(
    sizes: Float[Tensor, "traj chunk"],
    budget: "int | Tensor",
    *,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    scope: Literal["batch", "trajectory"] = "batch",
    generator: torch.Generator | None = None,
) -> Selection:
    r"""Draw chunks with probability proportional to `sizes`; the Selection carries their $\pi$.

    With `scope="batch"` the whole batch shares one expected total of `budget` chunks per
    trajectory that can be drawn, $K = B \cdot |\{i : s_{i,t} > 0 \text{ for a valid } t\}|$
    (the Neyman allocation across trajectories as well as within them: a trajectory with larger
    sizes gets more chunks, one with size 0 none). Rows with no valid chunk of positive size
    (padding rows, the zero-advantage groups that dynamic sampling drops) add nothing to $K$, so
    the update costs what `budget` per trajectory reaching it costs; with
    `scope="trajectory"` each row draws its own `budget` (an int or a `(traj,)` integer tensor).
    The draw is systematic PPS: each chunk is drawn with probability exactly $\pi_t$
    (`pps_inclusion`), and the number drawn per scope is $\lfloor\sum\pi\rfloor$ or
    $\lceil\sum\pi\rceil$. Unbiased with `masked_grpo_loss(..., estimator="horvitz_thompson")`,
    which reads `selection.packed_inclusion()`, for every chunk whose gradient can be non-zero,
    i.e. has a positive size. Pass `valid` to `pps_inclusion` to get the dense `(traj, chunk)`
    probabilities of every chunk (0 at chunks that can never be drawn).

    Args:
        sizes: `(traj, chunk)` non-negative size proxies, e.g. `advantages.abs()[:, None] *
            chunk_score_norm(logp)`.
        budget: chunks per trajectory `B`: an int >= 1; with `scope="trajectory"` also a
            `(traj,)` integer tensor >= 0 (a row with 0 draws nothing).
        valid: `(traj, chunk)` bool, False at padding (default: all).
        scope: `"batch"` or `"trajectory"`, see above.
        generator: optional CPU `torch.Generator`.

    Returns:
        A `Selection` with `chunk` slots whose `inclusion` holds the float64 probability
        $\pi_t$ of each selected chunk.

    Raises:
        TypeError: on a non-float `sizes`, a non-bool `valid`, a non-integer `budget`, a
            tensor `budget` with `scope="batch"`, or a `generator` that is not a
            torch.Generator.
        ValueError: on a `sizes` that is not 2-D or holds a negative or non-finite valid size, an
            int `budget` below 1 or a negative tensor entry, mismatched shapes, or an unknown
            `scope`.

    Example:
        >>> import torch
        >>> sizes = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
        >>> sel = pps_sample(sizes, 1, generator=torch.Generator().manual_seed(0))
        >>> int(sel.counts.sum())  # K = 2 chunks for the batch, proportional to size
        2
        >>> sel.packed_inclusion().tolist()  # pi of the two drawn chunks
        [0.25, 0.25]
        >>> pps_inclusion(sizes.reshape(1, -1), 2).reshape(2, 4).tolist()  # pi of every chunk
        [[0.75, 0.25, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]
    """
    check_tensor(sizes, "sizes", ndim=2, dtypes="float")
    check_option(scope, "scope", ("batch", "trajectory"))
    check_generator(generator)
    valid = resolve_valid(valid, sizes, ref_name="sizes")
    n_traj, n_chunk = sizes.shape
    if scope == "batch":
        if isinstance(budget, Tensor):
            raise TypeError("`budget` must be an int with scope='batch', got a tensor.")
        budget = check_positive_int(budget, "budget")
        drawable = (valid & (sizes > 0)).any(1).sum()  # a tensor: no host sync
        pi = pps_inclusion(sizes.reshape(1, -1), (budget * drawable).reshape(1), valid.reshape(1, -1))
        pi = pi.reshape(n_traj, n_chunk)
    else:
        if isinstance(budget, Tensor):
            check_tensor(budget, "budget", ndim=1, dtypes="int")
            check_shape(budget, "budget", (n_traj,))
            if bool((budget < 0).any()):
                raise ValueError(f"`budget` must be >= 0 per trajectory, got {budget.min().item()}.")
        else:
            budget = check_positive_int(budget, "budget")
        pi = pps_inclusion(sizes, budget, valid)
    drawn = _systematic(pi.reshape(1, -1) if scope == "batch" else pi, generator)
    drawn = drawn.reshape(n_traj, n_chunk) & valid & (pi > 0)
    return Selection.from_mask(drawn, valid).with_inclusion(pi)


def chunk_score_norm(
    logp: Float[Tensor, "traj chunk token"],
    mask: Bool[Tensor, "traj chunk token"] | None = None,
) -> Float[Tensor, "traj chunk"]:
    r"""A free size proxy: a lower bound on each chunk's score norm with respect to the logits.

    For a softmax token distribution $p$ and the sampled token $a$,
    $\lVert \partial \log p_a / \partial z \rVert^2 = \lVert e_a - p \rVert^2 \ge (1 - p_a)^2$,
    so

    $$
    \nu_{i,t} = \Bigl(\sum_{k \in \text{chunk}} (1 - p_{a_k})^2\Bigr)^{1/2}
    $$

    from the behaviour log-probabilities the rollout already stores. Confident chunks (every
    token near probability 1) have a small policy gradient and get a small $\nu$.

    Args:
        logp: `(traj, chunk, token)` log-probabilities of the sampled tokens (<= 0).
        mask: `(traj, chunk, token)` bool, True for real tokens (default: all).

    Returns:
        `(traj, chunk)` float32 (float64 for float64 input) proxies, 0 where no token is real.

    Raises:
        TypeError: on a non-float `logp` or a non-bool `mask`.
        ValueError: on a `logp` that is not 3-D, a mask of another shape, or a real `logp` that
            is NaN or positive.

    Example:
        >>> import torch
        >>> chunk_score_norm(torch.log(torch.tensor([[[1.0, 0.5], [0.2, 0.2]]]))).round(decimals=4)
        tensor([[0.5000, 1.1314]])
    """
    check_tensor(logp, "logp", ndim=3, dtypes="float")
    mask = resolve_mask(mask, "mask", logp, "logp")
    x = logp.float() if logp.dtype != torch.float64 else logp
    bad = mask & ~(x <= 0)
    if bool(bad.any()):
        raise ValueError(
            f"`logp` must be <= 0 (and not NaN) at real tokens, got {int(bad.sum())} value(s) "
            "outside."
        )
    gap = torch.where(mask, 1.0 - x.exp(), 0.0)
    return gap.square().sum(-1).sqrt()
