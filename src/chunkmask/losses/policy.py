r"""Clipped policy-gradient losses: masked GRPO (Eq. 11), chunk-level PPO and decoupled PPO.

All three are one computation (`_policy_loss`): the clipped surrogate of Eq. (2) per token
(`clipped_surrogate`), optionally weighted by a bounded behaviour weight (the decoupled loss),
reduced by `aggregate_loss` with trajectories as the sequences. They differ only in what a token
is (an action token for GRPO on a VLA, a whole chunk's log-probability for chunk-level PPO), in
the clipping anchor, and in their default aggregation mode.

Every tensor after `logp` is keyword-only, so a call with the anchor and current
log-probabilities swapped fails with a `TypeError` instead of returning a wrong loss.
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_option,
    check_same_device,
    check_same_shape,
    check_shape,
    check_tensor,
    values_checkable,
)
from chunkmask.aggregation import (
    AGGREGATION_MODES,
    AggregationMode,
    LossNormalizers,
    aggregate_loss,
    check_norms,
    compute_dtype,
)
from chunkmask.batch._selection import Selection
from chunkmask.losses._layout import Layout, resolve_layout
from chunkmask.losses.options import Behaviour, Clip, Regularizers, check_spec
from chunkmask.losses.surrogate import broadcast_advantages, kl_estimate, surrogate

__all__ = ["ESTIMATORS", "PolicyLossOutput", "chunked_ppo_loss", "masked_grpo_loss"]

ESTIMATORS: tuple[str, ...] = ("masked", "horvitz_thompson")
"""The estimators of a masked policy loss: Eq. (11) as written, or Horvitz-Thompson."""

Values = Float[Tensor, " packed"] | Float[Tensor, "packed token"]
Mask = Bool[Tensor, " packed"] | Bool[Tensor, "packed token"]


class PolicyLossOutput(NamedTuple):
    r"""Result of every clipped policy loss; every field is a 0-d tensor.

    No field needs a host sync to compute.

    Attributes:
        loss: the total loss to minimise,
            `policy_loss - entropy_coef * entropy_loss + kl_coef * kl_loss`.
        policy_loss: the aggregated clipped surrogate.
        entropy_loss: the aggregated per-token entropy (0 without `Regularizers.entropy`).
        kl_loss: the aggregated per-token KL estimate to the reference policy (0 without
            `Regularizers.ref_logp`).
        clip_frac_low: detached fraction of valid tokens where the lower clip is active.
        clip_frac_high: detached fraction of valid tokens where the upper clip is active.
            `clip_frac_low + clip_frac_high` is verl's `pg_clipfrac`.
        dual_clip_frac: detached fraction of valid tokens where the dual clip is active (verl's
            `pg_clipfrac_lower`).
        approx_kl: detached mean over valid tokens of $\log\pi_{anchor} - \log\pi$ (clamped like
            the ratio), verl's `ppo_kl`.
        ratio_mean: detached mean importance ratio over valid tokens.
        capped_frac: detached fraction of valid tokens whose behaviour weight fell outside its
            bounds (0 for the on-policy losses).
        behaviour_weight_mean: detached mean behaviour weight after the bounds (1 on-policy).
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
    capped_frac: Tensor
    behaviour_weight_mean: Tensor


