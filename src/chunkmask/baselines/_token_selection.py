r"""The high-entropy minority of tokens: a competing rule that updates on a fraction of tokens.

Wang et al. (2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning", arXiv 2506.01939) restrict the policy gradient to the
top 20% of tokens by the policy's entropy at that position, and report matching full-gradient RLVR
on Qwen3-8B. Where PCM picks whole chunks by phase, this picks single tokens by entropy; as a mask
it saves no backward compute by itself (the forward still covers every token), so compare it at
equal update compute by pairing it with `shrink` on chunks (`topk_sample` on per-chunk entropy) or
read it as an upper bound on what token-level selection can keep.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_range,
    check_tensor,
    resolve_mask,
    values_checkable,
)

__all__ = ["high_entropy_token_mask"]


def high_entropy_token_mask(
    entropy: Float[Tensor, "*batch"],
    mask: Bool[Tensor, "*batch"] | None = None,
    *,
    fraction: float = 0.2,
    validate_args: bool = False,
) -> Bool[Tensor, "*batch"]:
    r"""Keep the `fraction` of valid tokens with the highest entropy, over the whole batch.

    $$
    \text{keep}_t = \big[\, m_t \wedge H_t \ge \tau \,\big],
    $$

    with $\tau$ the entropy of the $\lceil f \cdot \sum_t m_t \rceil$-th highest valid token, so
    exactly that many tokens are kept (ties at $\tau$ broken by position, the earlier first). The
    batch-level threshold is the paper's rule (a threshold per batch, not per sequence). Pass the
    result as the `mask` of a loss: the kept tokens' losses are normalised by the kept count.

    Args:
        entropy: per-token policy entropy, any shape (e.g. `(rows, token)`), detached or not.
        mask: bool, the shape of `entropy`, True for valid tokens. Defaults to all True.
        fraction: $f$ in `(0, 1]`, the share of valid tokens kept (the paper: 0.2).
        validate_args: check that the valid entropies are finite (off by default: it reads the values, one host sync).

    Returns:
        Bool keep mask, the shape of `entropy` (a subset of `mask`).

    Raises:
        TypeError: on a non-float `entropy` or a non-bool `mask`.
        ValueError: on a mask of another shape, `fraction` outside `(0, 1]`, or non-finite valid
            entropies.

    Example:
        >>> import torch
        >>> h = torch.tensor([[0.1, 2.0, 0.5], [1.5, 0.0, 3.0]])
        >>> high_entropy_token_mask(h, fraction=0.5).int().tolist()
        [[0, 1, 0], [1, 0, 1]]
    """
    check_tensor(entropy, "entropy", dtypes="float")
    mask = resolve_mask(mask, "mask", entropy, "entropy")
    fraction = check_range(fraction, "fraction", low=0.0, high=1.0, low_open=True)
    if values_checkable(entropy, validate_args):
        check_finite(entropy, "entropy", where=mask)
    flat_h = entropy.detach().reshape(-1).to(torch.float64)
    flat_m = mask.reshape(-1)
    count = flat_m.sum()
    keep_n = torch.ceil(count.to(torch.float64) * fraction).to(torch.int64)
    # Rank valid tokens by entropy (descending), invalid ones last; keep the first keep_n.
    key = torch.where(flat_m, flat_h, -torch.inf)
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    keep = (rank < keep_n) & flat_m
    return keep.reshape(entropy.shape)
