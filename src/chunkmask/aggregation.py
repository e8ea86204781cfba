r"""Loss aggregation: verl's five `loss_agg_mode`\ s, invariant to data parallelism.

Every chunkmask loss reduces a `(rows, token)` matrix of per-token losses to a scalar through
`aggregate_loss`, so one set of rules, and one set of argument names, holds for the masked GRPO,
chunked PPO, value and BC losses. The rules and the names are those of verl 0.9's `agg_loss`
(`verl/trainer/ppo/core_algos.py`): `dp_size`, `batch_num_tokens`, `global_batch_size`,
`loss_scale_factor`.

**Why global normalisers.** PCM gives every data-parallel rank a different number of selected
chunks. DDP and FSDP average gradients over ranks, so a per-rank mean weights the tokens of a rank
with few chunks more than those of a rank with many: the averaged gradient is not the gradient of
the union batch. Dividing each rank's sum by the *global* count and multiplying by `dp_size`
makes the rank average equal the union-batch loss exactly. `loss_normalizers` all-reduces those
counts for a `Selection` (or a mask) over a process group.
"""

from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int, Real
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_finite_nonnegative,
    check_option,
    check_packed_rows,
    check_positive_int,
    check_process_group,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    resolve_mask,
    values_checkable,
)
from chunkmask.batch._selection import Selection

__all__ = [
    "AGGREGATION_MODES",
    "AggregationMode",
    "LossNormalizers",
    "aggregate_loss",
    "loss_normalizers",
]

AggregationMode = Literal[
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
]
AGGREGATION_MODES: tuple[str, ...] = AggregationMode.__args__
"""The loss aggregation modes of `aggregate_loss` and every loss (verl 0.9's names)."""

_SEQ_MODES = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

