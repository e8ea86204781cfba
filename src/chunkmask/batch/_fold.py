r"""Fold the Horvitz-Thompson estimator into the advantages, for trainers that cannot weight rows.

A trainer's own loss (RLinf's, verl's, SimpleVLA-RL's) takes a bool mask and its own normalisers;
it cannot multiply a chunk's tokens by $1/\pi$ or divide by the full, selection-independent
counts. The PPO-clip surrogate is positively homogeneous in the advantage: for $w > 0$,
$\max(-wA\rho, -wA\,\mathrm{clip}(\rho)) = w \max(-A\rho, -A\,\mathrm{clip}(\rho))$ (and the
dual clip's $\min$ with $-wAc$ likewise), because the branch taken depends on the sign of $A$
alone. So scaling each selected chunk's advantage by

$$
w_{i,t} = \frac{1}{\pi_{i,t}} \cdot \frac{\text{the masked loss's normaliser}}
    {\text{the Horvitz-Thompson normaliser}}
$$

makes the trainer's masked loss equal the Horvitz-Thompson loss exactly, in value and gradient.
The fold is exact for the policy term only: an entropy bonus or KL penalty computed by the trainer
keeps its masked normalisation.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import check_option, check_positive_int, check_tensor
from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import _check_selection

# `chunkmask.aggregation` imports this package, so its names are restated here (a test pins them).
_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def _div(num: Tensor, den: Tensor) -> Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def horvitz_thompson_weights(
    selection: Selection,
    loss_agg_mode: str,
    *,
    tokens: Bool[Tensor, "traj k"] | Float[Tensor, "traj k"] | None = None,
    tokens_per_chunk: int = 1,
    validate_args: bool = False,
) -> Float[Tensor, "traj k"]:
    r"""Per-slot advantage weights that turn the masked loss into the Horvitz-Thompson loss.

    With the weights $w$ returned here (one per slot of `selection`, 0 at flagged slots),
    `masked_grpo_loss(..., advantages=adv * w_packed, selection=sel)` equals
    `masked_grpo_loss(..., advantages=adv, selection=sel, estimator="horvitz_thompson")` in every
    aggregation mode, on one rank, for the policy term (`w_packed` is `w` in packed order,
    `w[sel.packed_slot_index()]`). With $n_i$ the valid tokens of trajectory $i$'s selected chunks,
    $T_i$ its available chunks, $K$ the tokens per chunk, $G_{sel} = |\{i: n_i > 0\}|$ and
    $G = |\{i: T_i > 0\}|$ (Sec. 4.5 and Eq. 11 of Anonymous et al. (2026), Probabilistic
    Chunk Masking, arXiv 2605.16154):

    | mode | $w_{i,t} \cdot \pi_{i,t}$ |
    |---|---|
    | `token-sum` | $1$ |
    | `token-mean` | $\sum_i n_i / (K \sum_i T_i)$ |
    | `seq-mean-token-sum` | $G_{sel} / G$ |
    | `seq-mean-token-sum-norm` | $G_{sel}\,k / (G\,N)$ |
    | `seq-mean-token-mean` | $G_{sel}\, n_i / (G\, K T_i)$ |

    A trainer with other normalisers (a fixed mini-batch size instead of $G_{sel}$, say) needs
    the corresponding ratio instead; the integrations compute theirs with this function's rule.

    Args:
        selection: a `Selection` carrying its inclusion probabilities.
        loss_agg_mode: one of `AGGREGATION_MODES`.
        tokens: `(traj, k)` number (or bool presence) of valid tokens in each slot; defaults to
            `tokens_per_chunk` at every selected slot.
        tokens_per_chunk: $K$, the tokens of a fully valid chunk.
        validate_args: check the selection's invariants (one host sync).

    Returns:
        `(traj, k)` float32 (float64 for a float64 `inclusion`) weights, positive at selected
        slots with a valid token, 0 elsewhere.

    Raises:
        TypeError: if `selection` is not a `Selection` or `tokens` not a tensor.
        ValueError: if the selection carries no `inclusion`, the mode is unknown, or `tokens`
            has another shape or device.

    Examples:
        >>> import torch
        >>> from chunkmask.batch import Selection, horvitz_thompson_weights
        >>> valid = torch.ones(1, 4, dtype=torch.bool)
        >>> sel = Selection.from_mask(torch.tensor([[True, False, False, False]]), valid, k=2)
        >>> sel = sel.with_inclusion(torch.full((1, 4), 0.25))
        >>> horvitz_thompson_weights(sel, "token-sum").tolist()
        [[4.0, 0.0]]
        >>> horvitz_thompson_weights(sel, "token-mean").tolist()  # 1 of 4 tokens kept
        [[1.0, 0.0]]
    """
    selection = _check_selection(selection, validate_args)
    check_option(loss_agg_mode, "loss_agg_mode", _MODES)
    k_tok = check_positive_int(tokens_per_chunk, "tokens_per_chunk")
    if selection.inclusion is None:
        raise ValueError(
            "`selection.inclusion` is required to fold the Horvitz-Thompson weights, got None: "
            "draw the selection with a sampler that records inclusion probabilities."
        )
    dtype = torch.promote_types(selection.inclusion.dtype, torch.float32)
    mask = selection.mask
    if tokens is None:
        n_slot = mask.to(dtype) * k_tok
    else:
        check_tensor(tokens, "tokens", ndim=2, dtypes=("bool", "int", "float"))
        if tokens.shape != mask.shape or tokens.device != mask.device:
            raise ValueError(
                f"`tokens` must have shape {tuple(mask.shape)} on {mask.device} (one entry per "
                f"slot of `selection`), got {tuple(tokens.shape)} on {tokens.device}."
            )
        n_slot = torch.where(mask, tokens.to(dtype), 0.0)
    pi = torch.where(mask, selection.inclusion.to(dtype), 1.0)
    inv = torch.where(n_slot > 0, 1.0 / pi, 0.0)
    n_traj = n_slot.sum(1)
    full = selection.num_chunks.to(dtype) * k_tok
    g_sel = (n_traj > 0).sum().to(dtype)
    g_full = (full > 0).sum().to(dtype)
    one = torch.ones((), dtype=dtype, device=mask.device)
    if loss_agg_mode == "token-sum":
        ratio = one
    elif loss_agg_mode == "token-mean":
        ratio = _div(n_traj.sum(), full.sum())
    elif loss_agg_mode == "seq-mean-token-sum":
        ratio = _div(g_sel, g_full)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        ratio = _div(g_sel * selection.k, g_full * selection.chunks_total)
    else:
        ratio = (_div(n_traj, full) * _div(g_sel, g_full))[:, None]
    return inv * ratio


def fold_into_advantages(
    advantages: Float[Tensor, "..."], weights: Float[Tensor, "..."]
) -> Float[Tensor, "..."]:
    r"""`advantages * weights`, broadcast over trailing token axes; detached weights.

    The Horvitz-Thompson fold of `horvitz_thompson_weights`: exact for the PPO-clip policy loss
    (with or without dual clip) whenever every weight at a valid token is positive.

    Args:
        advantages: per-chunk or per-token advantages whose leading dimensions are those of
            `weights` (e.g. `(traj, k)` or `(traj, k, K)` against `(traj, k)` weights).
        weights: non-negative floating-point weights.

    Returns:
        The folded advantages, in the dtype of `advantages`.

    Raises:
        TypeError: if either is not a floating-point tensor.
        ValueError: if the leading shape of `advantages` is not `weights.shape`.

    Examples:
        >>> import torch
        >>> fold_into_advantages(torch.ones(2, 3), torch.tensor([2.0, 0.5])).tolist()
        [[2.0, 2.0, 2.0], [0.5, 0.5, 0.5]]
    """
    check_tensor(advantages, "advantages", dtypes="float")
    check_tensor(weights, "weights", dtypes="float")
    if tuple(advantages.shape[: weights.ndim]) != tuple(weights.shape):
        raise ValueError(
            f"`advantages` must start with the shape of `weights` {tuple(weights.shape)}, got "
            f"{tuple(advantages.shape)}."
        )
    w = weights.detach().to(device=advantages.device)
    w = w.reshape(*w.shape, *([1] * (advantages.ndim - w.ndim)))
    return (advantages * w).to(advantages.dtype)
