"""Per-phase keep probabilities, Neyman budget allocation and the budget knee.

These functions turn per-phase outcome-divergence scores into the quantities a chunk selector
needs: the keep probability (chunk weight) of each phase (Eq. 8-9), the variance-optimal number of
chunks to draw from each phase under a fixed budget (Eq. 6, Theorem 1), and a suggested budget from
the knee of the captured-score curve (App. D). See Anonymous et al. (2026), Probabilistic Chunk
Masking, arXiv 2605.16154.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Float64, Int64, Integer, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite_nonnegative,
    check_min_ndim,
    check_positive_int,
    check_power,
    check_probability,
    check_same_device,
    check_same_shape,
    check_tensor,
    count_tensor,
    resolve_mask,
    values_checkable,
)

__all__ = [
    "BudgetSuggestion",
    "advantage_aware_budgets",
    "keep_probabilities",
    "neyman_allocation",
    "neyman_allocation_continuous",
    "suggest_budget",
]


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 stay as they are; lower precisions come back as float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def keep_probabilities(
    scores: Float[Tensor, "*b phase"],
    defined: Bool[Tensor, "*b phase"] | None = None,
    *,
    p_min: float = 0.1,
    power: float = 1.0,
    validate_args: bool = False,
) -> Float[Tensor, "*b phase"]:
    r"""Map per-phase scores to keep probabilities by share and max normalisation with a floor.

    $$
    s_c = \frac{\bar V_c}{\sum_{c'} \bar V_{c'}}, \qquad
    \tilde\rho_c = \Bigl(\frac{s_c}{\max_{c'} s_{c'}}\Bigr)^{\gamma}, \qquad
    p_c = \max\bigl(p_{\min}, \tilde\rho_c\bigr),
    $$

    where the sums and the maximum run over the defined phases only and $\gamma$ is `power`.
    See Eq. (8) and Eq. (9) of Anonymous et al. (2026), Probabilistic Chunk Masking,
    arXiv 2605.16154.

    Notes:
        - The share normalisation of Eq. (8) cancels in the max normalisation; it is kept in the
          equation for fidelity to the paper and does not change the result.
        - `power=1` is the paper's rule. `power=0.5` gives $p_c \propto s_c^{1/2}$, which is the
          exact Neyman weight of Eq. (6) when the score is proportional to the variance
          $\sigma_c^2$ (Lemma 2).
        - A phase that is not defined (no score this refresh, e.g. seen only in successes) gets the
          floor $p_{\min}$ (`p_min`).
        - A row with no defined phase, or whose defined scores are all 0, carries no information:
          every phase then gets keep probability 1 (uniform weighting), so the selector falls back
          to uniform sampling instead of dividing by zero.
        - The maximum of a row is exactly 1 whenever some defined score is positive.

    Args:
        scores: `(*b, phase)` non-negative per-phase scores $\bar V_c$ (leading batch dims allowed).
            Values at undefined phases are ignored and may be anything, including NaN.
        defined: `(*b, phase)` bool, True where the phase has a score. Defaults to all True.
        p_min: the floor $p_{\min}$ in (0, 1] of Eq. (9).
        power: the exponent $\gamma > 0$ applied after max normalisation.
        validate_args: check that defined scores are finite and non-negative (one host sync).

    Returns:
        `(*b, phase)` keep probabilities in `[p_min, 1]`, float32 (float64 for float64 input).

    Raises:
        TypeError: if `scores` is not floating point, `defined` is not bool or `power` is not a
            number.
        ValueError: if the shapes disagree, `p_min` is outside (0, 1], `power` is not positive, or
            (with `validate_args`) a defined score is negative or not finite.

    Examples:
        >>> import torch
        >>> scores = torch.tensor([0.0, 0.4, 2.0, 1.0, 0.1])
        >>> keep_probabilities(scores).tolist()
        [0.10000000149011612, 0.20000000298023224, 1.0, 0.5, 0.10000000149011612]
        >>> keep_probabilities(scores, power=0.5)[3].item()
        0.7071067690849304
        >>> keep_probabilities(torch.zeros(3)).tolist()
        [1.0, 1.0, 1.0]
    """
    check_tensor(scores, "scores", dtypes="float")
    check_min_ndim(scores, "scores", 1)
    _check_phase_axis(scores, "scores")
    defined = resolve_mask(defined, "defined", scores, "scores")
    p_min = check_probability(p_min, "p_min")
    power = check_power(power, "power")
    if validate_args:
        check_finite_nonnegative(scores, "scores", defined, " at defined phases")
    out_dtype = _result_dtype(scores.dtype)
    work = scores.to(torch.float64)
    s = torch.where(defined, work, 0.0)
    total = s.sum(dim=-1, keepdim=True)
    informative = total > 0
    share = s / torch.where(informative, total, 1.0)  # Eq. 8
    top = share.amax(dim=-1, keepdim=True)
    rho = share / torch.where(informative, top, 1.0)
    rho = rho.pow(power)
    p = torch.where(defined, rho.clamp_min(p_min), p_min)  # Eq. 9
    p = torch.where(informative, p, 1.0)
    return p.to(out_dtype)


def _check_phase_axis(x: Tensor, name: str) -> None:
    if x.shape[-1] == 0:
        raise ValueError(
            f"`{name}` must have at least one phase (a non-empty last axis), got shape "
            f"{tuple(x.shape)}."
        )


def _check_budget(budget: "int | Tensor", batch_shape: torch.Size, device: torch.device) -> Tensor:
    """Return the budget as an int64 tensor broadcast to ``batch_shape``.

    A scalar int budget must be > 0 (a budget of nothing is a configuration error); entries of a
    per-row tensor budget must be >= 0 (a row with no chunk available legitimately gets 0).
    """
    if isinstance(budget, Tensor):
        check_tensor(budget, "budget", dtypes="int")
        if budget.ndim != 0 and budget.shape != batch_shape:
            raise ValueError(
                f"`budget` must be a scalar or have the batch shape {tuple(batch_shape)}, "
                f"got {tuple(budget.shape)}."
            )
        check_finite_nonnegative(budget, "budget")
        return budget.to(device=device, dtype=torch.int64).expand(batch_shape)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(
            f"`budget` must be an int or an integer tensor, got {type(budget).__name__}."
        )
    if budget <= 0:
        raise ValueError(f"`budget` must be > 0, got {budget}.")
    return torch.full(batch_shape, budget, dtype=torch.int64, device=device)


def _check_sizes_stds(sizes: Tensor, stds: Tensor) -> None:
    check_tensor(sizes, "sizes", dtypes="int")
    check_min_ndim(sizes, "sizes", 1)
    check_tensor(stds, "stds", dtypes="float")
    check_same_shape(stds, "stds", sizes, "sizes")
    check_same_device(stds, "stds", sizes, "sizes")
    check_finite_nonnegative(sizes, "sizes")
    check_finite_nonnegative(stds, "stds")


def neyman_allocation(
    budget: int | Integer[Tensor, "*b"],
    sizes: Integer[Tensor, "*b phase"],
    stds: Real[Tensor, "*b phase"],
    *,
    lower: int | Integer[Tensor, "*b phase"] = 0,
) -> Int64[Tensor, "*b phase"]:
    r"""Split an integer budget across phases to minimise the stratified estimator's variance.

    Solves exactly, over integers,

    $$
    \min_{n}\; \sum_c N_c^2 \sigma_c^2 \Bigl(\frac{1}{n_c} - \frac{1}{N_c}\Bigr)
    \quad \text{s.t.} \quad \sum_c n_c = B,\;\; \ell_c \le n_c \le N_c,
    $$

    whose continuous relaxation is the Neyman allocation
    $b_c^\star = B\, N_c \sigma_c / \sum_{c'} N_{c'} \sigma_{c'}$.
    See Eq. (6) (Theorem 1) of Anonymous et al. (2026), Probabilistic Chunk Masking,
    arXiv 2605.16154.

    The objective is separable and convex, so the greedy rule of Wright (2012) is exact: the
    $j$-th unit given to phase $c$ lowers the variance by $A_c^2 / (j (j - 1))$ with
    $A_c = N_c \sigma_c$. All $(c, j)$ units are scored $A_c / \sqrt{j (j-1)}$ at once (units up
    to the lower bound score $+\infty$, units beyond the cap $-\infty$) and the best $B$ are kept
    with one stable sort per row, which is the greedy result without a Python loop.

    Notes:
        - The first unit of a phase with $\sigma_c > 0$ scores $+\infty$ (a phase left empty has
          infinite variance), so every such phase gets one unit before any phase gets a second.
        - A phase with $\sigma_c = 0$ contributes no variance; it receives units only once every
          other phase is full (or to meet `lower`).
        - Ties are broken towards the lower phase index, so the result is deterministic.
        - A budget larger than $\sum_c N_c$ takes every chunk: the result is $n_c = N_c$ and sums
          to $\sum_c N_c < B$. This mirrors the samplers, which take all available chunks when
          asked for more.
        - `lower` is capped at the phase size: $\ell_c \leftarrow \min(\ell_c, N_c)$.

    Args:
        budget: total number of chunks $B$; an int $B \ge 1$, or an integer tensor (entries
            $\ge 0$) with the batch shape `(*b,)` for a budget per row.
        sizes: `(*b, phase)` integer phase sizes $N_c \ge 0$ (the caps).
        stds: `(*b, phase)` per-phase standard deviations $\sigma_c \ge 0$ (any proxy
            proportional to them, e.g. `scores ** 0.5`, gives the same allocation).
        lower: minimum number of chunks per phase $\ell_c \ge 0$ (int or `(*b, phase)` tensor).

    Returns:
        `(*b, phase)` int64 allocation $n_c$.

    Raises:
        TypeError: if `sizes` or `lower` is not integer, `stds` not floating, or `budget` not int.
        ValueError: if shapes disagree, an int `budget` is <= 0, a size, std, lower bound or
            tensor budget entry is negative or not finite, or the capped lower bounds exceed the
            budget.

    Examples:
        >>> import torch
        >>> sizes = torch.tensor([20, 10, 30])
        >>> stds = torch.tensor([1.0, 4.0, 0.5])
        >>> neyman_allocation(12, sizes, stds).tolist()
        [3, 7, 2]
        >>> neyman_allocation(100, sizes, stds).tolist()  # more than available: take all
        [20, 10, 30]
    """
    _check_sizes_stds(sizes, stds)
    batch_shape = sizes.shape[:-1]
    num_phases = sizes.shape[-1]
    device = sizes.device
    b = _check_budget(budget, batch_shape, device)
    sizes64 = sizes.to(torch.int64)
    if isinstance(lower, Tensor):
        check_tensor(lower, "lower", dtypes="int")
        check_same_shape(lower, "lower", sizes, "sizes")
        check_same_device(lower, "lower", sizes, "sizes")
        check_finite_nonnegative(lower, "lower")
        low = lower.to(device=device, dtype=torch.int64)
    else:
        if isinstance(lower, bool) or not isinstance(lower, int):
            raise TypeError(
                f"`lower` must be an int or an integer tensor, got {type(lower).__name__}."
            )
        low = torch.full_like(sizes64, check_positive_int(lower, "lower", allow_zero=True))
    low = torch.minimum(low, sizes64)
    need = low.sum(-1)
    if bool((need > b).any()):
        raise ValueError(
            "`lower` (capped at `sizes`) must sum to at most `budget`, got a lower-bound total "
            f"of {int(need.max())} against a budget of {int(b[need > b].min())}."
        )
    if num_phases == 0 or sizes64.numel() == 0:
        return torch.zeros_like(sizes64)
    units = int(min(int(b.max()), int(sizes64.max())))  # no phase ever takes more units
    if units == 0:
        return torch.zeros_like(sizes64)
    area = sizes64.to(torch.float64) * stds.to(torch.float64)  # A_c = N_c sigma_c
    j = torch.arange(1, units + 1, device=device, dtype=torch.float64)  # unit number
    gain = area[..., None, :] / torch.sqrt(j * (j - 1)).clamp_min(0)[:, None]
    # j = 1: A / 0 is +inf for A > 0 and nan for A = 0; a zero-variance phase scores 0.
    gain = torch.where(area[..., None, :] > 0, gain, 0.0)
    jj = torch.arange(1, units + 1, device=device)[:, None]
    gain = torch.where(jj <= low[..., None, :], float("inf"), gain)
    gain = torch.where(jj > sizes64[..., None, :], float("-inf"), gain)
    # Unit-major flattening: on ties, earlier units and then lower phases come first.
    flat = gain.reshape(*batch_shape, units * num_phases)
    order = torch.sort(flat, dim=-1, descending=True, stable=True)
    rank = torch.arange(units * num_phases, device=device)
    take = (rank < b[..., None]) & (order.values > float("-inf"))
    phase_of = order.indices % num_phases
    counts = torch.zeros_like(sizes64)
    return counts.scatter_add_(-1, phase_of, take.to(torch.int64))


def neyman_allocation_continuous(
    budget: float | int | Real[Tensor, "*b"],
    sizes: Real[Tensor, "*b phase"],
    stds: Real[Tensor, "*b phase"],
) -> Float64[Tensor, "*b phase"]:
    r"""Continuous Neyman allocation with caps $b_c \le N_c$ (recursive Neyman).

    $$
    b_c = \min\bigl(N_c,\; \lambda N_c \sigma_c\bigr), \qquad \sum_c b_c = B,
    $$

    computed by the recursive rule: allocate $b_c = B' N_c\sigma_c / \sum_{c \in F} N_c\sigma_c$
    over the free phases $F$, move every phase with $b_c \ge N_c$ to the take-all set with
    $b_c = N_c$, reduce $B'$ accordingly, and repeat. Without caps this is
    $b_c^\star = B N_c \sigma_c / \sum_{c'} N_{c'} \sigma_{c'}$, Eq. (6) of Anonymous et al.
    (2026), Probabilistic Chunk Masking, arXiv 2605.16154.

    Notes:
        - When every free phase has $\sigma_c = 0$ (for example, all positive-variance phases are
          full), the remaining budget is split proportionally to $N_c$ over the free phases.
        - A budget of at least $\sum_c N_c$ takes everything: $b_c = N_c$.
        - Rounding this result to integers is not optimal; use `neyman_allocation` for that.

    Args:
        budget: total budget, a number $B > 0$ or a tensor (entries $\ge 0$) with the batch
            shape `(*b,)`.
        sizes: `(*b, phase)` phase sizes $N_c \ge 0$ (integer or floating).
        stds: `(*b, phase)` standard deviations $\sigma_c \ge 0$.

    Returns:
        `(*b, phase)` float64 allocation summing to $\min(B, \sum_c N_c)$.

    Raises:
        TypeError: if `budget` is not a number or a real tensor.
        ValueError: if shapes disagree, a number `budget` is <= 0, or any input is negative or
            not finite.

    Examples:
        >>> import torch
        >>> sizes = torch.tensor([20.0, 10.0, 30.0])
        >>> stds = torch.tensor([1.0, 4.0, 0.5])
        >>> neyman_allocation_continuous(12, sizes, stds).round(decimals=4).tolist()
        [3.2, 6.4, 2.4]
        >>> neyman_allocation_continuous(40, sizes, stds).round(decimals=4).tolist()
        [17.1429, 10.0, 12.8571]
    """
    check_tensor(sizes, "sizes", dtypes=("int", "float"))
    check_min_ndim(sizes, "sizes", 1)
    check_tensor(stds, "stds", dtypes=("int", "float"))
    check_same_shape(stds, "stds", sizes, "sizes")
    check_same_device(stds, "stds", sizes, "sizes")
    n = sizes.to(torch.float64)
    sd = stds.to(torch.float64)
    check_finite_nonnegative(n, "sizes")
    check_finite_nonnegative(sd, "stds")
    batch_shape = n.shape[:-1]
    if isinstance(budget, Tensor):
        check_tensor(budget, "budget", dtypes=("int", "float"))
        if budget.ndim != 0 and budget.shape != batch_shape:
            raise ValueError(
                f"`budget` must be a scalar or have the batch shape {tuple(batch_shape)}, "
                f"got {tuple(budget.shape)}."
            )
        check_same_device(budget, "budget", sizes, "sizes")
        b = budget.to(dtype=torch.float64).expand(batch_shape)
        check_finite_nonnegative(b, "budget")
    else:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"`budget` must be a number or a tensor, got {type(budget).__name__}.")
        if not budget > 0:  # NaN included
            raise ValueError(f"`budget` must be > 0, got {budget}.")
        if budget == float("inf"):
            raise ValueError(f"`budget` must be finite, got {budget}.")
        b = torch.full(batch_shape, float(budget), dtype=torch.float64, device=n.device)
    b = torch.minimum(b, n.sum(-1))
    full = n <= 0  # empty phases are trivially "full"
    alloc = torch.zeros_like(n)
    for _ in range(n.shape[-1] + 1):
        left = b - torch.where(full, n, 0.0).sum(-1)
        # Only the ratios of the free areas N_c sigma_c matter: scale N and sigma by their maxima
        # over the free phases before multiplying, so that legal input (N, sigma near 1e200)
        # cannot overflow float64 and a small free area is not lost next to a full phase's.
        free_size = _unit_scale(torch.where(full, 0.0, n))
        free_area = free_size * _unit_scale(torch.where(full, 0.0, sd))
        use_area = free_area.sum(-1, keepdim=True) > 0
        weight = torch.where(use_area, free_area, free_size)
        denom = weight.sum(-1, keepdim=True)
        share = weight / torch.where(denom > 0, denom, 1.0)
        alloc = torch.where(full, n, share * left[..., None].clamp_min(0))
        newly = ~full & (alloc >= n)
        if not bool(newly.any()):
            break
        full = full | newly
    return alloc


def _unit_scale(x: Tensor) -> Tensor:
    """``x`` (>= 0) divided by its maximum over the last axis, so every entry lies in [0, 1]."""
    if x.shape[-1] == 0:
        return x
    top = x.amax(-1, keepdim=True)
    return x / torch.where(top > 0, top, 1.0)


class BudgetSuggestion(NamedTuple):
    r"""The knee of the captured-score curve and the curve itself.

    Attributes:
        budget: suggested number of chunks per trajectory $B$ (a Python int).
        fraction: $B / N$, the fraction of the `N` chunk slots kept (a Python float).
        curve_x: `(N + 1,)` float64 kept fraction $m / N$ for $m = 0, \dots, N$.
        curve_y: `(N + 1,)` float64 mean captured share of the score mass when each trajectory
            keeps its $m$ highest-scoring chunks.
    """

    budget: int
    fraction: float
    curve_x: Float64[Tensor, " point"]
    curve_y: Float64[Tensor, " point"]


def suggest_budget(
    scores: Real[Tensor, "*traj chunk"],
    valid: Bool[Tensor, "*traj chunk"] | None = None,
) -> BudgetSuggestion:
    r"""Suggest a chunk budget at the knee of the captured-score curve.

    Rank the chunks of each trajectory by score, let $y_i(m)$ be the share of trajectory $i$'s
    score mass held by its $m$ highest-scoring chunks, average over trajectories and take the
    knee of the concave curve $\bar y(m)$ against $x = m / N$ (Kneedle, Satopaa et al. 2011):

    $$
    B = \arg\max_m \bigl(\hat y(m) - \hat x(m)\bigr),
    $$

    where $\hat x, \hat y$ are $x, \bar y$ normalised to $[0, 1]$. See Appendix D of
    Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154 (knee at about 19%
    of 64 chunks, $B = 12$).

    Notes:
        - Per-chunk scores are typically the chunk weights $p_{\phi(i,t)}$ or the phase scores
          $V_{\phi(i,t)}$ broadcast to the chunks.
        - $N$ is the chunk axis size (the padded length). A trajectory with $T_i < N$ valid chunks
          has $y_i(m) = 1$ for $m \ge T_i$.
        - Trajectories whose valid scores sum to 0 carry no ranking and are left out of the mean.
        - A curve with no concavity ($\hat y - \hat x \le 10^{-12}$ everywhere, e.g. all scores
          equal) has no knee: the suggestion is then to keep everything, $B = N$.
        - Ties in the knee go to the smallest budget.

    Args:
        scores: `(traj, chunk)` (or `(chunk,)` for one trajectory) non-negative per-chunk scores.
        valid: bool mask of the same shape; defaults to all True.

    Returns:
        A `BudgetSuggestion` (budget, fraction, curve_x, curve_y).

    Raises:
        TypeError: if `scores` is not a real tensor or `valid` not bool.
        ValueError: if shapes disagree, a valid score is negative or not finite, or no trajectory
            has a positive score.

    Examples:
        >>> import torch
        >>> scores = torch.tensor([[5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
        >>> suggestion = suggest_budget(scores)
        >>> suggestion.budget, suggestion.fraction
        (2, 0.25)
    """
    check_tensor(scores, "scores", ndim=(1, 2), dtypes=("int", "float"))
    valid = resolve_mask(valid, "valid", scores, "scores")
    if scores.ndim == 1:
        scores, valid = scores[None], valid[None]
    s = scores.to(torch.float64)
    check_finite_nonnegative(s, "scores", valid, " at valid chunks")
    s = torch.where(valid, s, 0.0)
    n = s.shape[1]
    total = s.sum(1)
    informative = total > 0
    if not bool(informative.any()):
        raise ValueError(
            "`scores` must have a positive score at a `valid` chunk in at least one trajectory, "
            "got none."
        )
    ranked = torch.sort(s, dim=1, descending=True).values
    captured = torch.cumsum(ranked, dim=1) / torch.where(informative, total, 1.0)[:, None]
    captured = torch.cat([torch.zeros_like(captured[:, :1]), captured.clamp(max=1.0)], dim=1)
    curve_y = captured[informative].mean(0)
    curve_x = torch.arange(n + 1, dtype=torch.float64, device=s.device) / max(n, 1)
    y_hat = (curve_y - curve_y[0]) / (curve_y[-1] - curve_y[0])
    gap = y_hat - curve_x
    best = int(torch.argmax(gap))
    if float(gap[best]) <= 1e-12:
        best = n
    return BudgetSuggestion(best, best / max(n, 1), curve_x, curve_y)


def advantage_aware_budgets(
    advantages: Real[Tensor, " traj"],
    num_chunks: Integer[Tensor, " traj"],
    budget: int,
    *,
    max_budget: int | None = None,
    total_budget: int | Integer[Tensor, ""] | None = None,
    validate_args: bool = False,
) -> Int64[Tensor, " traj"]:
    r"""Per-trajectory chunk budgets that spend nothing where the advantage is zero.

    A trajectory with $A_i = 0$ (its group all succeeded or all failed, Eq. 1) contributes no
    policy gradient, yet a fixed budget $B$ per trajectory spends chunks on it. This moves that
    budget to the trajectories with $A_i \ne 0$: with $c_i = \min(T_i, \text{max\_budget})$ their
    caps and $R$ the total, the budgets water-fill

    $$
    b_i = \min(c_i, \lambda) + [\text{one of the first } r \text{ rows with } c_i > \lambda],
    \qquad \lambda = \max\{\ell : \textstyle\sum_{i: A_i \ne 0} \min(c_i, \ell) \le R\},
    $$

    so every informative trajectory gets the same budget where its length allows, the leftover
    $r < |\{i : c_i > \lambda\}|$ going one chunk each to the first such rows. The default total
    is what a fixed budget would spend, $R = \sum_i \min(B, T_i)$ over all trajectories, so the
    update's compute is unchanged. Dropping the zero-advantage chunks biases nothing (their
    gradient is exactly 0); the per-row budgets go to `plackett_luce_sample(..., budgets=)` and
    `inclusion_probabilities(weights, budgets)`. Static shapes; no host sync when `max_budget`
    is given (without it the largest cap is read once).

    Args:
        advantages: `(traj,)` advantages (0 exactly for uninformative trajectories).
        num_chunks: `(traj,)` valid chunk counts $T_i \ge 0$.
        budget: the per-trajectory budget $B \ge 1$ that sets the default total.
        max_budget: the largest budget of one trajectory (the Selection's slot count); None for
            no cap beyond $T_i$.
        total_budget: $R \ge 0$, overriding the default total: an int (checked always) or a
            0-d integer tensor (not read on the host unless `validate_args`).
        validate_args: check the tensor contents: `num_chunks` and a tensor `total_budget` must
            be >= 0 (one host sync). Without it they are not read: a negative $T_i$ counts as 0
            and a negative tensor total as 0.

    Returns:
        `(traj,)` int64 budgets, 0 where $A_i = 0$, summing to $\min(R, \sum_{A_i \ne 0} c_i)$.

    Raises:
        TypeError: on a non-real `advantages`, a non-integer `num_chunks`, or a non-int budget.
        ValueError: on shapes or devices that differ, non-positive budgets, a negative int
            `total_budget`, or (with `validate_args`) negative `num_chunks` or a negative tensor
            `total_budget`.

    Example:
        >>> import torch
        >>> adv = torch.tensor([0.0, 1.2, -0.4, 0.0, 0.7])
        >>> advantage_aware_budgets(adv, torch.tensor([64, 64, 10, 64, 64]), 12).tolist()
        [0, 24, 10, 0, 24]
    """
    check_tensor(advantages, "advantages", ndim=1, dtypes=("float", "int"))
    check_tensor(num_chunks, "num_chunks", ndim=1, dtypes="int")
    check_same_shape(num_chunks, "num_chunks", advantages, "advantages")
    check_same_device(num_chunks, "num_chunks", advantages, "advantages")
    budget = check_positive_int(budget, "budget")
    if max_budget is not None:
        max_budget = check_positive_int(max_budget, "max_budget")
    lengths = num_chunks.to(torch.int64)
    if values_checkable(lengths, validate_args) and lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"`num_chunks` must be >= 0, got {int(lengths.min())}.")
    if total_budget is None:
        total = lengths.clamp(min=0, max=budget).sum()
    else:
        total = count_tensor(total_budget, "total_budget", lengths.device)
        if values_checkable(total, validate_args) and int(total) < 0:
            raise ValueError(f"`total_budget` must be >= 0, got {int(total)}.")
        total = total.clamp_min(0)
    informative = advantages != 0
    caps = torch.where(informative, lengths.clamp_min(0), 0)
    if max_budget is not None:
        caps = caps.clamp(max=max_budget)
    if caps.numel() == 0:
        return caps
    top = int(max_budget) if max_budget is not None else None
    levels = torch.arange((top if top is not None else int(caps.max())) + 1, device=caps.device)
    spent = torch.minimum(caps[:, None], levels[None, :]).sum(0)  # (levels,), non-decreasing
    level = ((spent <= total).sum() - 1).clamp_min(0)
    base = torch.minimum(caps, level)
    left = (total - base.sum()).clamp_min(0)
    room = caps > level
    order = torch.cumsum(room.to(torch.int64), 0)
    return base + (room & (order <= left)).to(torch.int64)