def _check_inputs(
    logp: Tensor,
    anchor: tuple[Tensor, str],
    advantages: Tensor,
    selection: Selection | None,
    mask: Tensor | None,
    behaviour: Behaviour | None,
    options: tuple[Clip, str, str, Regularizers, LossNormalizers | None],
    validate_args: bool,
) -> tuple[
    Layout, Tensor, Clip, Regularizers, LossNormalizers, Tensor | None, Behaviour | None
]:
    """Every check of `_policy_loss`: metadata always, values with `validate_args`."""
    clip, mode, estimator, regs, norms = options
    tensors = [(logp, "logp"), anchor]
    if behaviour is not None:
        behaviour = check_spec(behaviour, "behaviour", Behaviour)
        tensors.append((behaviour.logp, "behaviour.logp"))
    for value, name in tensors:
        check_tensor(value, name, dtypes="float")
    for value, name in tensors[1:]:
        check_same_shape(value, name, logp, "logp")
        check_same_device(value, name, logp, "logp")
    check_tensor(advantages, "advantages", dtypes="float")
    check_same_device(advantages, "advantages", logp, "logp")
    layout = resolve_layout(logp, "logp", selection, mask, validate_args)
    adv = broadcast_advantages(advantages, logp)
    check_option(mode, "loss_agg_mode", AGGREGATION_MODES)
    check_option(estimator, "estimator", ESTIMATORS)
    clip = check_spec(clip, "clip", Clip)
    regs = check_spec(regs, "regularizers", Regularizers)
    norms = check_norms(norms)
    for value, name in ((regs.entropy, "entropy"), (regs.ref_logp, "ref_logp")):
        if value is not None:
            check_same_shape(value, f"regularizers.{name}", logp, "logp")
            check_same_device(value, f"regularizers.{name}", logp, "logp")
    inclusion = None
    if estimator == "horvitz_thompson":
        if selection is None:
            raise ValueError(
                "`selection` is required when `estimator='horvitz_thompson'` (it holds the full "
                "trajectory lengths and the inclusion probabilities), got None."
            )
        if selection.inclusion is not None:
            check_tensor(selection.inclusion, "selection.inclusion", ndim=2, dtypes="float")
            check_shape(selection.inclusion, "selection.inclusion", tuple(selection.mask.shape))
        inclusion = selection.packed_inclusion(size=logp.shape[0])
        if inclusion is None:
            raise ValueError(
                "`selection.inclusion` is required when `estimator='horvitz_thompson'`, got "
                "None: draw the selection with a sampler that records inclusion probabilities "
                "(e.g. `pps_sample`, or the masker with inclusion on)."
            )
    if values_checkable(logp, validate_args):
        where = layout.mask
        for value, name in tensors + [(regs.entropy, "entropy"), (regs.ref_logp, "ref_logp")]:
            if value is not None:
                check_finite(value, name, where=where)
        check_finite(adv.expand(logp.shape), "advantages", where=where)
        if inclusion is not None:
            bad = ~((inclusion > 0) & (inclusion <= 1))
            if bool(bad.any()):
                raise ValueError(
                    f"`selection.inclusion` must lie in (0, 1], got {int(bad.sum())} value(s) "
                    "outside it."
                )
    return layout, adv, clip, regs, norms, inclusion, behaviour


def _behaviour_weight(
    anchor: Tensor, behaviour: Tensor, bounds: Behaviour, clamp: float
) -> tuple[Tensor, Tensor]:
    r"""The detached bounded weight $w_t = \pi_{prox}/\pi_{behav}$ and where it was outside."""
    with torch.no_grad():
        weight = torch.exp(torch.clamp(anchor - behaviour, -clamp, clamp))
        outside = torch.zeros_like(weight, dtype=torch.bool)
        if bounds.cap is not None:
            outside = outside | (weight > bounds.cap)
        if bounds.floor is not None:
            outside = outside | (weight < bounds.floor)
        if bounds.mode == "mask":
            weight = torch.where(outside, 0.0, weight)
        else:
            weight = weight.clamp(bounds.floor or 0.0, bounds.cap)
    return weight, outside


