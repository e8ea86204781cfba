"""Chunk selectors: Plackett-Luce, stratified and the ablation baselines.

Every selector returns a `chunkmask.batch.Selection` of fixed width `k` (its slot count): the
selected chunk indices of each trajectory in ascending order, a prefix mask, the number of valid
chunks and the padded length, and, where the selector knows them, the inclusion probabilities
of the selected chunks (`Selection.inclusion`, read by `Selection.packed_inclusion()`). The
uniform, stratified and top-phase designs have closed-form probabilities and always carry them;
Plackett-Luce's are computed by `chunkmask.pcm.inclusion_probabilities` (quadrature, with a
host sync) only when asked, `plackett_luce_sample(..., inclusion=True)`; the deterministic
`topk_sample` carries none. See Anonymous et al. (2026), Probabilistic Chunk Masking,
arXiv 2605.16154.
"""

import torch
from jaxtyping import Bool, Integer, Real
from torch import Tensor

from chunkmask._checks import (
    check_bool,
    check_finite_nonnegative,
    check_generator,
    check_positive_int,
    check_same_device,
    check_shape,
    check_tensor,
    resolve_valid,
)
from chunkmask.batch._selection import Selection
from chunkmask.pcm._inclusion import inclusion_probabilities

__all__ = [
    "plackett_luce_sample",
    "stratified_sample",
    "top_phase_sample",
    "topk_sample",
    "uniform_sample",
]


def _selection_from_picks(
    picks: Tensor, ok: Tensor, k: int, num_chunks: Tensor, chunks_total: int
) -> Selection:
    """Build a `Selection` from picked indices `(traj, k')` and their validity, `k' <= k`.

    The valid picks are sorted into ascending chunk order in front; the remaining slots (including
    `k - k'` pad slots when `k > N`) are flagged and hold 0. One sort of the `k'` picks, where a
    flagged pick is keyed `N` so that it sorts last: the mask is then `sorted < N`, with no count
    or `arange`. Static shapes, no host sync.
    """
    key = torch.where(ok, picks, chunks_total)
    if k > key.shape[1]:
        key = torch.nn.functional.pad(key, (0, k - key.shape[1]), value=chunks_total)
    key = torch.sort(key, dim=1).values
    mask = key < chunks_total
    indices = torch.where(mask, key, 0)
    return Selection(indices, mask, num_chunks, chunks_total)


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor, dtype: torch.dtype
) -> Tensor:
    """Uniform(0, 1) draws on the generator's device, moved to the device of `like`."""
    if generator is None:
        return torch.rand(shape, dtype=dtype, device=like.device)
    u = torch.rand(shape, dtype=dtype, device=generator.device, generator=generator)
    return u.to(like.device)


