r"""Clipped policy-gradient losses: the masked GRPO objective (Eq. 11) and chunk-level PPO.

Both are one computation: the clipped surrogate of Eq. (2) per token (`clipped_surrogate`),
reduced by `aggregate_loss` with trajectories as the sequences. They differ only in what a token
is (an action token for GRPO on a VLA, a whole chunk's log-probability for chunk-level PPO) and
in their default aggregation mode, so both call `_policy_loss`.
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_option,
    check_real,
    check_same_device,
    check_same_shape,
    check_shape,
    check_tensor,
    values_checkable,
)
from chunkmask.aggregation import (
    AGGREGATION_MODES,
    AggregationMode,
    Normalizer,
    aggregate_loss,
    compute_dtype,
)
from chunkmask.losses._layout import resolve_layout
from chunkmask.losses.surrogate import (
    KL_TYPES,
    broadcast_advantages,
    check_clip_args,
    kl_estimate,
    surrogate,
)
from chunkmask.selection import Selection

__all__ = ["ESTIMATORS", "PolicyLossOutput", "chunked_ppo_loss", "masked_grpo_loss"]

ESTIMATORS: tuple[str, ...] = ("masked", "horvitz_thompson")
"""The estimators of a masked policy loss: Eq. (11) as written, or Horvitz-Thompson."""

Values = Float[Tensor, " packed"] | Float[Tensor, "packed token"]


class PolicyLossOutput(NamedTuple):
    r"""Result of `masked_grpo_loss` and `chunked_ppo_loss`; every field is a 0-d tensor.

    No field needs a host sync to compute.

    Attributes:
        loss: the total loss to minimise,
            `policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss`.
        policy_loss: the aggregated clipped surrogate.
        entropy_loss: the aggregated per-token entropy (0 when no entropy is given).
        kl_loss: the aggregated per-token KL estimate to the reference policy (0 when no
            `ref_logp` is given).
        clip_frac_low: detached fraction of valid tokens where the lower clip is active.
        clip_frac_high: detached fraction of valid tokens where the upper clip is active.
            `clip_frac_low + clip_frac_high` is verl's `pg_clipfrac`.
        dual_clip_frac: detached fraction of valid tokens where the dual clip is active (verl's
            `pg_clipfrac_lower`).
        approx_kl: detached mean over valid tokens of $\log\pi_{old} - \log\pi$ (clamped like
            the ratio), verl's `ppo_kl`.
        ratio_mean: detached mean importance ratio over valid tokens.
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