def _policy_loss(
    logp: Tensor,
    anchor: tuple[Tensor, str],
    advantages: Tensor,
    selection: Selection | None,
    mask: Tensor | None,
    options: tuple[Clip, str, str, Regularizers, LossNormalizers | None],
    validate_args: bool,
    behaviour: Behaviour | None = None,
) -> PolicyLossOutput:
    """The computation every clipped policy loss shares (see the module docstring)."""
    layout, adv, clip, regs, norms, inclusion, behaviour = _check_inputs(
        logp, anchor, advantages, selection, mask, behaviour, options, validate_args
    )
    mode = options[1]
    dtype = compute_dtype(logp.dtype)
    rows_mask = layout.rows(layout.mask)

    def clean(x: Tensor) -> Tensor:
        return torch.where(rows_mask, layout.rows(x).to(dtype), 0.0)

    lp, old, adv_rows = clean(logp), clean(anchor[0]), clean(adv.expand(logp.shape))
    out = surrogate(lp, old, adv_rows, clip.low, clip.high, clip.dual, clip.log_ratio_clamp)
    token_weight, outside = None, torch.zeros_like(rows_mask)
    if behaviour is not None:
        token_weight, outside = _behaviour_weight(
            old.detach(), clean(behaviour.logp).detach(), behaviour, clip.log_ratio_clamp
        )

    # Eq. (11) normalises by the selected chunks; Horvitz-Thompson weights each selected chunk
    # by 1/pi and normalises by the full, selection-independent counts.
    row_weight, seq_num_tokens = None, None
    batch_num_tokens, global_batch_size = norms.batch_num_tokens, norms.global_batch_size
    loss_scale_factor = norms.loss_scale_factor
    if inclusion is not None:
        pi = inclusion.detach().to(dtype)
        row_weight = torch.where(pi > 0, 1.0 / torch.where(pi > 0, pi, 1.0), 0.0)
        full = selection.num_chunks * layout.tokens
        batch_num_tokens = full.sum() if batch_num_tokens is None else batch_num_tokens
        global_batch_size = (full > 0).sum() if global_batch_size is None else global_batch_size
        if loss_scale_factor is None:
            loss_scale_factor = selection.chunks_total * layout.tokens
        seq_num_tokens = full if mode == "seq-mean-token-mean" else None
    elif loss_scale_factor is None:
        loss_scale_factor = layout.horizon

    def agg(values: Tensor, extra: Tensor | None = None) -> Tensor:
        w = row_weight
        if extra is not None:
            w = extra if w is None else w[:, None] * extra
        return aggregate_loss(
            values, rows_mask, mode,
            dp_size=norms.dp_size, batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
            segment=layout.segment, num_segments=layout.num_segments,
            weights=w, seq_num_tokens=seq_num_tokens, validate_args=validate_args,
        )  # fmt: skip

    zero = lp.new_zeros(())
    policy_loss = agg(out.loss, token_weight)
    entropy_loss = zero if regs.entropy is None else agg(clean(regs.entropy))
    kl_loss = zero
    if regs.ref_logp is not None:
        kl_loss = agg(kl_estimate(lp, clean(regs.ref_logp), regs.kl_type))
    total = policy_loss - regs.entropy_coef * entropy_loss + regs.kl_coef * kl_loss

    with torch.no_grad():
        # One masked reduction for every per-token diagnostic.
        log_ratio = torch.clamp(lp - old, -clip.log_ratio_clamp, clip.log_ratio_clamp)
        parts = [out.clipped_low, out.clipped_high, out.dual_clipped, -log_ratio, out.ratio, outside]
        if token_weight is not None:
            parts.append(token_weight)
        stacked = torch.stack([x.to(dtype) for x in parts])
        count = rows_mask.sum().clamp_min(1).to(dtype)
        means = torch.where(rows_mask, stacked, 0.0).sum((1, 2)) / count
        weight_mean = zero + 1.0 if token_weight is None else means[6]
        return PolicyLossOutput(
            total, policy_loss, entropy_loss, kl_loss,
            means[0], means[1], means[2], means[3], means[4], means[5], weight_mean,
        )  # fmt: skip