def plackett_luce_sample(
    weights: Real[Tensor, "traj chunk"],
    budget: int | Integer[Tensor, " traj"],
    *,
    slots: int | None = None,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    generator: torch.Generator | None = None,
    inclusion: bool = False,
    validate_args: bool = False,
) -> Selection:
    r"""Draw `budget` distinct chunks per trajectory by successive weighted sampling (Plackett-Luce).

    $$
    P(t_1, \dots, t_k) = \prod_{j=1}^{k}
        \frac{w_{t_j}}{\sum_{t \notin \{t_1, \dots, t_{j-1}\}} w_t}
    $$

    See Eq. (10) of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154.

    Implemented with the Gumbel-top-k trick (Kool et al. 2019, arXiv 1903.06059): the top `k` of
    the keys $\log w_t + G_t$, $G_t \sim \mathrm{Gumbel}(0, 1)$, in descending key order are a
    Plackett-Luce sample. With $G_t = -\log E_t$, $E_t \sim \mathrm{Exp}(1)$, the keys are the
    logarithms of $w_t / E_t$ (the race of exponential clocks $E_t / w_t$), so the function ranks
    $-w_t / E_t$ directly: one `div` instead of two more logarithms, the same draw for the same
    uniforms. The Selection stores the chosen set in ascending chunk order, so the draw order is
    not kept (the set is what the masked loss needs).

    Notes:
        - Keys are computed in float32 (float64 for float64 weights), so bfloat16 weights work.
          The uniform draws are clamped to the smallest positive normal number so that a draw of
          exactly 0 cannot produce an infinite key. PL is invariant to scaling the weights; keep
          them within about $[10^{-30}, 10^{30}]$ in float32 (a subnormal weight can round its key
          to 0 and count as zero).
        - Padding (`valid` False) and zero weights get a key of 0 (every usable key is negative)
          and are never drawn. When fewer than `budget` chunks have a positive weight, all of
          them are taken and the other slots are flagged (`mask` False, index 0). `slots > N` is
          allowed: the extra slots are flagged too.
        - `num_chunks` counts the valid chunks $T_i$ (the `valid` mask), not only those with a
          positive weight: it is the full-length normaliser of the Horvitz-Thompson estimator.
        - With `validate_args=False` the function has static shapes and no host synchronisation,
          so it runs under `torch.compile(fullgraph=True)` when `generator` is None. TorchDynamo in
          torch 2.13 cannot trace a `torch.Generator` argument: `torch.rand(..., generator=g)`
          inside a compiled region raises "Failed to convert args/kwargs to proxy" with
          `fullgraph=True` (and breaks the graph otherwise). Under compile, seed the global RNG
          with `torch.manual_seed` instead. Compiled code draws with Inductor's own random number
          generator, so for the same seed a compiled selection differs from the eager one, but it
          is reproducible; `torch._inductor.config.fallback_random = True` makes them equal.
        - A `generator` on another device than `weights` (a CPU generator with CUDA weights) is
          honoured: the uniforms are drawn on the generator's device and then moved, so the
          selection depends only on the generator's state.
        - A `(traj,)` tensor `budget` gives each trajectory its own number of draws $b_i$ (e.g.
          `advantage_aware_budgets`): row $i$ keeps its first $b_i$ draws in race order, which is
          a Plackett-Luce sample of size $b_i$; the Selection keeps `slots` slots (static shapes).
        - `inclusion=True` also fills `Selection.inclusion` with the exact first-order inclusion
          probabilities (`inclusion_probabilities(weights, budget, valid=valid)`): Gauss-Legendre
          quadrature in float64, a few hundred ms at 80 x 64 on one CPU core, with a host sync.

    Args:
        weights: `(traj, chunk)` non-negative chunk weights $w_{i,t}$ (e.g. $p_{\phi(i,t)}$);
            they need not sum to one and must carry no gradient.
        budget: chunks to draw per trajectory, $B \ge 1$ (an int), or a `(traj,)` integer
            tensor of per-trajectory budgets $b_i$ in `[0, slots]`.
        slots: the Selection's slot count `k`: defaults to `budget` for an int budget (and must
            be at least it) and to the chunk count `N` for a tensor budget.
        valid: `(traj, chunk)` bool, False at padding. Defaults to all True.
        generator: optional `torch.Generator` for reproducible draws.
        inclusion: also compute the inclusion probabilities into `Selection.inclusion`.
        validate_args: check that valid weights are finite and non-negative and that a tensor
            `budget` lies in `[0, slots]` (one host sync).

    Returns:
        A `Selection` with `slots` slots per trajectory.

    Raises:
        TypeError: if `weights` is not floating point, `valid` not bool, `budget` neither an int
            nor an integer tensor, `slots` not an int, or `generator` not a `torch.Generator`.
        ValueError: if shapes disagree, `budget` or `slots` is not positive, `slots < budget`,
            or (with `validate_args`) a valid weight is negative or not finite or a tensor
            `budget` lies outside `[0, slots]`.

    Examples:
        >>> import torch
        >>> gen = torch.Generator().manual_seed(0)
        >>> weights = torch.tensor([[1.0, 0.1, 0.0, 1.0, 0.5], [0.0, 0.0, 2.0, 0.0, 0.0]])
        >>> sel = plackett_luce_sample(weights, 3, generator=gen)
        >>> sel.mask.tolist()
        [[True, True, True], [True, False, False]]
        >>> sel.indices[1].tolist(), sel.num_chunks.tolist(), sel.chunks_total
        ([2, 0, 0], [5, 5], 5)
    """
    check_tensor(weights, "weights", ndim=2, dtypes="float")
    if slots is not None:
        slots = check_positive_int(slots, "slots")
    budgets = None
    if isinstance(budget, Tensor):
        budgets = budget
        check_tensor(budgets, "budget", ndim=1, dtypes="int")
        check_shape(budgets, "budget", (weights.shape[0],))
        check_same_device(budgets, "budget", weights, "weights")
        k = max(weights.shape[1], 1) if slots is None else slots
        if validate_args and budgets.numel():
            low, high = torch.aminmax(budgets)
            if int(low) < 0 or int(high) > k:
                raise ValueError(
                    f"`budget` must lie in [0, `slots`={k}], got values in "
                    f"[{int(low)}, {int(high)}]."
                )
    else:
        budget = check_positive_int(budget, "budget")
        k = budget if slots is None else slots
        if k < budget:
            raise ValueError(f"`slots` must be at least `budget` ({budget}), got {k}.")
    if valid is not None:
        valid = resolve_valid(valid, weights, ref_name="weights")
    check_generator(generator)
    check_bool(inclusion, "inclusion")
    with torch.no_grad():
        dtype = torch.float64 if weights.dtype == torch.float64 else torch.float32
        w = weights.detach()
        if w.dtype != dtype:
            w = w.to(dtype)
        if valid is not None:
            w = torch.where(valid, w, 0.0)  # padding contents (NaN included) never matter
        if validate_args:
            # `w` is already zero at padding: one unmasked check.
            check_finite_nonnegative(w, "weights", where_desc=" at valid chunks")
        num_traj, n = w.shape
        u = _uniform((num_traj, n), generator, weights, dtype)
        # Exponential race: E = -log(u) ~ Exp(1) and the k largest w / E (the k first clocks to
        # ring) are the Gumbel-top-k keys log w - log E, exponentiated. The key -w / E is < 0
        # exactly for the usable chunks (w > 0); zero, negative (unchecked) and NaN weights give
        # keys >= 0 or NaN, which `topk(largest=False)` ranks last and `ok` flags.
        keys = torch.div(w, u.clamp_min_(torch.finfo(dtype).tiny).log_())
        # With budgets the draw order matters (row i keeps its first b_i draws): sort the top k.
        width = min(k if budgets is not None else budget, n)
        top = torch.topk(keys, width, dim=1, largest=False, sorted=budgets is not None)
        ok = top.values < 0
        if budgets is not None:
            rank = torch.arange(top.indices.shape[1], device=weights.device)
            ok = ok & (rank < budgets.to(weights.device)[:, None])
        if valid is None:
            num_chunks = torch.full((num_traj,), n, dtype=torch.int64, device=weights.device)
        else:
            num_chunks = valid.sum(1)
        selection = _selection_from_picks(top.indices, ok, k, num_chunks, n)
    if inclusion:
        pi = inclusion_probabilities(weights, budget, valid=valid)
        selection = selection.with_inclusion(pi.to(weights.device))
    return selection


