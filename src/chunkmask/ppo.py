"""Chunk-level PPO primitives: chunk rewards, chunk GAE, chunk log-probabilities and the losses.

An action-chunked policy emits `H` steps of `D`-dimensional actions per decision. PPO then treats a
chunk as one decision: its reward is the discounted sum of its step rewards, the discount between
chunks is `gamma^H`, GAE runs over chunks, the value head gives one value per chunk, and the
log-probability of a chunk is the sum over its steps and action dims (Sec. 3 of "VLA Model
Post-Training via Action-Chunked PPO and Self Behavior Cloning", 2026; the summary is all that is
public, so every rule the summary leaves open is an argument here with a documented default).

The losses accept either a padded `(traj, chunk)` batch with a `valid` mask, or a packed `(M,)`
batch together with the `chunkmask.Selection` that produced it (`chunkmask.shrink`), so the same
chunk selection that PCM applies to GRPO applies to chunked PPO.
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_min_ndim,
    check_option,
    check_positive_int,
    check_range,
    check_real,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from chunkmask.losses import aggregate_loss, clipped_surrogate
from chunkmask.selection import Selection

__all__ = [
    "ChunkGAEOutput",
    "ChunkedPPOLossOutput",
    "chunk_gae",
    "chunk_log_prob",
    "chunk_rewards",
    "chunked_ppo_loss",
    "value_loss",
    "whiten_advantages",
]

LossAggMode = Literal[
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
]
_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_mask(mask: Tensor | None, name: str, ref: Tensor, ref_name: str) -> Tensor:
    if mask is None:
        return torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    check_tensor(mask, name, dtypes="bool")
    check_same_shape(mask, name, ref, ref_name)
    check_same_device(mask, name, ref, ref_name)
    return mask


def chunk_rewards(
    rewards: Real[Tensor, "*batch step"],
    mask: Bool[Tensor, "*batch step"] | None = None,
    *,
    gamma: float = 0.99,
) -> Float[Tensor, "*batch"]:
    r"""Turn the step rewards of each chunk into one chunk reward, discounted within the chunk.

    $$
    R_{t} = \sum_{j=0}^{H-1} \gamma^{j}\, r_{t,j}\, m_{t,j}
    $$

    where $r_{t,j}$ is the reward of step $j$ of chunk $t$ and $m_{t,j}$ marks the steps that ran
    (a chunk cut short by termination has a suffix of masked steps). With $\gamma = 1$ this is the
    plain sum used by the action-chunked PPO paper (2026); with the step discount it makes the
    chunk-level return equal the step-level discounted return, since chunks are then discounted by
    $\gamma^H$ (see `chunk_gae`).

    Args:
        rewards: `(*batch, H)` step rewards, the last axis being the steps of one chunk, e.g.
            `(traj, chunk, H)`.
        mask: `(*batch, H)` bool, True for steps that were executed. Masked steps may hold
            anything, NaN included. Defaults to all True.
        gamma: per-step discount in `[0, 1]`.

    Returns:
        `(*batch,)` chunk rewards, float32 (float64 for float64 input).

    Raises:
        TypeError: if `rewards` is not a real tensor or `mask` is not bool.
        ValueError: if `rewards` has no step axis, `mask` has another shape, or `gamma` is outside
            `[0, 1]`.

    Example:
        >>> import torch
        >>> r = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 5.0, float("nan")]]])
        >>> m = torch.tensor([[[True, True, True], [True, True, False]]])
        >>> chunk_rewards(r, m, gamma=0.5)
        tensor([[1.7500, 3.5000]])
    """
    check_tensor(rewards, "rewards", dtypes=("float", "int"))
    check_min_ndim(rewards, "rewards", 1)
    mask = _check_mask(mask, "mask", rewards, "rewards")
    gamma = check_range(gamma, "gamma", low=0.0, high=1.0)
    dtype = _acc_dtype(rewards.dtype)
    steps = rewards.shape[-1]
    discounts = gamma ** torch.arange(steps, device=rewards.device, dtype=torch.float64)
    safe = torch.where(mask, rewards.to(dtype), 0)
    return (safe * discounts.to(dtype)).sum(-1)


class ChunkGAEOutput(NamedTuple):
    r"""Result of `chunk_gae`.

    Attributes:
        advantages: `(traj, chunk)` GAE advantages $\hat A_t$; 0 at padding.
        returns: `(traj, chunk)` value targets $\hat A_t + V_t$; 0 at padding.
    """

    advantages: Float[Tensor, "traj chunk"]
    returns: Float[Tensor, "traj chunk"]


def chunk_gae(
    rewards: Float[Tensor, "traj chunk"],
    values: Float[Tensor, "traj chunk"],
    valid: Bool[Tensor, "traj chunk"] | None = None,
    *,
    terminated: Bool[Tensor, "traj chunk"] | None = None,
    truncated: Bool[Tensor, "traj chunk"] | None = None,
    next_values: Float[Tensor, "traj chunk"] | None = None,
    bootstrap_value: Float[Tensor, " traj"] | None = None,
    chunk_steps: Int[Tensor, "traj chunk"] | None = None,
    gamma: float = 0.99,
    lam: float = 0.95,
    chunk_size: int = 1,
    validate_args: bool = True,
) -> ChunkGAEOutput:
    r"""Generalised advantage estimation over chunks, with the discount $\gamma^{H}$ between chunks.

    $$
    \delta_t = R_t + \gamma^{h_t}\, \bar V_{t+1} - V_t, \qquad
    \hat A_t = \delta_t + \gamma^{h_t} \lambda\, c_t\, \hat A_{t+1}, \qquad
    \hat G_t = \hat A_t + V_t,
    $$

    where $R_t$ is the chunk reward (`chunk_rewards`), $h_t$ the number of steps chunk $t$ ran
    ($H$ = `chunk_size` unless `chunk_steps` says otherwise), and the next value and the
    continuation flag $c_t$ are

    - `terminated[t]` (a true terminal state, e.g. success or failure): $\bar V_{t+1} = 0$,
      $c_t = 0$;
    - `truncated[t]` (time limit; the state is not terminal): $\bar V_{t+1}$ =
      `next_values[t]`, the value of the observation after the chunk, and $c_t = 0$;
    - otherwise, if chunk $t+1$ is valid: $\bar V_{t+1} = V_{t+1}$, $c_t = 1$;
    - otherwise (the row's last valid chunk, cut by the end of the rollout):
      $\bar V_{t+1}$ = `bootstrap_value` (0 if not given), $c_t = 0$.

    A row may hold several episodes back to back (auto-reset rollouts): `terminated` and
    `truncated` cut the trace inside the row. $\lambda$ applies per chunk: a chunk is one decision.
    This is the chunk-level GAE of the action-chunked PPO paper (2026) and of RLinf's chunk-level
    PPO; with $H = 1$ it is Schulman et al. (2016), https://arxiv.org/abs/1506.02438, Eq. (16).

    Note:
        `valid` must be a prefix of each row (padding at the end), as a padded rollout batch is.
        Padding (invalid chunks) may hold anything, NaN included, and gets advantage and return 0.
        The backward pass runs as a Python loop over the chunk axis (vectorised over
        trajectories); the output carries no gradient.

    Args:
        rewards: `(traj, chunk)` chunk rewards $R_t$.
        values: `(traj, chunk)` value estimates $V_t$ of each chunk's first observation.
        valid: `(traj, chunk)` bool, True for real chunks. Defaults to all True.
        terminated: `(traj, chunk)` bool, True where the episode ended in a terminal state during
            the chunk. Defaults to all False.
        truncated: `(traj, chunk)` bool, True where the episode was cut (time limit) during the
            chunk; bootstraps with `next_values`. Defaults to all False. Where both flags are set,
            `terminated` wins.
        next_values: `(traj, chunk)` value of the observation after each chunk; read only where
            `truncated` is True. Required when `truncated` is given.
        bootstrap_value: `(traj,)` value of the observation after each row's last valid chunk,
            used when that chunk neither terminated nor was truncated. Defaults to 0.
        chunk_steps: `(traj, chunk)` integer number of steps each chunk ran, for the discount
            $\gamma^{h_t}$. Defaults to `chunk_size` everywhere.
        gamma: per-step discount in `[0, 1]`.
        lam: GAE $\lambda$ in `[0, 1]`, applied once per chunk.
        chunk_size: the chunk length $H$.
        validate_args: check that `valid` is a prefix of each row and that the inputs are finite
            at valid chunks (one host sync).

    Returns:
        A `ChunkGAEOutput` of `(traj, chunk)` advantages and returns, float32 (float64 for
        float64 input), detached.

    Raises:
        TypeError: on a non-float `rewards`/`values`/`next_values`/`bootstrap_value`, a non-bool
            mask or flag, or a non-integer `chunk_steps`.
        ValueError: on mismatched shapes, `gamma`/`lam` outside `[0, 1]`, a non-positive
            `chunk_size`, `truncated` without `next_values`, and (with `validate_args`) a `valid`
            that is not a prefix or non-finite inputs at valid chunks.

    Example:
        >>> import torch
        >>> r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
        >>> v = torch.zeros(2, 3)
        >>> out = chunk_gae(r, v, terminated=torch.tensor([[False, False, True], [False] * 3]),
        ...                 gamma=0.5, lam=1.0, chunk_size=2)
        >>> out.advantages
        tensor([[0.0625, 0.2500, 1.0000],
                [0.0000, 0.0000, 0.0000]])
    """
    check_tensor(rewards, "rewards", ndim=2, dtypes="float")
    check_tensor(values, "values", ndim=2, dtypes="float")
    check_same_shape(values, "values", rewards, "rewards")
    check_same_device(values, "values", rewards, "rewards")
    valid = _check_mask(valid, "valid", rewards, "rewards")
    terminated = _check_mask(terminated, "terminated", rewards, "rewards") if terminated is not None else torch.zeros_like(valid)
    if truncated is not None:
        truncated = _check_mask(truncated, "truncated", rewards, "rewards")
        if next_values is None:
            raise ValueError("`next_values` is required when `truncated` is given, got None.")
    else:
        truncated = torch.zeros_like(valid)
    if next_values is not None:
        check_tensor(next_values, "next_values", ndim=2, dtypes="float")
        check_same_shape(next_values, "next_values", rewards, "rewards")
        check_same_device(next_values, "next_values", rewards, "rewards")
    if bootstrap_value is not None:
        check_tensor(bootstrap_value, "bootstrap_value", ndim=1, dtypes="float")
        if bootstrap_value.shape[0] != rewards.shape[0]:
            raise ValueError(
                f"`bootstrap_value` must have shape ({rewards.shape[0]},) (one per row of "
                f"`rewards`), got {tuple(bootstrap_value.shape)}."
            )
        check_same_device(bootstrap_value, "bootstrap_value", rewards, "rewards")
    if chunk_steps is not None:
        check_tensor(chunk_steps, "chunk_steps", ndim=2, dtypes="int")
        check_same_shape(chunk_steps, "chunk_steps", rewards, "rewards")
    gamma = check_range(gamma, "gamma", low=0.0, high=1.0)
    lam = check_range(lam, "lam", low=0.0, high=1.0)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if validate_args:
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError(
                "`valid` must be a prefix of each row (padding only at the end), got a valid "
                "chunk after a padded one."
            )
        check_finite(rewards, "rewards", valid)
        check_finite(values, "values", valid)

    dtype = _acc_dtype(torch.promote_types(rewards.dtype, values.dtype))
    num_traj, num_chunks = rewards.shape
    with torch.no_grad():
        r = torch.where(valid, rewards.to(dtype), 0)
        v = torch.where(valid, values.to(dtype), 0)
        truncated = truncated & ~terminated
        if next_values is not None:
            nv = torch.where(truncated & valid, next_values.to(dtype), 0)
        else:
            nv = torch.zeros_like(r)
        boot = (
            torch.zeros(num_traj, dtype=dtype, device=r.device)
            if bootstrap_value is None
            else bootstrap_value.to(dtype)
        )
        if chunk_steps is None:
            disc = torch.full_like(r, gamma**chunk_size)
        else:
            steps = torch.where(valid, chunk_steps, 0).to(dtype)
            disc = torch.pow(torch.as_tensor(gamma, dtype=dtype, device=r.device), steps)

        # Value of the state after chunk t when the trace continues into chunk t + 1.
        next_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
        # Row end: bootstrap with `bootstrap_value` on the last valid chunk.
        boot_next = torch.where(next_valid, v_next, boot[:, None])
        next_value = torch.where(terminated, 0, torch.where(truncated, nv, boot_next))
        boot_ok = torch.isfinite(next_value) | ~valid
        next_value = torch.where(boot_ok, next_value, 0)
        cont = next_valid & ~terminated & ~truncated
        delta = r + disc * next_value - v
        delta = torch.where(valid, delta, 0)
        coef = torch.where(cont, disc * lam, 0)

        advantages = torch.zeros_like(r)
        running = torch.zeros(num_traj, dtype=dtype, device=r.device)
        for t in range(num_chunks - 1, -1, -1):
            running = delta[:, t] + coef[:, t] * running
            advantages[:, t] = running
        advantages = torch.where(valid, advantages, 0)
        returns = torch.where(valid, advantages + v, 0)
    return ChunkGAEOutput(advantages, returns)


def chunk_log_prob(
    logp: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    event_dims: int = 1,
) -> Float[Tensor, "*lead"]:
    r"""Sum per-step, per-dim (or per-token) log-probabilities into one log-probability per chunk.

    $$
    \log \pi(a_t \mid o_t) = \sum_{j=1}^{H} \sum_{d=1}^{D} m_{t,j,d}\,
        \log \pi(a_{t,j,d} \mid o_t)
    $$

    The action-chunked PPO paper (2026) scores a chunk by the sum over its steps and dims. A
    discrete-token policy gives `(..., H*D)` per-token log-probabilities (`event_dims=1`); a
    continuous policy with a factorised distribution gives `(..., H, D)` per-dim ones
    (`event_dims=2`). Masked entries (steps after termination, padding tokens) may hold anything,
    NaN included; gradients there are 0.

    Args:
        logp: `(*lead, *event)` log-probabilities; the last `event_dims` axes are summed.
        mask: bool of the same shape, True for entries that count. Defaults to all True.
        event_dims: how many trailing axes form one chunk (1 for tokens, 2 for steps x dims).

    Returns:
        `(*lead,)` chunk log-probabilities in the dtype of `logp` (float32 for bfloat16/half).

    Raises:
        TypeError: if `logp` is not floating point or `mask` is not bool.
        ValueError: if `mask` has another shape, `event_dims` is not a positive int, or `logp` has
            fewer than `event_dims` axes.

    Example:
        >>> import torch
        >>> lp = torch.full((2, 3, 4, 2), -0.5)  # (traj, chunk, step, dim)
        >>> m = torch.ones(2, 3, 4, 2, dtype=torch.bool)
        >>> m[0, 2, 3:] = False  # the last step of chunk 2 of trajectory 0 did not run
        >>> chunk_log_prob(lp, m, event_dims=2)
        tensor([[-4., -4., -3.],
                [-4., -4., -4.]])
    """
    check_tensor(logp, "logp", dtypes="float")
    event_dims = check_positive_int(event_dims, "event_dims")
    check_min_ndim(logp, "logp", event_dims)
    mask = _check_mask(mask, "mask", logp, "logp")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    safe = torch.where(mask, logp.to(dtype), 0)
    return safe.sum(dim=tuple(range(-event_dims, 0)))


def _segments(
    ref: Tensor, mask: Tensor, selection: Selection | None
) -> tuple[Tensor, Tensor, Tensor | None, int | None]:
    """Rows, mask, segment ids and segment count for `aggregate_loss`."""
    if selection is None:
        if ref.ndim == 1:  # flat chunks (e.g. a minibatch of a packed batch): each its own row
            return ref[:, None], mask[:, None], None, None
        if ref.ndim != 2:
            raise ValueError(
                "`logp` must be a (traj, chunk) batch or (M,) flat chunks when no `selection` is "
                f"given, got {ref.ndim} dimensions (shape {tuple(ref.shape)})."
            )
        return ref, mask, None, None
    if not isinstance(selection, Selection):
        raise TypeError(
            f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}."
        )
    if ref.ndim != 1:
        raise ValueError(
            "`logp` must be a packed (M,) batch when `selection` is given, got "
            f"{ref.ndim} dimensions (shape {tuple(ref.shape)})."
        )
    segment = selection.packed_traj_index(size=ref.shape[0])
    return ref[:, None], mask[:, None], segment, selection.num_traj


class ChunkedPPOLossOutput(NamedTuple):
    r"""Result of `chunked_ppo_loss`; every field is a 0-d tensor.

    Attributes:
        loss: the aggregated clipped-surrogate policy loss.
        clip_frac_low: fraction of counted chunks clipped at $1-\epsilon_{low}$.
        clip_frac_high: fraction of counted chunks clipped at $1+\epsilon_{high}$.
        dual_clip_frac: fraction of counted chunks hit by the dual clip.
        approx_kl: mean of $\log\pi_{old} - \log\pi$ over counted chunks (the k1 estimate).
        ratio_mean: mean importance ratio over counted chunks.
    """

    loss: Float[Tensor, ""]
    clip_frac_low: Float[Tensor, ""]
    clip_frac_high: Float[Tensor, ""]
    dual_clip_frac: Float[Tensor, ""]
    approx_kl: Float[Tensor, ""]
    ratio_mean: Float[Tensor, ""]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    x = torch.where(mask, x.float() if x.dtype != torch.float64 else x, 0)
    return x.sum() / mask.sum().clamp_min(1)


def chunked_ppo_loss(
    logp: Float[Tensor, "*batch"],
    old_logp: Float[Tensor, "*batch"],
    advantages: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    selection: Selection | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    loss_agg_mode: LossAggMode = "token-mean",
    log_ratio_clamp: float = 20.0,
) -> ChunkedPPOLossOutput:
    r"""The PPO clipped-surrogate loss with one importance ratio per action chunk.

    $$
    \rho_t = \exp\big(\log\pi_\theta(a_t \mid o_t) - \log\pi_{old}(a_t \mid o_t)\big), \qquad
    \ell_t = \max\big(-\hat A_t \rho_t,\ -\hat A_t\,
        \mathrm{clip}(\rho_t, 1-\epsilon_{low}, 1+\epsilon_{high})\big)
    $$

    with $\log\pi(a_t \mid o_t)$ the chunk log-probability (`chunk_log_prob`) and $\hat A_t$ the
    chunk advantage (`chunk_gae`). The per-chunk loss comes from `chunkmask.losses.clipped_surrogate`
    (asymmetric and optional dual clip, Eq. 2 of the PCM paper) and is reduced by
    `chunkmask.losses.aggregate_loss`, treating each trajectory as a sequence of chunk "tokens".

    Three layouts:

    - padded: `(traj, chunk)` tensors with `mask` marking valid chunks;
    - packed: `(M,)` tensors produced by `chunkmask.shrink` with the `selection` that made them
      (e.g. from `ProbabilisticChunkMasker`); per-trajectory modes then group packed chunks by
      `selection.packed_traj_index`, so the loss equals the padded loss restricted to the
      selected chunks (for `token-mean`, `seq-mean-token-mean` and `seq-mean-token-sum`;
      `seq-mean-token-sum-norm` divides by the row length, which is 1 for packed chunks);
    - flat: `(m,)` chunks without a selection (e.g. a minibatch of a packed batch), each chunk
      its own sequence.

    Args:
        logp: chunk log-probabilities under the current policy, `(traj, chunk)` or `(M,)`.
        old_logp: behaviour chunk log-probabilities, same shape.
        advantages: chunk advantages, same shape.
        mask: bool, True for chunks that count. Defaults to all True.
        selection: the `Selection` a packed batch came from; None for a padded batch.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$ (0.28 as in RLinf and SimpleVLA-RL).
        dual_clip: dual-clip constant $c > 1$, or None for none.
        loss_agg_mode: `aggregate_loss` mode over chunks.
        log_ratio_clamp: clamp of the log-ratio before `exp`.

    Returns:
        A `ChunkedPPOLossOutput` of 0-d tensors.

    Raises:
        TypeError: on non-float inputs, a non-bool mask or a `selection` of the wrong type.
        ValueError: on mismatched shapes, a packed batch without `selection` (or a padded one
            with it), or a bad clip or mode option.

    Example:
        >>> import torch
        >>> logp = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], requires_grad=True)
        >>> out = chunked_ppo_loss(logp, logp.detach() - 0.1, torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        >>> round(out.loss.item(), 4), round(out.ratio_mean.item(), 4)
        (-0.6907, 1.1052)
    """
    check_tensor(logp, "logp", dtypes="float")
    check_tensor(old_logp, "old_logp", dtypes="float")
    check_tensor(advantages, "advantages", dtypes="float")
    check_same_shape(old_logp, "old_logp", logp, "logp")
    check_same_shape(advantages, "advantages", logp, "logp")
    mask = _check_mask(mask, "mask", logp, "logp")
    check_option(loss_agg_mode, "loss_agg_mode", _AGG_MODES)
    rows, row_mask, segment, num_segments = _segments(logp, mask, selection)
    safe_logp = torch.where(mask, logp, 0)
    safe_old = torch.where(mask, old_logp, 0)
    safe_adv = torch.where(mask, advantages, 0)
    out = clipped_surrogate(
        safe_logp,
        safe_old,
        safe_adv,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_clamp=log_ratio_clamp,
    )
    per_chunk = out.loss if logp.ndim == 2 else out.loss[:, None]
    loss = aggregate_loss(
        per_chunk, row_mask, loss_agg_mode, segment=segment, num_segments=num_segments
    )
    return ChunkedPPOLossOutput(
        loss=loss,
        clip_frac_low=_masked_mean(out.clipped_low, mask),
        clip_frac_high=_masked_mean(out.clipped_high, mask),
        dual_clip_frac=_masked_mean(out.dual_clipped, mask),
        approx_kl=_masked_mean((safe_old - safe_logp).detach(), mask),
        ratio_mean=_masked_mean(out.ratio.detach(), mask),
    )


def _huber(error: Tensor, delta: float) -> Tensor:
    abs_err = error.abs()
    return torch.where(abs_err <= delta, 0.5 * error.square(), delta * (abs_err - 0.5 * delta))


def value_loss(
    values: Float[Tensor, "*batch"],
    returns: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    old_values: Float[Tensor, "*batch"] | None = None,
    clip: float | None = 0.2,
    loss_type: Literal["huber", "mse"] = "huber",
    huber_delta: float = 10.0,
    selection: Selection | None = None,
    loss_agg_mode: LossAggMode = "token-mean",
) -> Float[Tensor, ""]:
    r"""The PPO value loss per chunk, with optional value clipping and a Huber or squared error.

    $$
    V^{clip}_t = V^{old}_t + \mathrm{clip}(V_t - V^{old}_t, -c, c), \qquad
    \ell_t = \max\big(L(V_t - \hat G_t),\ L(V^{clip}_t - \hat G_t)\big)
    $$

    with $L$ the Huber loss $L_\delta(e) = \tfrac12 e^2$ for $|e| \le \delta$ and
    $\delta(|e| - \tfrac12\delta)$ beyond, or $\tfrac12 e^2$ (`loss_type="mse"`). Without
    `old_values` or with `clip=None` the unclipped $L(V_t - \hat G_t)$ is used. The defaults (Huber
    $\delta = 10$, value clip 0.2) are RLinf's chunk-level PPO defaults.

    Args:
        values: current value predictions, `(traj, chunk)` with `mask`, or packed `(M,)` with
            `selection`.
        returns: value targets $\hat G_t$ (from `chunk_gae`), same shape.
        mask: bool, True for chunks that count. Defaults to all True.
        old_values: the values recorded at rollout time, for clipping.
        clip: value clip $c > 0$, or None for no clipping.
        loss_type: `"huber"` or `"mse"`.
        huber_delta: Huber threshold $\delta > 0$.
        selection: the `Selection` a packed batch came from; None for a padded batch.
        loss_agg_mode: `aggregate_loss` mode over chunks.

    Returns:
        0-d loss tensor.

    Raises:
        TypeError: on non-float inputs or a non-bool mask.
        ValueError: on mismatched shapes, a non-positive `clip` or `huber_delta`, or an unknown
            option.

    Example:
        >>> import torch
        >>> v = torch.tensor([[0.0, 1.0]], requires_grad=True)
        >>> loss = value_loss(v, torch.tensor([[1.0, 30.0]]), old_values=torch.tensor([[0.0, 1.0]]))
        >>> round(loss.item(), 4)  # (0.5 + 10 * (29 - 5)) / 2
        120.25
    """
    check_tensor(values, "values", dtypes="float")
    check_tensor(returns, "returns", dtypes="float")
    check_same_shape(returns, "returns", values, "values")
    mask = _check_mask(mask, "mask", values, "values")
    check_option(loss_type, "loss_type", ("huber", "mse"))
    check_option(loss_agg_mode, "loss_agg_mode", _AGG_MODES)
    huber_delta = check_range(huber_delta, "huber_delta", low=0.0, low_open=True)
    if clip is not None:
        clip = check_range(clip, "clip", low=0.0, low_open=True)
    if old_values is not None:
        check_tensor(old_values, "old_values", dtypes="float")
        check_same_shape(old_values, "old_values", values, "values")
    rows, row_mask, segment, num_segments = _segments(values, mask, selection)
    dtype = torch.promote_types(values.dtype, torch.float32)
    v = torch.where(mask, values.to(dtype), 0)
    g = torch.where(mask, returns.to(dtype), 0)

    def err(e: Tensor) -> Tensor:
        return _huber(e, huber_delta) if loss_type == "huber" else 0.5 * e.square()

    per_chunk = err(v - g)
    if old_values is not None and clip is not None:
        old = torch.where(mask, old_values.to(dtype), 0)
        clipped = old + (v - old).clamp(-clip, clip)
        per_chunk = torch.maximum(per_chunk, err(clipped - g))
    if values.ndim == 1:
        per_chunk = per_chunk[:, None]
    return aggregate_loss(
        per_chunk, row_mask, loss_agg_mode, segment=segment, num_segments=num_segments
    )


def whiten_advantages(
    advantages: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Float[Tensor, "*batch"]:
    r"""Normalise advantages to zero mean and unit variance over the masked entries.

    $$
    \tilde A = \frac{A - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad
    \mu = \frac{\sum m A}{\sum m}, \quad
    \sigma^2 = \frac{\sum m (A - \mu)^2}{\sum m - 1}
    $$

    (Bessel-corrected, as verl's `masked_whiten`). With `shift_mean=False` the mean is added back,
    so only the scale changes. Masked entries are returned as 0; they may hold NaN. Fewer than two
    valid entries give a variance of 0.

    Args:
        advantages: advantages of any shape.
        mask: bool of the same shape, True for entries that count. Defaults to all True.
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance.

    Returns:
        Whitened advantages, same shape and dtype as `advantages` (statistics in float32 or
        float64).

    Raises:
        TypeError: if `advantages` is not floating point or `mask` is not bool.
        ValueError: if `mask` has another shape or `eps` is negative.

    Example:
        >>> import torch
        >>> a = torch.tensor([[1.0, 2.0, 3.0, float("nan")]])
        >>> whiten_advantages(a, torch.tensor([[True, True, True, False]]))
        tensor([[-1.,  0.,  1.,  0.]])
    """
    check_tensor(advantages, "advantages", dtypes="float")
    mask = _check_mask(mask, "mask", advantages, "advantages")
    eps = check_range(eps, "eps", low=0.0)
    check_real(eps, "eps")
    dtype = _acc_dtype(advantages.dtype)
    a = torch.where(mask, advantages.to(dtype), 0)
    count = mask.sum().to(dtype)
    mean = a.sum() / count.clamp_min(1)
    centred = torch.where(mask, a - mean, 0)
    var = centred.square().sum() / (count - 1).clamp_min(1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0).to(advantages.dtype)