def masked_grpo_loss(
    logp: Values,
    *,
    old_logp: Values,
    advantages: Values,
    selection: Selection | None = None,
    mask: Mask | None = None,
    clip: Clip = Clip(),
    loss_agg_mode: AggregationMode = "seq-mean-token-mean",
    estimator: Literal["masked", "horvitz_thompson"] = "masked",
    regularizers: Regularizers | None = None,
    norms: LossNormalizers | None = None,
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
    weighted by $1/\pi_{i,t}$ (`selection.inclusion`, detached) and every normaliser is the full,
    selection-independent count, with $T_i$ = `selection.num_chunks`:

    - `token-mean`: $D = K\sum_i T_i$;
    - `seq-mean-token-mean`: trajectory $i$'s weighted sum divided by $K T_i$, then / $G$;
    - seq modes: $G = |\{i: T_i > 0\}|$;
    - `seq-mean-token-sum-norm`: $L = N K$ ($N$ = `selection.chunks_total`).

    Under data parallelism the same rules hold with global counts:
    `norms=loss_normalizers(selection, mask, estimator="horvitz_thompson", process_group=...)`
    gives $D$ and $G$ summed over ranks. The estimator's expectation over the selection is the
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
        old_logp: behaviour log-probabilities, shape of `logp` (keyword-only).
        advantages: `(M,)` per-chunk advantages (broadcast over tokens) or per-token, shape of
            `logp` (keyword-only).
        selection: the `Selection` the batch was packed with, or None. For Horvitz-Thompson it
            must carry its inclusion probabilities (`Selection.inclusion`).
        mask: bool, shape of `logp`, True for valid tokens. Defaults to all True.
        clip: the ratio clipping (`Clip`: $\varepsilon_{low}$, $\varepsilon_{high}$, dual clip,
            log-ratio clamp).
        loss_agg_mode: one of `AGGREGATION_MODES`.
        estimator: `"masked"` (Eq. 11, biased by design) or `"horvitz_thompson"` (unbiased;
            reads `selection.packed_inclusion()`).
        regularizers: the entropy bonus and KL penalty (`Regularizers`), or None for neither.
        norms: the data-parallel normalisers (`LossNormalizers`, e.g. from `loss_normalizers`),
            or None for one rank's defaults (see above).
        validate_args: also run the value checks (one row per selected chunk, finite valid
            inputs, inclusion in `(0, 1]`); they read tensor contents and so synchronise an
            accelerator. Off by default on every device.

    Returns:
        A `PolicyLossOutput` of 0-d tensors.

    Raises:
        TypeError: on a wrong tensor dtype or a `selection` that is not a `Selection`.
        ValueError: on mismatched shapes or devices, unknown option strings, invalid clip values,
            a missing `inclusion`/`entropy`/`ref_logp`/normaliser that is needed, or failed value
            checks.

    Examples:
        >>> import torch
        >>> from chunkmask.batch import Selection
        >>> sel = Selection.from_mask(torch.tensor([[True, False, True], [False, True, False]]))
        >>> logp = torch.zeros(3, 2, requires_grad=True)  # 3 packed chunks, 2 tokens each
        >>> adv = torch.tensor([1.0, 1.0, -2.0])
        >>> out = masked_grpo_loss(logp, old_logp=logp.detach(), advantages=adv, selection=sel)
        >>> round(out.loss.item(), 4)  # trajectory means -1 and 2, averaged
        0.5
    """
    options = (clip, loss_agg_mode, estimator, regularizers or Regularizers(), norms)
    return _policy_loss(
        logp, (old_logp, "old_logp"), advantages, selection, mask, options, validate_args
    )


def chunked_ppo_loss(
    logp: Values,
    *,
    old_logp: Values,
    advantages: Values,
    selection: Selection | None = None,
    mask: Mask | None = None,
    clip: Clip = Clip(),
    loss_agg_mode: AggregationMode = "token-mean",
    estimator: Literal["masked", "horvitz_thompson"] = "masked",
    norms: LossNormalizers | None = None,
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
    Self Behavior Cloning" (2026). It is `masked_grpo_loss` configured with a chunk as the token
    (no regularizers, `token-mean` by default), with the same layouts:

    - padded: `(traj, chunk)` tensors with `mask` marking valid chunks (each row a trajectory);
    - packed: `(M,)` tensors from `chunkmask.shrink` with the `selection` that made them, so the
      chunk selection that PCM applies to GRPO applies to PPO; the loss then equals the padded
      loss restricted to the selected chunks in every mode but `seq-mean-token-sum-norm`, whose
      horizon is `selection.k` chunks instead of the padded `chunk`;
    - flat: `(m,)` chunks without a selection (e.g. a minibatch), each its own sequence.

    Args:
        logp: chunk log-probabilities under the current policy.
        old_logp: behaviour chunk log-probabilities, same shape (keyword-only).
        advantages: chunk advantages, same shape or a leading part of it (keyword-only).
        selection: the `Selection` a packed batch came from; None otherwise.
        mask: bool, True for chunks that count. Defaults to all True.
        clip: the ratio clipping (`Clip`).
        loss_agg_mode: one of `AGGREGATION_MODES`, over chunks.
        estimator: `"masked"` or `"horvitz_thompson"` (needs a `selection` with inclusion).
        norms: the data-parallel normalisers (`LossNormalizers`), or None.
        validate_args: run the value checks (see `masked_grpo_loss`).

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
        >>> out = chunked_ppo_loss(logp, old_logp=logp.detach() - 0.1, advantages=adv)
        >>> round(out.loss.item(), 4), round(out.ratio_mean.item(), 4)
        (-0.6907, 1.1052)
    """
    options = (clip, loss_agg_mode, estimator, Regularizers(), norms)
    return _policy_loss(
        logp, (old_logp, "old_logp"), advantages, selection, mask, options, validate_args
    )