def _design_inclusion(
    selection: Selection, take: Tensor, size: Tensor, where: Tensor
) -> Selection:
    """Attach the inclusion probabilities `min(take, size) / size` of a uniform draw at `where`."""
    size = size.to(torch.float64)
    pi = torch.where(where, take.to(torch.float64).minimum(size) / size.clamp_min(1.0), 0.0)
    return selection.with_inclusion(pi)


def stratified_sample(
    phases: Integer[Tensor, "traj chunk"],
    allocation: Integer[Tensor, "traj phase"] | Integer[Tensor, " phase"],
    *,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    generator: torch.Generator | None = None,
) -> Selection:
    r"""Draw a fixed number of chunks uniformly without replacement inside each phase.

    For each trajectory $i$ and phase $c$, draw $\min(b_{i,c}, N_{i,c})$ of the $N_{i,c}$ valid
    chunks of phase $c$ uniformly without replacement. This is the stratified estimator that
    Theorem 1 analyses; with $b_c$ from `chunkmask.pcm.neyman_allocation` it is the
    Neyman-optimal design of Eq. (6) of Anonymous et al. (2026), Probabilistic Chunk Masking,
    arXiv 2605.16154. Inclusion probabilities are $\pi_t = \min(b_c, N_c) / N_c$; the
    returned Selection carries them (`Selection.inclusion`).

    Notes:
        - Counts above a phase's availability are capped at $N_{i,c}$ (the surplus is not moved
          to other phases; give `neyman_allocation` the per-trajectory sizes to avoid that).
        - The width is $k = \max_i \sum_c b_{i,c}$ of the requested allocation, so it is fixed by
          the allocation alone; rows that receive fewer chunks flag their remaining slots.
        - Chunks whose phase id is negative (e.g. `Phase.PAD`) are treated as padding.
        - Synchronises with the host (to read `k` and to check the counts and phase ids).

    Args:
        phases: `(traj, chunk)` integer phase ids in `[0, phase)`; negative ids mark padding.
        allocation: per-phase counts $b_{i,c} \ge 0$, `(traj, phase)` or `(phase,)` shared.
        valid: `(traj, chunk)` bool, False at padding. Defaults to `phases >= 0`.
        generator: optional `torch.Generator` for reproducible draws.

    Returns:
        A `Selection` with `k = max_i sum_c b_{i,c}` slots and `inclusion` filled.

    Raises:
        TypeError: if `phases` or `allocation` is not integer or `valid` not bool.
        ValueError: if shapes disagree, a count is negative, every row's total is 0, or a valid
            chunk has a phase id outside `[0, phase)`.

    Examples:
        >>> import torch
        >>> phases = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, -1]])
        >>> sel = stratified_sample(phases, torch.tensor([1, 2, 0]),
        ...                         generator=torch.Generator().manual_seed(0))
        >>> sel.mask.tolist(), sel.num_chunks.tolist()
        ([[True, True, True], [True, True, True]], [6, 5])
        >>> torch.gather(phases, 1, sel.indices).sort(1).values.tolist()
        [[0, 1, 1], [0, 1, 1]]
    """
    check_tensor(phases, "phases", ndim=2, dtypes="int")
    check_tensor(allocation, "allocation", ndim=(1, 2), dtypes="int")
    check_same_device(allocation, "allocation", phases, "phases")
    check_generator(generator)
    num_traj, n = phases.shape
    if allocation.ndim == 2 and allocation.shape[0] != num_traj:
        raise ValueError(
            f"`allocation` must have shape ({num_traj}, phase) or (phase,), "
            f"got {tuple(allocation.shape)}."
        )
    num_phases = allocation.shape[-1]
    if num_phases == 0:
        raise ValueError(
            f"`allocation` must have at least one phase (a non-empty last axis), got shape "
            f"{tuple(allocation.shape)}."
        )
    alloc = allocation.to(torch.int64).expand(num_traj, num_phases)
    if bool((alloc < 0).any()):
        raise ValueError(f"`allocation` must be >= 0, got a minimum of {int(alloc.min())}.")
    if valid is None:
        valid = phases >= 0
    else:
        valid = resolve_valid(valid, phases, ref_name="phases") & (phases >= 0)
    bad = valid & (phases >= num_phases)
    if bool(bad.any()):
        raise ValueError(
            f"`phases` must lie in [0, {num_phases}) (the size of `allocation`'s last axis) at "
            f"valid chunks, got a maximum of {int(phases[valid].max())}."
        )
    k = int(alloc.sum(1).max()) if num_traj > 0 else 0
    if k <= 0:
        raise ValueError("`allocation` must request at least one chunk in some trajectory.")
    phase = torch.where(valid, phases.to(torch.int64), num_phases)  # padding -> extra phase
    u = _uniform((num_traj, n), generator, phases, torch.float64)
    # A random shuffle, then a stable sort by phase: each phase's chunks lie together, in a
    # uniformly random order (no float key `phase + u`, whose rounding could mix phases).
    shuffle = torch.argsort(u, dim=1)
    by_phase = torch.sort(torch.gather(phase, 1, shuffle), dim=1, stable=True).indices
    order = torch.gather(shuffle, 1, by_phase)
    sorted_phase = torch.gather(phase, 1, order)
    sizes = torch.zeros(num_traj, num_phases + 1, dtype=torch.int64, device=phases.device)
    sizes.scatter_add_(1, phase, torch.ones_like(phase))
    starts = torch.cumsum(sizes, dim=1) - sizes
    rank = torch.arange(n, device=phases.device) - torch.gather(starts, 1, sorted_phase)
    quota = torch.cat([alloc, torch.zeros_like(alloc[:, :1])], dim=1)
    chosen_sorted = rank < torch.gather(quota, 1, sorted_phase)
    chosen = torch.zeros_like(valid).scatter(1, order, chosen_sorted)
    selection = Selection.from_mask(chosen, valid, k=k)
    take = torch.gather(quota, 1, phase)
    return _design_inclusion(selection, take, torch.gather(sizes, 1, phase), valid)


