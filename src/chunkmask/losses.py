"""Policy-gradient losses for GRPO on a masked (packed) batch of action chunks.

Three layers, each usable alone:

- `clipped_surrogate`: the per-token clipped importance-ratio surrogate of Eq. (2), with
  asymmetric ("clip-higher", DAPO) bounds and an optional dual clip.
- `aggregate_loss`: verl's four ways of reducing a `(rows, token)` loss matrix to a scalar, with
  an optional `segment` map so that several rows (the selected chunks of one trajectory) form a
  single sequence.
- `masked_grpo_loss`: the masked objective of Eq. (11) on a packed batch of selected chunks,
  plus entropy and KL terms and 0-d diagnostics, with a Horvitz-Thompson option.

Every reduction sanitises masked entries with `torch.where` before arithmetic, so NaN/Inf in
padding never reaches the outputs or the gradients, and fully masked inputs give a zero loss
with finite gradients.
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_option,
    check_range,
    check_real,
    check_same_device,
    check_same_shape,
    check_shape,
    check_tensor,
)
from chunkmask.selection import Selection

__all__ = [
    "AGGREGATION_MODES",
    "GRPOLossOutput",
    "SurrogateOutput",
    "aggregate_loss",
    "clipped_surrogate",
    "masked_grpo_loss",
]

AggregationMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
AGGREGATION_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
"""The loss aggregation modes accepted by `aggregate_loss` and `masked_grpo_loss` (verl's names)."""

_ESTIMATORS = ("masked", "horvitz_thompson")
_KL_TYPES = ("k1", "k2", "k3")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half/bfloat16/float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


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


class GRPOLossOutput(NamedTuple):
    r"""Result of `masked_grpo_loss`; every field is a 0-d tensor (no host sync).

    Attributes:
        loss: the total loss to minimise,
            `policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss`.
        policy_loss: the aggregated clipped surrogate (Eq. 11).
        entropy_loss: the aggregated per-token entropy (0 when no entropy is given).
        kl_loss: the aggregated per-token KL estimate to the reference policy (0 when no
            `ref_logp` is given).
        clip_frac_low: detached fraction of valid tokens where the lower clip is active.
        clip_frac_high: detached fraction of valid tokens where the upper clip is active.
            `clip_frac_low + clip_frac_high` is verl's `pg_clipfrac`.
        dual_clip_frac: detached fraction of valid tokens where the dual clip is active (verl's
            `pg_clipfrac_lower`).
        approx_kl: detached mean over valid tokens of $-(\log\pi - \log\pi_{old})$ (clamped like
            the ratio), verl's `ppo_kl`.
    """

    loss: Tensor
    policy_loss: Tensor
    entropy_loss: Tensor
    kl_loss: Tensor
    clip_frac_low: Tensor
    clip_frac_high: Tensor
    dual_clip_frac: Tensor
    approx_kl: Tensor


def _check_clip_args(
    clip_low: float, clip_high: float, dual_clip: float | None, log_ratio_clamp: float
) -> tuple[float, float, float | None, float]:
    clip_low = check_range(clip_low, "clip_low", low=0.0, high=1.0)
    clip_high = check_range(clip_high, "clip_high", low=0.0)
    if dual_clip is not None:
        dual_clip = check_range(dual_clip, "dual_clip", low=1.0, low_open=True)
    log_ratio_clamp = check_range(log_ratio_clamp, "log_ratio_clamp", low=0.0, low_open=True)
    return clip_low, clip_high, dual_clip, log_ratio_clamp


def _broadcast_advantages(
    advantages: Tensor, ref: Tensor, name: str = "advantages", ref_name: str = "logp"
) -> Tensor:
    """Append singleton axes so `advantages` (a leading-prefix shape of `ref`) broadcasts."""
    if advantages.ndim > ref.ndim or advantages.shape != ref.shape[: advantages.ndim]:
        raise ValueError(
            f"`{name}` must have the shape of `{ref_name}` {tuple(ref.shape)} or a leading part "
            "of it, "
            f"got {tuple(advantages.shape)}."
        )
    return advantages.reshape(advantages.shape + (1,) * (ref.ndim - advantages.ndim))


def clipped_surrogate(
    logp: Float[Tensor, "*batch"],
    old_logp: Float[Tensor, "*batch"],
    advantages: Float[Tensor, "*adv"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
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
            (e.g. `(packed,)` against `(packed, token)`), broadcast along the trailing axes.
        clip_low: $\varepsilon_{low}$ in `[0, 1]`.
        clip_high: $\varepsilon_{high} \ge 0$.
        dual_clip: the dual-clip constant $c > 1$, or None to disable it.
        log_ratio_clamp: $\kappa > 0$, the clamp on the log ratio before `exp` (verl: 20).

    Returns:
        A `SurrogateOutput` of per-token tensors, each of the shape of `logp`.

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: if shapes do not match, `clip_low` is outside `[0, 1]`, `clip_high < 0`,
            `dual_clip <= 1` or `log_ratio_clamp <= 0`.

    Examples:
        >>> import torch
        >>> logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
        >>> out = clipped_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]))
        >>> out.loss, out.clipped_high
        (tensor([[-1.2800, -0.5000, -1.0000]]), tensor([[ True, False, False]]))
    """
    check_tensor(logp, "logp", dtypes="float")
    check_tensor(old_logp, "old_logp", dtypes="float")
    check_tensor(advantages, "advantages", dtypes="float")
    check_same_shape(old_logp, "old_logp", logp, "logp")
    clip_low, clip_high, dual_clip, log_ratio_clamp = _check_clip_args(
        clip_low, clip_high, dual_clip, log_ratio_clamp
    )
    adv = _broadcast_advantages(advantages, logp)
    dtype = _compute_dtype(torch.promote_types(logp.dtype, advantages.dtype))
    return _surrogate(
        logp.to(dtype),
        old_logp.to(dtype),
        adv.to(dtype),
        clip_low,
        clip_high,
        dual_clip,
        log_ratio_clamp,
    )


def _surrogate(
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


def _as_scalar_tensor(value: float | int | Tensor, name: str, ref: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        check_tensor(value, name, ndim=0, dtypes=("float", "int"))
        return value.to(device=ref.device, dtype=ref.dtype)
    value = check_real(value, name)
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    return torch.tensor(value, dtype=ref.dtype, device=ref.device)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """`num / den` where `den > 0`, else 0; the double where keeps gradients finite."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def aggregate_loss(
    loss: Float[Tensor, "rows token"],
    mask: Bool[Tensor, "rows token"] | None = None,
    mode: AggregationMode = "token-mean",
    *,
    segment: Int[Tensor, " rows"] | None = None,
    num_segments: int | None = None,
    norm: float | int | Real[Tensor, ""] | Real[Tensor, " seq"] | None = None,
    weights: Float[Tensor, " rows"] | Float[Tensor, "rows token"] | None = None,
) -> Float[Tensor, ""]:
    r"""Reduce a `(rows, token)` loss matrix to a scalar in one of verl's aggregation modes.

    With $m_{jt}$ the mask, $w_{jt}$ the optional weights, $\ell_{jt}$ the loss, sequence $s$
    made of the rows $j$ with `segment[j] == s` (each row is its own sequence when `segment` is
    None), $S_s = \sum_{j \in s}\sum_t m_{jt} w_{jt} \ell_{jt}$ its weighted token sum and
    $n_s = \sum_{j \in s}\sum_t m_{jt}$ its token count:

    $$
    \text{token-mean} = \frac{\sum_s S_s}{D},\qquad
    \text{seq-mean-token-mean} = \frac{1}{|\{s: D_s > 0\}|}\sum_{s: D_s > 0}\frac{S_s}{D_s},
    $$
    $$
    \text{seq-mean-token-sum} = \frac{\sum_s S_s}{G},\qquad
    \text{seq-mean-token-sum-norm} = \frac{\sum_s S_s}{L}.
    $$

    `norm` replaces the divisor of the mode, whose defaults are: $D = \sum_s n_s$ (all valid
    tokens), $D_s = n_s$ (per sequence; sequences with $D_s = 0$ do not count),
    $G = |\{s : n_s > 0\}|$ (non-empty sequences) and $L$ = `loss.shape[-1]` (verl's constant
    "max response length" divisor of Dr. GRPO, arXiv 2503.20783; note verl does not divide by
    the number of sequences in this mode).

    These are verl's `agg_loss` modes (`verl/trainer/ppo/core_algos.py`) and agree with it
    whenever every row is a sequence with at least one valid token. They differ on empty
    sequences: verl's seq-mean modes average over all rows, so an empty row yields NaN in
    seq-mean-token-mean and counts as a zero in seq-mean-token-sum; here an empty sequence
    contributes 0 and is left out of the count. A fully masked input returns 0 with finite
    (zero) gradients.

    Computed in float32 (float64 for float64 `loss`).

    Args:
        loss: `(rows, token)` per-token loss.
        mask: `(rows, token)` bool, True for valid tokens. Defaults to all True.
        mode: one of `AGGREGATION_MODES`.
        segment: `(rows,)` int64 sequence id of each row, in `[0, num_segments)` (e.g.
            `Selection.packed_traj_index`); None makes every row its own sequence.
        num_segments: number of sequences when `segment` is given; None reads
            `segment.max() + 1` (one host sync).
        norm: divisor overriding the mode's default, see above: a number or 0-d tensor for
            token-mean, seq-mean-token-sum and seq-mean-token-sum-norm; a `(num_segments,)`
            (or `(rows,)` without `segment`) tensor of per-sequence divisors for
            seq-mean-token-mean. A divisor of 0 gives 0.
        weights: `(rows,)` or `(rows, token)` non-negative weights multiplying each valid token's
            loss in the numerator only (e.g. Horvitz-Thompson weights $1/\pi$).

    Returns:
        The aggregated 0-d loss.

    Raises:
        TypeError: on a non-floating `loss`/`weights`/`norm`, a non-bool `mask` or a non-integer
            `segment`.
        ValueError: on an unknown `mode`, mismatched shapes, a negative number `norm`, or
            `num_segments` without `segment`.

    Examples:
        >>> import torch
        >>> loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> for mode in AGGREGATION_MODES:
        ...     print(mode, round(aggregate_loss(loss, mask, mode).item(), 4))
        token-mean 2.5
        seq-mean-token-mean 3.0
        seq-mean-token-sum 5.0
        seq-mean-token-sum-norm 3.3333
        >>> seg = torch.tensor([0, 0])  # both rows form one sequence
        >>> aggregate_loss(loss, mask, "seq-mean-token-sum", segment=seg, num_segments=1)
        tensor(10.)
    """
    check_tensor(loss, "loss", ndim=2, dtypes="float")
    check_option(mode, "mode", AGGREGATION_MODES)
    if mask is None:
        mask = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    else:
        check_tensor(mask, "mask", dtypes="bool")
        check_same_shape(mask, "mask", loss, "loss")
        check_same_device(mask, "mask", loss, "loss")
    dtype = _compute_dtype(loss.dtype)
    rows = loss.shape[0]
    x = loss.to(dtype)
    if weights is not None:
        check_tensor(weights, "weights", ndim=(1, 2), dtypes="float")
        w = _broadcast_advantages(weights, loss, "weights", "loss").to(dtype)
        x = torch.where(mask, x, 0.0) * torch.where(mask, w, 0.0)
    values = torch.where(mask, x, 0.0)
    row_sum = values.sum(dim=-1)
    row_count = mask.sum(dim=-1).to(dtype)

    if segment is None:
        if num_segments is not None:
            raise ValueError("`num_segments` is only used with `segment`, got `segment=None`.")
        seq_sum, seq_count, n_seq = row_sum, row_count, rows
    else:
        check_tensor(segment, "segment", ndim=1, dtypes="int")
        check_shape(segment, "segment", (rows,))
        check_same_device(segment, "segment", loss, "loss")
        if num_segments is None:
            num_segments = int(segment.max()) + 1 if rows > 0 else 0
        if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
            raise ValueError(f"`num_segments` must be an int >= 0, got {num_segments!r}.")
        n_seq = num_segments
        seg = segment.to(torch.int64)
        zeros = torch.zeros(n_seq, dtype=dtype, device=loss.device)
        seq_sum = zeros.index_add(0, seg, row_sum)
        seq_count = zeros.index_add(0, seg, row_count)

    total = seq_sum.sum()
    if mode == "seq-mean-token-mean":
        if norm is None:
            den = seq_count
        else:
            check_tensor(norm, "norm", ndim=1, dtypes=("float", "int"))
            check_shape(norm, "norm", (n_seq,))
            den = norm.to(device=loss.device, dtype=dtype)
        present = den > 0
        per_seq = _safe_div(seq_sum, den)
        return per_seq.sum() / present.sum().clamp_min(1).to(dtype)
    if norm is not None:
        den = _as_scalar_tensor(norm, "norm", total)
    elif mode == "token-mean":
        den = seq_count.sum()
    elif mode == "seq-mean-token-sum":
        den = (seq_count > 0).sum().to(dtype)
    else:
        den = torch.tensor(float(loss.shape[-1]), dtype=dtype, device=loss.device)
    return _safe_div(total, den)