Normalizer = int | float | Real[Tensor, ""]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half/bfloat16/float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """`num / den` where `den > 0`, else 0; the double `where` keeps gradients finite."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _normalizer(value: Any, name: str, ref: Tensor, validate_args: bool) -> Tensor:
    """A divisor given as a positive number or a 0-d tensor, as a 0-d tensor like `ref`."""
    if isinstance(value, Tensor):
        check_tensor(value, name, ndim=0, dtypes=("float", "int"))
        if values_checkable(value, validate_args):
            check_finite_nonnegative(value.to(torch.float64), name)
        return value.to(device=ref.device, dtype=ref.dtype)
    value = check_real(value, name)
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    return torch.tensor(value, dtype=ref.dtype, device=ref.device)


def aggregate_loss(
    loss: Float[Tensor, "rows token"],
    mask: Bool[Tensor, "rows token"] | None = None,
    mode: AggregationMode = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens: Normalizer | None = None,
    global_batch_size: Normalizer | None = None,
    loss_scale_factor: Normalizer | None = None,
    segment: Int[Tensor, " rows"] | None = None,
    num_segments: int | None = None,
    weights: Float[Tensor, " rows"] | Float[Tensor, "rows token"] | None = None,
    seq_num_tokens: Real[Tensor, " seq"] | None = None,
    validate_args: bool = False,
) -> Float[Tensor, ""]:
    r"""Reduce a `(rows, token)` loss matrix to a scalar as verl 0.9's `agg_loss` does.

    With $m_{jt}$ the mask, $w_{jt}$ the optional weights, $\ell_{jt}$ the loss, sequence $s$
    made of the rows $j$ with `segment[j] == s` (each row is its own sequence when `segment` is
    None), $S_s = \sum_{j \in s}\sum_t m_{jt} w_{jt} \ell_{jt}$ its token sum, $n_s$ its number
    of valid tokens and $P$ = `dp_size`:

    | mode | value |
    |---|---|
    | `token-mean` | $P \sum_s S_s / D$ |
    | `token-sum` | $P \sum_s S_s$ |
    | `seq-mean-token-sum` | $P \sum_{s: n_s > 0} S_s / G$ |
    | `seq-mean-token-sum-norm` | $P \sum_{s: n_s > 0} S_s / (G\,L)$ |
    | `seq-mean-token-mean` | $P \sum_{s: d_s > 0} (S_s / d_s) / G$ |

    The normalisers and their defaults (this rank's counts):

    - $D$ = `batch_num_tokens`, default $\sum_s n_s$;
    - $G$ = `global_batch_size`, default $|\{s: n_s > 0\}|$, the non-empty sequences;
    - $L$ = `loss_scale_factor`, default the horizon `loss.shape[-1]` (Dr. GRPO's constant
      divisor, arXiv 2503.20783);
    - $d_s$ = `seq_num_tokens[s]`, default $n_s$ (the Horvitz-Thompson estimator passes full,
      selection-independent lengths here).

    **Data parallelism.** With `dp_size` $P > 1$ pass the *global* $D$ (token-mean) or $G$
    (seq modes), e.g. from `loss_normalizers`; then the mean over ranks of the per-rank losses,
    and of their gradients (what DDP and FSDP compute), equals the loss of the union batch. A
    per-rank default there would silently weight ranks unequally, so it is an error.

    **Differences from verl, by design.** An empty sequence never counts, in every seq mode, as
    in verl 0.9; verl divides a sequence's sum by $n_s + 10^{-8}$ where this divides by $n_s$
    exactly. A batch with no valid token (or a divisor of 0) returns 0 with zero gradients where
    verl returns NaN. `dp_size > 1` requires the global normaliser of the mode where verl falls
    back to this rank's count. Everything else equals verl 0.9.1 to float64 rounding.

    Computed in float32 (float64 for float64 `loss`); masked entries are replaced by zeros before
    any arithmetic, so padding (even NaN) never reaches the result or the gradients.

    Args:
        loss: `(rows, token)` per-token loss.
        mask: `(rows, token)` bool, True for valid tokens. Defaults to all True.
        mode: one of `AGGREGATION_MODES`.
        dp_size: the data-parallel world size $P \ge 1$ (verl's `dp_size`).
        batch_num_tokens: $D > 0$, the global number of valid tokens (token-mean); a number or a
            0-d tensor (no host sync).
        global_batch_size: $G > 0$, the global number of non-empty sequences (seq modes).
        loss_scale_factor: $L > 0$ (seq-mean-token-sum-norm). Required with `segment`, where the
            horizon is the padded length of a sequence, not of a row.
        segment: `(rows,)` int sequence id of each row, in `[0, num_segments)` (e.g.
            `Selection.packed_traj_index`); None makes every row its own sequence.
        num_segments: the number of sequences, required with `segment`.
        weights: `(rows,)` or `(rows, token)` non-negative weights multiplying each valid token's
            loss in $S_s$ only (e.g. Horvitz-Thompson weights $1/\pi$).
        seq_num_tokens: `(num_segments,)` (or `(rows,)` without `segment`) per-sequence divisors
            $d_s \ge 0$ for seq-mean-token-mean; a sequence with $d_s = 0$ contributes 0.
        validate_args: also run the value checks (`segment` in range, `weights` and normalisers
            finite and non-negative) on accelerators, where they synchronise. On the CPU in eager
            mode they always run.

    Returns:
        The aggregated 0-d loss.

    Raises:
        TypeError: on a non-floating `loss`/`weights`, a non-bool `mask`, a non-integer
            `segment`, or a normaliser that is neither a number nor a 0-d tensor.
        ValueError: on an unknown `mode`, mismatched shapes or devices, a negative or non-finite
            normaliser or weight, `dp_size > 1` without the mode's global normaliser, an
            out-of-range `segment`, or `num_segments`/`segment` given alone.

    Examples:
        >>> import torch
        >>> loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> for mode in AGGREGATION_MODES:
        ...     print(mode, round(aggregate_loss(loss, mask, mode).item(), 4))
        token-mean 2.5
        token-sum 10.0
        seq-mean-token-mean 3.0
        seq-mean-token-sum 5.0
        seq-mean-token-sum-norm 1.6667
        >>> # Rank 0 of two, with 10 valid tokens in the union batch:
        >>> aggregate_loss(loss, mask, "token-mean", dp_size=2, batch_num_tokens=10)
        tensor(2.)
    """
    check_tensor(loss, "loss", ndim=2, dtypes="float")
    mask = resolve_mask(mask, "mask", loss, "loss")
    check_option(mode, "mode", AGGREGATION_MODES)
    dp_size = check_positive_int(dp_size, "dp_size")
    if dp_size > 1:
        if mode == "token-mean" and batch_num_tokens is None:
            raise ValueError(
                "`batch_num_tokens` (the global number of valid tokens) is required when "
                f"`dp_size` > 1 in token-mean mode, got None with dp_size={dp_size}."
            )
        if mode in _SEQ_MODES and global_batch_size is None:
            raise ValueError(
                "`global_batch_size` (the global number of non-empty sequences) is required when "
                f"`dp_size` > 1 in {mode} mode, got None with dp_size={dp_size}."
            )
    if values_checkable(loss, validate_args):
        check_finite(loss, "loss", where=mask)
    dtype = compute_dtype(loss.dtype)
    rows = loss.shape[0]
    ref = loss.new_zeros((), dtype=dtype)
    given = {
        "batch_num_tokens": batch_num_tokens,
        "global_batch_size": global_batch_size,
        "loss_scale_factor": loss_scale_factor,
    }
    norms = {k: None if v is None else _normalizer(v, k, ref, validate_args) for k, v in given.items()}
    values = torch.where(mask, loss.to(dtype), 0.0)
    if weights is not None:
        check_tensor(weights, "weights", ndim=(1, 2), dtypes="float")
        check_same_device(weights, "weights", loss, "loss")
        if weights.shape != loss.shape[: weights.ndim]:
            raise ValueError(
                f"`weights` must have shape {tuple(loss.shape[:1])} or {tuple(loss.shape)} (that "
                f"of `loss`), got {tuple(weights.shape)}."
            )
        w = weights if weights.ndim == 2 else weights[:, None].expand(loss.shape)
        if values_checkable(w, validate_args):
            check_finite_nonnegative(w, "weights", where=mask)
        values = values * torch.where(mask, w.to(dtype), 0.0)
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
            raise ValueError("`num_segments` is required with `segment`, got None.")
        n_seq = check_positive_int(num_segments, "num_segments", allow_zero=True)
        if rows and values_checkable(segment, validate_args):
            bad = (segment < 0) | (segment >= n_seq)
            if bool(bad.any()):
                raise ValueError(
                    f"`segment` must lie in [0, {n_seq}) (`num_segments`={n_seq}), got "
                    f"{int(bad.sum())} value(s) outside it (e.g. {int(segment[bad][0])})."
                )
        seg = segment.to(torch.int64).clamp(0, max(n_seq - 1, 0))
        zeros = torch.zeros(n_seq, dtype=dtype, device=loss.device)
        seq_sum = zeros.index_add(0, seg, row_sum) if n_seq else zeros
        seq_count = zeros.index_add(0, seg, row_count) if n_seq else zeros

    present = seq_count > 0
    if mode == "token-mean":
        den = norms["batch_num_tokens"]
        return safe_div(seq_sum.sum() * dp_size, seq_count.sum() if den is None else den)
    if mode == "token-sum":
        return seq_sum.sum() * dp_size
    if mode == "seq-mean-token-mean":
        if seq_num_tokens is None:
            per_seq = safe_div(seq_sum, seq_count)
        else:
            check_tensor(seq_num_tokens, "seq_num_tokens", ndim=1, dtypes=("float", "int"))
            check_shape(seq_num_tokens, "seq_num_tokens", (n_seq,))
            check_same_device(seq_num_tokens, "seq_num_tokens", loss, "loss")
            if values_checkable(seq_num_tokens, validate_args):
                check_finite_nonnegative(seq_num_tokens.to(torch.float64), "seq_num_tokens")
            per_seq = safe_div(seq_sum, seq_num_tokens.to(dtype))
        total = torch.where(present, per_seq, 0.0).sum()
    else:
        total = torch.where(present, seq_sum, 0.0).sum()
    den = norms["global_batch_size"]
    if den is None:
        den = present.sum().to(dtype)
    if mode == "seq-mean-token-sum-norm":
        scale = norms["loss_scale_factor"]
        if scale is None:
            if segment is not None:
                raise ValueError(
                    "`loss_scale_factor` is required with `segment` in seq-mean-token-sum-norm "
                    "mode (a row is not a sequence, so its length is not the horizon), got None."
                )
            scale = torch.tensor(float(loss.shape[-1]), dtype=dtype, device=loss.device)
        den = den * scale
    return safe_div(total * dp_size, den)


class LossNormalizers(NamedTuple):
    """The data-parallel normalisers every loss takes as one `norms=` keyword.

    `loss_normalizers` fills the counts (summed over a process group); build one by hand to pass
    verl's `global_batch_info` through. A field left None takes the loss's single-rank default
    (see `aggregate_loss`); with `dp_size > 1` the mode's global count is required.

    Attributes:
        dp_size: the number of data-parallel ranks the counts were summed over (verl's
            `dp_size`).
        batch_num_tokens: the global number of tokens token-mean divides by ($D$), or None.
        global_batch_size: the global number of non-empty sequences the seq modes divide by
            ($G$), or None.
        loss_scale_factor: the seq-mean-token-sum-norm divisor ($L$), or None for the default.
    """

    dp_size: int = 1
    batch_num_tokens: Normalizer | None = None
    global_batch_size: Normalizer | None = None
    loss_scale_factor: Normalizer | None = None


def check_norms(norms: Any, name: str = "norms") -> LossNormalizers:
    """Return `norms` (None means single-rank defaults), checking its type."""
    if norms is None:
        return LossNormalizers()
    if not isinstance(norms, LossNormalizers):
        raise TypeError(
            f"`{name}` must be a chunkmask.LossNormalizers or None, got {type(norms).__name__}."
        )
    return norms


def _world_size(process_group: Any) -> int:
    import torch.distributed as dist

    check_process_group(process_group)
    if not dist.is_initialized():
        raise ValueError(
            "`process_group` needs an initialised torch.distributed default group, got a "
            f"{type(process_group).__name__} while torch.distributed is not initialised."
        )
    return dist.get_world_size(process_group)


def loss_normalizers(
    selection: Selection | None = None,
    mask: Bool[Tensor, " packed"] | Bool[Tensor, "rows token"] | None = None,
    *,
    estimator: Literal["masked", "horvitz_thompson"] = "masked",
    tokens_per_chunk: int = 1,
    process_group: Any = None,
    validate_args: bool = False,
) -> LossNormalizers:
    r"""Count the tokens and non-empty sequences of a batch, summed over a process group.

    The counts are those every loss's default normalisers use on one rank, so passing the
    all-reduced result to the loss on every rank (with its `dp_size`) makes DDP's gradient average
    the gradient of the union batch:

    - with a `selection` (a packed batch of selected chunks; sequences are trajectories):
        - `estimator="masked"` (Eq. 11): the valid tokens of the selected chunks (`mask`, `(M,)`
          or `(M, K)`; without it `tokens_per_chunk` per selected chunk), and the trajectories
          with at least one of them;
        - `estimator="horvitz_thompson"`: the full, selection-independent counts $K \sum_i T_i$
          ($T_i$ = `selection.num_chunks`, $K$ the tokens per chunk) and $|\{i: T_i > 0\}|$,
          the divisors of the unbiased estimator;
    - without a selection: `mask` is a `(rows, token)` batch whose rows are the sequences.

    Args:
        selection: the `Selection` the batch was packed with, or None.
        mask: bool, `(M,)` or `(M, K)` with a selection, `(rows, token)` without one.
        estimator: `"masked"` or `"horvitz_thompson"`, as passed to `masked_grpo_loss`.
        tokens_per_chunk: $K$ when `mask` is None (1 for one log-probability per chunk).
        process_group: a `torch.distributed.ProcessGroup` to sum over (one all-reduce), or None
            for this process alone (`dp_size` 1).
        validate_args: check that a packed `mask` has one row per selected chunk (one host
            sync).

    Returns:
        A `LossNormalizers` with 0-d int64 counts on the device of the inputs.

    Raises:
        TypeError: on a `selection` that is not a `Selection`, a non-bool `mask`, or a
            `process_group` that is not a process group.
        ValueError: on a `mask` of the wrong rank or size, neither argument given, an unknown
            `estimator`, or a process group while torch.distributed is not initialised.

    Examples:
        >>> import torch
        >>> from chunkmask.batch import Selection
        >>> sel = Selection.from_mask(torch.tensor([[True, False, True], [False, False, False]]))
        >>> norms = loss_normalizers(sel, torch.ones(2, 4, dtype=torch.bool))
        >>> norms.dp_size, int(norms.batch_num_tokens), int(norms.global_batch_size)
        (1, 8, 1)
    """
    check_option(estimator, "estimator", ("masked", "horvitz_thompson"))
    tokens_per_chunk = check_positive_int(tokens_per_chunk, "tokens_per_chunk")
    dp_size = 1 if process_group is None else _world_size(process_group)
    if selection is None:
        if mask is None:
            raise ValueError("`mask` is required when `selection` is None, got None.")
        check_tensor(mask, "mask", ndim=2, dtypes="bool")
        per_seq = mask.sum(-1)
    else:
        if not isinstance(selection, Selection):
            raise TypeError(f"`selection` must be a Selection, got {type(selection).__name__}.")
        device = selection.mask.device
        if mask is not None:
            check_tensor(mask, "mask", ndim=(1, 2), dtypes="bool")
            check_same_device(mask, "mask", selection.mask, "selection")
            check_packed_rows(mask.shape[0], "mask", selection.mask, validate_args)
            tokens_per_chunk = 1 if mask.ndim == 1 else mask.shape[1]
        if estimator == "horvitz_thompson":
            per_seq = selection.num_chunks * tokens_per_chunk
        elif mask is None:
            per_seq = selection.counts * tokens_per_chunk
        else:
            rows = mask if mask.ndim == 1 else mask.sum(-1)
            segment = selection.packed_traj_index(size=mask.shape[0])
            zeros = torch.zeros(selection.num_traj, dtype=torch.int64, device=device)
            per_seq = zeros.index_add(0, segment, rows.to(torch.int64)) if mask.shape[0] else zeros
    counts = torch.stack([per_seq.sum(), (per_seq > 0).sum()]).to(torch.int64)
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    return LossNormalizers(dp_size, counts[0], counts[1])