def uniform_sample(
    valid: Bool[Tensor, "traj chunk"],
    budget: int,
    *,
    generator: torch.Generator | None = None,
) -> Selection:
    r"""Draw `budget` valid chunks per trajectory uniformly without replacement (random masking).

    $$
    P(S) = \binom{T_i}{B}^{-1}, \qquad |S| = \min(B, T_i), \qquad
    \pi_{i,t} = \frac{\min(B, T_i)}{T_i},
    $$

    the "random masking" ablation (RQ4) of Anonymous et al. (2026), Probabilistic Chunk Masking,
    arXiv 2605.16154: Eq. (10) with equal weights.

    Args:
        valid: `(traj, chunk)` bool, False at padding.
        budget: chunks per trajectory `B` (>= 1), also the slot count; rows with fewer valid
            chunks take all of them.
        generator: optional `torch.Generator`.

    Returns:
        A `Selection` with `budget` slots and `inclusion` filled.

    Raises:
        TypeError: if `valid` is not bool or `budget` not an int.
        ValueError: if `valid` is not 2-D or `budget <= 0`.

    Examples:
        >>> import torch
        >>> valid = torch.tensor([[True, True, True, True], [True, False, False, False]])
        >>> sel = uniform_sample(valid, 2, generator=torch.Generator().manual_seed(0))
        >>> sel.counts.tolist(), sel.num_chunks.tolist()
        ([2, 1], [4, 1])
    """
    check_tensor(valid, "valid", ndim=2, dtypes="bool")
    weights = torch.ones(valid.shape, dtype=torch.float32, device=valid.device)
    selection = plackett_luce_sample(
        weights, budget, valid=valid, generator=generator, validate_args=False
    )
    take = torch.full_like(selection.num_chunks, selection.k)
    return _design_inclusion(selection, take[:, None], selection.num_chunks[:, None], valid)