def _policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    selection: Selection | None,
    mask: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float,
    loss_agg_mode: str,
    estimator: str,
    inclusion: Tensor | None,
    entropy: Tensor | None,
    entropy_coef: float,
    ref_logp: Tensor | None,
    kl_coef: float,
    kl_type: str,
    dp_size: int,
    batch_num_tokens: Normalizer | None,
    global_batch_size: Normalizer | None,
    loss_scale_factor: Normalizer | None,
    validate_args: bool,
    token_weights: Tensor | None = None,
    old_name: str = "old_logp",
) -> PolicyLossOutput:
    """The computation every clipped policy loss shares.

    `token_weights` (checked by the caller, the shape of `logp`, detached) multiply the surrogate
    only; `old_name` is the name the caller gave the anchor log-probabilities.
    """
    for value, name in ((logp, "logp"), (old_logp, old_name)):
        check_tensor(value, name, dtypes="float")
    check_same_shape(old_logp, old_name, logp, "logp")
    check_same_device(old_logp, old_name, logp, "logp")
    check_tensor(advantages, "advantages", dtypes="float")
    check_same_device(advantages, "advantages", logp, "logp")
    layout = resolve_layout(logp, "logp", selection, mask, validate_args)
    mask = layout.mask
    adv = broadcast_advantages(advantages, logp)
    check_option(loss_agg_mode, "loss_agg_mode", AGGREGATION_MODES)
    check_option(estimator, "estimator", ESTIMATORS)
    check_option(kl_type, "kl_type", KL_TYPES)
    clip_low, clip_high, dual_clip, log_ratio_clamp = check_clip_args(
        clip_low, clip_high, dual_clip, log_ratio_clamp
    )
    entropy_coef = check_real(entropy_coef, "entropy_coef")
    kl_coef = check_real(kl_coef, "kl_coef")
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
        if selection is None:
            raise ValueError(
                "`selection` is required when `estimator='horvitz_thompson'` (it holds the full "
                "trajectory lengths), got None."
            )
        if inclusion is None:
            raise ValueError(
                "`inclusion` is required when `estimator='horvitz_thompson'`, got None."
            )
        check_tensor(inclusion, "inclusion", ndim=1, dtypes="float")
        check_shape(inclusion, "inclusion", (logp.shape[0],))
        check_same_device(inclusion, "inclusion", logp, "logp")
    if values_checkable(logp, validate_args):
        for value, name in (
            (logp, "logp"),
            (old_logp, old_name),
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

    dtype = compute_dtype(logp.dtype)
    rows_mask = layout.rows(mask)

    def clean(x: Tensor) -> Tensor:
        return torch.where(rows_mask, layout.rows(x).to(dtype), 0.0)

    lp, old = clean(logp), clean(old_logp)
    adv_rows = clean(adv.expand(logp.shape))
    out = surrogate(lp, old, adv_rows, clip_low, clip_high, dual_clip, log_ratio_clamp)

    weights = seq_num_tokens = None
    if horvitz_thompson:
        pi = inclusion.detach().to(dtype)
        ok = pi > 0
        weights = torch.where(ok, 1.0 / torch.where(ok, pi, 1.0), 0.0)
        full = selection.num_chunks * layout.tokens
        if batch_num_tokens is None:
            batch_num_tokens = full.sum()
        if global_batch_size is None:
            global_batch_size = (full > 0).sum()
        if loss_scale_factor is None:
            loss_scale_factor = selection.chunks_total * layout.tokens
        seq_num_tokens = full
    elif loss_scale_factor is None:
        loss_scale_factor = layout.horizon

    def agg(values: Tensor, extra: Tensor | None = None) -> Tensor:
        w = weights
        if extra is not None:
            w = extra if w is None else w[:, None] * extra
        return aggregate_loss(
            values,
            rows_mask,
            loss_agg_mode,
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size,
            loss_scale_factor=loss_scale_factor,
            segment=layout.segment,
            num_segments=layout.num_segments,
            weights=w,
            seq_num_tokens=seq_num_tokens if loss_agg_mode == "seq-mean-token-mean" else None,
            validate_args=validate_args,
        )

    zero = lp.new_zeros(())
    extra = None if token_weights is None else clean(token_weights)
    policy_loss = agg(out.loss, extra)
    entropy_loss = zero if entropy is None else agg(clean(entropy))
    kl_loss = zero if ref_logp is None else agg(kl_estimate(lp, clean(ref_logp), kl_type))
    total = policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss

    with torch.no_grad():
        count = rows_mask.sum().clamp_min(1).to(dtype)

        def mean(x: Tensor) -> Tensor:
            return torch.where(rows_mask, x.to(dtype), 0.0).sum() / count

        log_ratio = torch.clamp(lp - old, -log_ratio_clamp, log_ratio_clamp)
        return PolicyLossOutput(
            total,
            policy_loss,
            entropy_loss,
            kl_loss,
            mean(out.clipped_low),
            mean(out.clipped_high),
            mean(out.dual_clipped),
            mean(-log_ratio),
            mean(out.ratio),
        )


def masked_grpo_loss(
    logp: Values,
    old_logp: Values,
    advantages: Values,
    selection: Selection | None = None,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "packed token"] | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
    loss_agg_mode: AggregationMode = "seq-mean-token-mean",
    estimator: Literal["masked", "horvitz_thompson"] = "masked",
    inclusion: Float[Tensor, " packed"] | None = None,
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
) -> PolicyLossOutput:
    r"""GRPO loss on a packed batch of selected chunks (the masked objective of Eq. 11).

    $$
    J_{mask} = \frac{1}{G}\sum_{i} \frac{1}{|S_i|}\sum_{t \in S_i} L_{i,t},
    $$

    where $S_i$ is the set of selected chunks of trajectory $i$ (their valid tokens, in token
    modes), $L_{i,t}$ the clipped surrogate of Eq. (2) (`clipped_surrogate`) and $G$ the number
    of trajectories with at least one selected valid token. See Eq. (11) of Anonymous et al.
    (2026), Probabilistic Chunk Masking, arXiv 2605.16154. The displayed form is the
    `seq-mean-token-mean` mode; every verl mode is available, applied by `aggregate_loss` with the
    trajectories as the sequences (`segment = selection.packed_traj_index`):

    - `token-mean`: sum over all selected valid tokens / their number $D$;
    - `token-sum`: their sum;
    - `seq-mean-token-mean`: per trajectory, the mean over its selected valid tokens; then the
      sum over trajectories / $G$;
    - `seq-mean-token-sum`: per trajectory, the sum over its selected valid tokens; / $G$;
    - `seq-mean-token-sum-norm`: the seq-mean-token-sum value / $L$, with $L$ =
      `selection.k * K` by default, the padded length of a packed trajectory ($K$ = tokens per
      chunk).

    Every mode multiplies by `dp_size` and takes the global $D$ and $G$ under data parallelism
    (`loss_normalizers`), so DDP's gradient average is the union batch's gradient. With every
    chunk selected (`Selection.from_mask(valid)`, whose `k` is the padded chunk count $N$) the loss
    equals verl's on the full batch with one row per trajectory, in every mode. Without a
    `selection`, each row of a `(rows, token)` input is a sequence: verl's own layout.

    **Horvitz-Thompson** (`estimator="horvitz_thompson"`): each selected chunk's tokens are
    weighted by $1/\pi_{i,t}$ (`inclusion`, detached) and every normaliser is the full,
    selection-independent count, with $T_i$ = `selection.num_chunks`:

    - `token-mean`: $D = K\sum_i T_i$;
    - `seq-mean-token-mean`: trajectory $i$'s weighted sum divided by $K T_i$, then / $G$;
    - seq modes: $G = |\{i: T_i > 0\}|$;
    - `seq-mean-token-sum-norm`: $L = N K$ ($N$ = `selection.chunks_total`).

    Under data parallelism the same rules hold with global counts:
    `loss_normalizers(selection, mask, estimator="horvitz_thompson", process_group=...)` returns
    $D$ and $G$ summed over ranks. The estimator's expectation over the selection is the
    full-batch loss exactly in `token-sum` and the seq-token-sum modes, and in the two token-mean
    modes whenever every token of a valid chunk is valid (the full-length divisor counts $K$
    tokens per chunk).

    The total is `policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss`; entropy and KL
    are aggregated in the same mode with the same estimator. KL estimators (Schulman 2020), with
    $\delta = \log\pi_{ref} - \log\pi_\theta$: k1 $= -\delta$, k2 $= \delta^2/2$, k3
    $= e^{\delta} - \delta - 1$ with $\delta$ clamped to $\pm 20$ and the result to $\pm 10$
    (verl's `low_var_kl`).

    Computation is in float32 (float64 for float64 `logp`); masked tokens are replaced by zeros
    before any arithmetic, so padding (even NaN) never reaches outputs or gradients.

    Args:
        logp: `(M, K)` current log-probabilities of the packed selected chunks' tokens, or
            `(M,)` for one log-probability per chunk, in the packed order of `selection`.
            Without a selection: `(rows, token)`, one sequence per row.
        old_logp: behaviour log-probabilities, shape of `logp`.
        advantages: `(M,)` per-chunk advantages (broadcast over tokens) or per-token, shape of
            `logp`.
        selection: the `Selection` the batch was packed with, or None.
        mask: bool, shape of `logp`, True for valid tokens. Defaults to all True.
        clip_low: $\varepsilon_{low}$ in `[0, 1]`.
        clip_high: $\varepsilon_{high} \ge 0$ (DAPO clip-higher).
        dual_clip: dual-clip constant $c > 1$, or None.
        log_ratio_clamp: $\kappa > 0$, the clamp on the log ratio before `exp` (verl: 20).
        loss_agg_mode: one of `AGGREGATION_MODES`.
        estimator: `"masked"` (Eq. 11, biased by design) or `"horvitz_thompson"` (unbiased;
            needs `selection`).
        inclusion: `(M,)` inclusion probabilities $\pi$ in `(0, 1]` of the packed chunks;
            required for Horvitz-Thompson, ignored otherwise.
        entropy: per-token policy entropy, shape of `logp`, or None.
        entropy_coef: entropy bonus coefficient (requires `entropy` when non-zero).
        ref_logp: reference-policy log-probabilities, shape of `logp`, or None.
        kl_coef: KL penalty coefficient (requires `ref_logp` when non-zero).
        kl_type: `"k1"`, `"k2"` or `"k3"`.
        dp_size: the data-parallel world size (verl's `dp_size`); see `aggregate_loss`.
        batch_num_tokens: global token count for token-mean (required when `dp_size > 1`);
            `loss_normalizers` computes it.
        global_batch_size: global number of non-empty trajectories for the seq modes (required
            when `dp_size > 1`).
        loss_scale_factor: the seq-mean-token-sum-norm divisor; see the defaults above.
        validate_args: also run the value checks (one row per selected chunk, finite valid
            inputs, `inclusion` in `(0, 1]`) on accelerators, where they synchronise; on the CPU
            in eager mode they always run.

    Returns:
        A `PolicyLossOutput` of 0-d tensors.

    Raises:
        TypeError: on a wrong tensor dtype or a `selection` that is not a `Selection`.
        ValueError: on mismatched shapes or devices, unknown option strings, invalid clip values,
            a missing `inclusion`/`entropy`/`ref_logp`/normaliser that is needed, or failed value
            checks.

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
    return _policy_loss(
        logp,
        old_logp,
        advantages,
        selection,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
        loss_agg_mode=loss_agg_mode,
        estimator=estimator,
        inclusion=inclusion,
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
    )


def chunked_ppo_loss(
    logp: Values,
    old_logp: Values,
    advantages: Values,
    selection: Selection | None = None,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "rows chunk"] | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
    loss_agg_mode: AggregationMode = "token-mean",
    estimator: Literal["masked", "horvitz_thompson"] = "masked",
    inclusion: Float[Tensor, " packed"] | None = None,
    dp_size: int = 1,
    batch_num_tokens: Normalizer | None = None,
    global_batch_size: Normalizer | None = None,
    loss_scale_factor: Normalizer | None = None,
    validate_args: bool = False,
) -> PolicyLossOutput:
    r"""The PPO clipped-surrogate loss with one importance ratio per action chunk.

    $$
    \rho_t = \exp\big(\log\pi_\theta(a_t \mid o_t) - \log\pi_{old}(a_t \mid o_t)\big), \qquad
    \ell_t = \max\big(-\hat A_t \rho_t,\ -\hat A_t\,
        \mathrm{clip}(\rho_t, 1-\epsilon_{low}, 1+\epsilon_{high})\big)
    $$

    with $\log\pi(a_t \mid o_t)$ the chunk log-probability (`chunk_log_prob`) and $\hat A_t$ the
    chunk advantage (`chunk_gae`): Sec. 3 of "VLA Model Post-Training via Action-Chunked PPO and
    Self Behavior Cloning" (2026). It is the computation of `masked_grpo_loss` with a chunk as
    the token, and the same layouts:

    - padded: `(traj, chunk)` tensors with `mask` marking valid chunks (each row a trajectory);
    - packed: `(M,)` tensors from `chunkmask.shrink` with the `selection` that made them, so the
      chunk selection that PCM applies to GRPO applies to PPO; the loss then equals the padded
      loss restricted to the selected chunks in every mode but `seq-mean-token-sum-norm`, whose
      horizon is `selection.k` chunks instead of the padded `chunk`;
    - flat: `(m,)` chunks without a selection (e.g. a minibatch), each its own sequence.

    Args:
        logp: chunk log-probabilities under the current policy.
        old_logp: behaviour chunk log-probabilities, same shape.
        advantages: chunk advantages, same shape (or a leading part of it).
        selection: the `Selection` a packed batch came from; None otherwise.
        mask: bool, True for chunks that count. Defaults to all True.
        clip_low: $\epsilon_{low}$ in `[0, 1]`.
        clip_high: $\epsilon_{high} \ge 0$ (0.28 as in RLinf and SimpleVLA-RL).
        dual_clip: dual-clip constant $c > 1$, or None.
        log_ratio_clamp: clamp of the log-ratio before `exp`.
        loss_agg_mode: one of `AGGREGATION_MODES`, over chunks.
        estimator: `"masked"` or `"horvitz_thompson"` (needs `selection` and `inclusion`).
        inclusion: `(M,)` inclusion probabilities for Horvitz-Thompson.
        dp_size: the data-parallel world size (verl's `dp_size`); see `aggregate_loss`.
        batch_num_tokens: global token count for token-mean (required when `dp_size > 1`);
            `loss_normalizers` computes it.
        global_batch_size: global number of non-empty trajectories for the seq modes (required
            when `dp_size > 1`).
        loss_scale_factor: the seq-mean-token-sum-norm divisor; see the defaults above.
        validate_args: run the value checks on accelerators too (see `masked_grpo_loss`).

    Returns:
        A `PolicyLossOutput` of 0-d tensors (entropy and KL terms are 0).

    Raises:
        TypeError: on non-float inputs, a non-bool mask or a `selection` of the wrong type.
        ValueError: on mismatched shapes, a bad layout, a bad clip or mode option, or a missing
            normaliser under data parallelism.

    Example:
        >>> import torch
        >>> logp = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], requires_grad=True)
        >>> adv = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
        >>> out = chunked_ppo_loss(logp, logp.detach() - 0.1, adv)
        >>> round(out.loss.item(), 4), round(out.ratio_mean.item(), 4)
        (-0.6907, 1.1052)
    """
    return _policy_loss(
        logp,
        old_logp,
        advantages,
        selection,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
        loss_agg_mode=loss_agg_mode,
        estimator=estimator,
        inclusion=inclusion,
        entropy=None,
        entropy_coef=0.0,
        ref_logp=None,
        kl_coef=0.0,
        kl_type="k3",
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
        validate_args=validate_args,
    )