def _kl_estimate(logp: Tensor, ref_logp: Tensor, kl_type: str) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate (Schulman's k1/k2/k3)."""
    if kl_type == "k1":
        return logp - ref_logp
    if kl_type == "k2":
        return 0.5 * (logp - ref_logp).square()
    log_ratio = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)


def masked_grpo_loss(
    logp: Float[Tensor, " packed"] | Float[Tensor, "packed token"],
    old_logp: Float[Tensor, " packed"] | Float[Tensor, "packed token"],
    advantages: Float[Tensor, " packed"] | Float[Tensor, "packed token"],
    selection: Selection,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "packed token"] | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    loss_agg_mode: AggregationMode = "seq-mean-token-mean",
    estimator: Literal["masked", "horvitz_thompson"] = "masked",
    inclusion: Float[Tensor, " packed"] | None = None,
    entropy: Float[Tensor, " packed"] | Float[Tensor, "packed token"] | None = None,
    entropy_coef: float = 0.0,
    ref_logp: Float[Tensor, " packed"] | Float[Tensor, "packed token"] | None = None,
    kl_coef: float = 0.0,
    kl_type: Literal["k1", "k2", "k3"] = "k3",
    validate_args: bool = False,
) -> GRPOLossOutput:
    r"""GRPO loss on a packed batch of selected chunks (the masked objective of Eq. 11).

    $$
    J_{mask} = \frac{1}{G}\sum_{i} \frac{1}{|S_i|}\sum_{t \in S_i} L_{i,t},
    $$

    where $S_i$ is the set of selected chunks of trajectory $i$ (their valid tokens, in token
    modes), $L_{i,t}$ the clipped surrogate of Eq. (2) (`clipped_surrogate`) and $G$ the number
    of trajectories with at least one selected valid token. See Eq. (11) of Anonymous et al.
    (2026), Probabilistic Chunk Masking, arXiv 2605.16154. The displayed form is the
    `seq-mean-token-mean` mode; every verl mode is available through `aggregate_loss` with
    `segment = selection.packed_traj_index(size=M)`, so the sequences are trajectories:

    - `token-mean`: sum over all selected valid tokens / their number.
    - `seq-mean-token-mean`: per trajectory, mean over its selected valid tokens; then the mean
      over the $G$ trajectories that have any.
    - `seq-mean-token-sum`: per trajectory, sum over its selected valid tokens; mean over $G$.
    - `seq-mean-token-sum-norm`: sum over all selected valid tokens / (`selection.k` $\cdot K$),
      the padded length of the packed trajectories ($K$ = tokens per chunk).

    Trajectories with no selected valid token do not count in $G$. With every chunk selected
    (`Selection.from_mask(valid)`, whose `k` is the padded chunk count $N$) the loss equals the
    full-batch chunk-level GRPO loss with one row per trajectory, in every mode.

    **Horvitz-Thompson** (`estimator="horvitz_thompson"`): each selected chunk's tokens are
    weighted by $1/\pi_{i,t}$ (`inclusion`, detached) and the divisors are the full,
    selection-independent lengths, with $T_i$ = `selection.num_chunks`:

    - `token-mean`: $\sum_{i,t\in S_i,k} \ell/\pi_{i,t}$ divided by $K\sum_i T_i$;
    - `seq-mean-token-mean`: per trajectory divided by $K T_i$, averaged over the
      $G = |\{i: T_i > 0\}|$ trajectories;
    - `seq-mean-token-sum`: per-trajectory weighted sums averaged over $G = |\{i: T_i > 0\}|$;
    - `seq-mean-token-sum-norm`: weighted sum divided by $N K$ ($N$ = `selection.chunks_total`).

    Its expectation over the selection is the full-batch loss exactly in the two `token-sum`
    modes, and in the two `token-mean` modes whenever every token of a valid chunk is valid (the
    full-length divisor counts $K$ tokens per chunk).

    The total is `policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss`; entropy and KL
    are aggregated in the same mode with the same estimator. KL estimators (Schulman 2020), with
    $\delta = \log\pi_{ref} - \log\pi_\theta$: k1 $= -\delta$, k2 $= \delta^2/2$, k3
    $= e^{\delta} - \delta - 1$ with $\delta$ clamped to $\pm 20$ and the result to $\pm 10$
    (verl's `low_var_kl`).

    Computation is in float32 (float64 for float64 `logp`); masked tokens are replaced by zeros
    before any arithmetic, so padding (even NaN) never reaches outputs or gradients.

    Args:
        logp: `(M, K)` current log-probabilities of the packed selected chunks' tokens, or
            `(M,)` for one log-probability per chunk. `M` is the packed size, in the packed
            order of `selection`.
        old_logp: behaviour log-probabilities, shape of `logp`.
        advantages: `(M,)` per-chunk advantages (broadcast over tokens) or per-token, shape of
            `logp`.
        selection: the `Selection` the batch was packed with.
        mask: bool, shape of `logp`, True for valid tokens. Defaults to all True.
        clip_low: $\varepsilon_{low}$ in `[0, 1]`.
        clip_high: $\varepsilon_{high} \ge 0$ (DAPO clip-higher).
        dual_clip: dual-clip constant $c > 1$, or None.
        loss_agg_mode: one of `AGGREGATION_MODES`.
        estimator: `"masked"` (Eq. 11, biased by design) or `"horvitz_thompson"` (unbiased).
        inclusion: `(M,)` inclusion probabilities $\pi$ in `(0, 1]` of the packed chunks;
            required for Horvitz-Thompson, ignored otherwise.
        entropy: per-token policy entropy, shape of `logp`, or None.
        entropy_coef: entropy bonus coefficient (requires `entropy` when non-zero).
        ref_logp: reference-policy log-probabilities, shape of `logp`, or None.
        kl_coef: KL penalty coefficient (requires `ref_logp` when non-zero).
        kl_type: `"k1"`, `"k2"` or `"k3"`.
        validate_args: also run value checks that synchronise with the device: `M` equals the
            number of selected chunks, valid inputs are finite, `inclusion` lies in `(0, 1]`.

    Returns:
        A `GRPOLossOutput` of 0-d tensors.

    Raises:
        TypeError: on a wrong tensor dtype or a `selection` that is not a `Selection`.
        ValueError: on mismatched shapes or devices, unknown option strings, invalid clip values, a
            missing `inclusion`/`entropy`/`ref_logp` that is needed, or (with `validate_args`)
            failed value checks.

    Examples:
        >>> import torch
        >>> from chunkmask.selection import Selection
        >>> sel = Selection.from_mask(torch.tensor([[True, False, True], [False, True, False]]))
        >>> logp = torch.zeros(3, 2, requires_grad=True)  # 3 packed chunks, 2 tokens each
        >>> adv = torch.tensor([1.0, 1.0, -2.0])
        >>> out = masked_grpo_loss(logp, logp.detach(), adv, sel)
        >>> round(out.loss.item(), 4)  # trajectory means -1 and 2, averaged
        0.5
    """
    for value, name in ((logp, "logp"), (old_logp, "old_logp")):
        check_tensor(value, name, ndim=(1, 2), dtypes="float")
    check_same_shape(old_logp, "old_logp", logp, "logp")
    check_same_device(old_logp, "old_logp", logp, "logp")
    if not isinstance(selection, Selection):
        raise TypeError(f"`selection` must be a Selection, got {type(selection).__name__}.")
    check_tensor(advantages, "advantages", dtypes="float")
    check_same_device(advantages, "advantages", logp, "logp")
    check_same_device(selection.mask, "selection", logp, "logp")
    check_option(loss_agg_mode, "loss_agg_mode", AGGREGATION_MODES)
    check_option(estimator, "estimator", _ESTIMATORS)
    check_option(kl_type, "kl_type", _KL_TYPES)
    clip_low, clip_high, dual_clip, _ = _check_clip_args(clip_low, clip_high, dual_clip, 20.0)
    entropy_coef = check_real(entropy_coef, "entropy_coef")
    kl_coef = check_real(kl_coef, "kl_coef")
    packed = logp.shape[0]
    adv = _broadcast_advantages(advantages, logp)
    if mask is None:
        mask = torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    else:
        check_tensor(mask, "mask", dtypes="bool")
        check_same_shape(mask, "mask", logp, "logp")
        check_same_device(mask, "mask", logp, "logp")
    for value, name in ((entropy, "entropy"), (ref_logp, "ref_logp")):
        if value is not None:
            check_tensor(value, name, dtypes="float")
            check_same_shape(value, name, logp, "logp")
            check_same_device(value, name, logp, "logp")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(
            f"`entropy` is required when `entropy_coef` is non-zero, got {entropy_coef}."
        )
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"`ref_logp` is required when `kl_coef` is non-zero, got {kl_coef}.")
    horvitz_thompson = estimator == "horvitz_thompson"
    if horvitz_thompson:
        if inclusion is None:
            raise ValueError(
                "`inclusion` is required when `estimator='horvitz_thompson'`, got None."
            )
        check_tensor(inclusion, "inclusion", ndim=1, dtypes="float")
        check_shape(inclusion, "inclusion", (packed,))
        check_same_device(inclusion, "inclusion", logp, "logp")
    if validate_args:
        selected = int(selection.mask.sum())
        if selected != packed:
            raise ValueError(
                f"`logp` must have one row per selected chunk ({selected}), got {packed} rows."
            )
        for value, name in (
            (logp, "logp"),
            (old_logp, "old_logp"),
            (entropy, "entropy"),
            (ref_logp, "ref_logp"),
        ):
            if value is not None:
                check_finite(value, name, where=mask)
        check_finite(adv.expand(logp.shape), "advantages", where=mask)
        if horvitz_thompson:
            bad = ~((inclusion > 0) & (inclusion <= 1))
            if bool(bad.any()):
                raise ValueError(
                    f"`inclusion` must lie in (0, 1], got {int(bad.sum())} value(s) outside it."
                )

    # One row per chunk, tokens on the last axis.
    if logp.ndim == 1:
        logp, old_logp, adv, mask = logp[:, None], old_logp[:, None], adv[:, None], mask[:, None]
        entropy = None if entropy is None else entropy[:, None]
        ref_logp = None if ref_logp is None else ref_logp[:, None]
    tokens = logp.shape[1]
    dtype = _compute_dtype(logp.dtype)

    def clean(x: Tensor) -> Tensor:
        return torch.where(mask, x.to(dtype), 0.0)

    lp = clean(logp)
    out = _surrogate(lp, clean(old_logp), clean(adv), clip_low, clip_high, dual_clip, 20.0)

    segment = selection.packed_traj_index(size=packed)
    if selection.num_traj > 0:
        segment = segment.clamp_max(selection.num_traj - 1)
    weights = None
    norm: Tensor | float | None = None
    if horvitz_thompson:
        pi = inclusion.detach().to(dtype)
        ok = pi > 0
        weights = torch.where(ok, 1.0 / torch.where(ok, pi, 1.0), 0.0)
        full = selection.num_chunks.to(dtype)
        if loss_agg_mode == "token-mean":
            norm = full.sum() * tokens
        elif loss_agg_mode == "seq-mean-token-mean":
            norm = full * tokens
        elif loss_agg_mode == "seq-mean-token-sum":
            norm = (selection.num_chunks > 0).sum().to(dtype)
        else:
            norm = float(selection.chunks_total * tokens)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        norm = float(selection.k * tokens)

    def agg(values: Tensor) -> Tensor:
        return aggregate_loss(
            values,
            mask,
            loss_agg_mode,
            segment=segment,
            num_segments=selection.num_traj,
            norm=norm,
            weights=weights,
        )

    zero = lp.new_zeros(())
    policy_loss = agg(out.loss)
    entropy_loss = zero if entropy is None else agg(clean(entropy))
    kl_loss = zero if ref_logp is None else agg(_kl_estimate(lp, clean(ref_logp), kl_type))
    total = policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss

    count = mask.sum().clamp_min(1).to(dtype)

    def frac(flags: Tensor) -> Tensor:
        return (mask & flags).sum().to(dtype) / count

    with torch.no_grad():
        log_ratio = torch.clamp(lp - clean(old_logp), -20.0, 20.0)
        approx_kl = torch.where(mask, -log_ratio, 0.0).sum() / count
        clip_frac_low = frac(out.clipped_low)
        clip_frac_high = frac(out.clipped_high)
        dual_clip_frac = frac(out.dual_clipped)
    return GRPOLossOutput(
        total,
        policy_loss,
        entropy_loss,
        kl_loss,
        clip_frac_low,
        clip_frac_high,
        dual_clip_frac,
        approx_kl,
    )