def top_phase_sample(
    phases: Integer[Tensor, "traj chunk"],
    scores: Real[Tensor, " phase"] | Real[Tensor, "traj phase"],
    budget: int,
    *,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    generator: torch.Generator | None = None,
    validate_args: bool = False,
) -> Selection:
    r"""Draw `budget` chunks uniformly from the single highest-scoring phase present in each trajectory.

    $$
    c_i^\star = \arg\max_{c \,:\, N_{i,c} > 0} V_c, \qquad
    S_i \sim \mathrm{Uniform}\Bigl(\tbinom{\{t : \phi(i,t) = c_i^\star\}}{\min(B, N_{i,c^\star})}\Bigr),
    \qquad \pi_{i,t} = \frac{\min(B, N_{i,c^\star})}{N_{i,c^\star}} [\phi(i,t) = c_i^\star]
    $$

    The "full masking" ablation (RQ4) of Anonymous et al. (2026), Probabilistic Chunk Masking,
    arXiv 2605.16154, which trains only on the most outcome-divergent phase. If that phase holds
    fewer than `budget` chunks, all of them are taken and the other slots are flagged: the budget
    is not topped up from other phases. The Selection carries the inclusion probabilities above
    (0 outside the top phase, so a Horvitz-Thompson estimate from it is not unbiased).

    Notes:
        - Ties between phase scores go to the lower phase id. NaN scores are rejected; a score of
          $-\infty$ ranks like the lowest finite score, so such a phase is chosen only when no
          present phase scores higher.
        - Negative phase ids (e.g. `Phase.PAD`) are treated as padding.

    Args:
        phases: `(traj, chunk)` integer phase ids in `[0, phase)`.
        scores: per-phase scores $V_c$, `(phase,)` shared or `(traj, phase)`.
        budget: chunks per trajectory `B` (>= 1), also the slot count.
        valid: `(traj, chunk)` bool, False at padding. Defaults to `phases >= 0`.
        generator: optional `torch.Generator`.
        validate_args: check that no score is NaN and that valid phase ids are in range (one
            host sync). Without it, valid chunks with an out-of-range id are never drawn.

    Returns:
        A `Selection` with `budget` slots and `inclusion` filled.

    Raises:
        TypeError: if `phases` is not integer, `scores` not real, `valid` not bool or `budget`
            not an int.
        ValueError: if shapes disagree, `budget <= 0`, or (with `validate_args`) a score is NaN
            or a valid chunk has a phase id outside `[0, phase)`.

    Examples:
        >>> import torch
        >>> phases = torch.tensor([[0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1]])
        >>> scores = torch.tensor([0.1, 0.3, 0.9])
        >>> sel = top_phase_sample(phases, scores, 2, generator=torch.Generator().manual_seed(0))
        >>> torch.gather(phases, 1, sel.indices).tolist()  # phase 2 absent from row 1
        [[2, 2], [1, 1]]
    """
    check_tensor(phases, "phases", ndim=2, dtypes="int")
    check_tensor(scores, "scores", ndim=(1, 2), dtypes=("int", "float"))
    check_same_device(scores, "scores", phases, "phases")
    budget = check_positive_int(budget, "budget")
    num_traj, n = phases.shape
    if scores.ndim == 2 and scores.shape[0] != num_traj:
        raise ValueError(
            f"`scores` must have shape ({num_traj}, phase) or (phase,), got {tuple(scores.shape)}."
        )
    num_phases = scores.shape[-1]
    if num_phases == 0:
        raise ValueError(
            f"`scores` must have at least one phase (a non-empty last axis), got shape "
            f"{tuple(scores.shape)}."
        )
    if validate_args and bool(torch.isnan(scores).any()):
        raise ValueError("`scores` must not contain NaN.")
    if valid is None:
        valid = phases >= 0
    else:
        valid = resolve_valid(valid, phases, ref_name="phases") & (phases >= 0)
    if validate_args:
        bad = valid & (phases >= num_phases)
        if bool(bad.any()):
            raise ValueError(
                f"`phases` must lie in [0, {num_phases}) (the size of `scores`' last axis) at "
                f"valid chunks, got a maximum of {int(phases[valid].max())}."
            )
    phase = torch.where(valid & (phases < num_phases), phases.to(torch.int64), num_phases)
    present = torch.zeros(num_traj, num_phases + 1, dtype=torch.bool, device=phases.device)
    present = present.scatter(1, phase, True)[:, :num_phases]
    # -inf scores become the lowest finite value so that any present phase beats an absent one;
    # argmax returns the first (lowest) maximiser.
    s = scores.to(torch.float64).clamp_min(-torch.finfo(torch.float64).max)
    key = torch.where(present, s.expand(num_traj, num_phases), float("-inf"))
    top = torch.argmax(key, dim=1)
    in_top = valid & (phase == top[:, None])
    weights = in_top.to(torch.float32)
    selection = plackett_luce_sample(
        weights, budget, valid=valid, generator=generator, validate_args=False
    )
    take = torch.full((num_traj, 1), budget, dtype=torch.int64, device=phases.device)
    return _design_inclusion(selection, take, in_top.sum(1, keepdim=True), in_top)


