"""Log-probabilities of whole action chunks from per-token or per-dimension ones."""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_min_ndim,
    check_positive_int,
    check_tensor,
    resolve_mask,
    values_checkable,
)

__all__ = ["chunk_log_prob"]


def chunk_log_prob(
    logp: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    event_dims: int = 1,
    validate_args: bool = False,
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
        validate_args: check that the counted entries are finite (off by default: one host sync).

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
    mask = resolve_mask(mask, "mask", logp, "logp")
    if values_checkable(logp, validate_args):
        check_finite(logp, "logp", where=mask)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    safe = torch.where(mask, logp.to(dtype), 0)
    return safe.sum(dim=tuple(range(-event_dims, 0)))