def topk_sample(
    scores: Real[Tensor, "traj chunk"],
    budget: int,
    *,
    valid: Bool[Tensor, "traj chunk"] | None = None,
    validate_args: bool = False,
) -> Selection:
    r"""Keep the `budget` valid chunks with the highest score in each trajectory (deterministic).

    $$
    S_i = \operatorname{top-}B_{\,t \,:\, \text{valid}}\; h_{i,t}
    $$

    For example $h$ = the policy entropy of each chunk: the entropy top-k baseline of Appendix C
    of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154.

    Notes:
        - Ties are broken towards the lower chunk index, so the result is deterministic. Any
          valid chunk, including one scoring $-\infty$, ranks above padding.
        - NaN scores at valid chunks are rejected.
        - A deterministic rule has no inclusion probabilities: `Selection.inclusion` is None.

    Args:
        scores: `(traj, chunk)` per-chunk scores $h_{i,t}$.
        budget: chunks per trajectory `B` (>= 1), also the slot count; rows with fewer valid
            chunks take all.
        valid: `(traj, chunk)` bool, False at padding. Defaults to all True.
        validate_args: check that no valid score is NaN (one host sync).

    Returns:
        A `Selection` with `budget` slots.

    Raises:
        TypeError: if `scores` is not real, `valid` not bool, or `budget` not an int.
        ValueError: if shapes disagree, `budget <= 0`, or (with `validate_args`) a valid score is
            NaN.

    Examples:
        >>> import torch
        >>> scores = torch.tensor([[0.5, 2.0, 2.0, 1.0], [3.0, 0.0, 1.0, 1.0]])
        >>> topk_sample(scores, 2).indices.tolist()
        [[1, 2], [0, 2]]
    """
    check_tensor(scores, "scores", ndim=2, dtypes=("int", "float"))
    k = check_positive_int(budget, "budget")
    valid = resolve_valid(valid, scores, ref_name="scores")
    if validate_args and bool((valid & torch.isnan(scores)).any()):
        raise ValueError("`scores` must not be NaN at valid chunks.")
    n = scores.shape[1]
    s = scores.to(torch.float64)
    # Stable sorts: by score (descending, ties keep index order), then valid chunks first.
    by_score = torch.sort(torch.where(valid, s, 0.0), dim=1, descending=True, stable=True).indices
    valid_sorted = torch.gather(valid, 1, by_score)
    by_valid = torch.sort((~valid_sorted).to(torch.int8), dim=1, stable=True).indices
    order = torch.gather(by_score, 1, by_valid)
    width = min(k, n)
    picks = order[:, :width]
    ok = torch.arange(width, device=scores.device) < valid.sum(1, keepdim=True)
    return _selection_from_picks(picks, ok, k, valid.sum(1), n)
