"""Slow float64 loop oracles for the GRPO losses, on the dense `(traj, chunk, token)` layout.

Everything is a Python loop over trajectories, chunks and tokens, written straight from the
formulas: the per-token surrogate of Eq. (2), then each aggregation mode of Eq. (11) with the
masked or the Horvitz-Thompson estimator.
"""

import math


def surrogate(logp, old_logp, adv, clip_low=0.2, clip_high=0.28, dual_clip=None):
    """Per-token clipped surrogate loss (a float)."""
    log_ratio = min(max(logp - old_logp, -20.0), 20.0)
    ratio = math.exp(log_ratio)
    clipped_ratio = min(max(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss = max(-adv * ratio, -adv * clipped_ratio)
    if dual_clip is not None and adv < 0:
        loss = min(loss, -adv * dual_clip)
    return loss


def kl_token(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    d = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1.0, -10.0), 10.0)


def aggregate(
    values, token_mask, selected, mode, *, k, estimator="masked", inclusion=None, num_chunks=None
):
    """Aggregate dense per-token `values[i][t][j]` over the selected chunks.

    `token_mask[i][t][j]` marks valid tokens, `selected[i][t]` selected chunks, `k` is the
    number of selection slots, `inclusion[i][t]` the inclusion probability and `num_chunks[i]`
    the full number of valid chunks of trajectory i (both for Horvitz-Thompson).
    """
    traj = len(values)
    n = len(values[0]) if traj else 0
    tokens = len(values[0][0]) if traj and n else 0
    ht = estimator == "horvitz_thompson"
    seq_sum, seq_count = [], []
    for i in range(traj):
        s, c = 0.0, 0
        for t in range(n):
            if not selected[i][t]:
                continue
            w = 1.0 / inclusion[i][t] if ht else 1.0
            for j in range(tokens):
                if token_mask[i][t][j]:
                    s += w * values[i][t][j]
                    c += 1
        seq_sum.append(s)
        seq_count.append(c)
    total = math.fsum(seq_sum)
    if mode == "token-mean":
        den = sum(num_chunks) * tokens if ht else sum(seq_count)
        return total / den if den > 0 else 0.0
    if mode == "seq-mean-token-mean":
        per = []
        for i in range(traj):
            den = num_chunks[i] * tokens if ht else seq_count[i]
            if den > 0:
                per.append(seq_sum[i] / den)
        return math.fsum(per) / len(per) if per else 0.0
    if mode == "token-sum":
        return total
    g = sum(1 for i in range(traj) if (num_chunks[i] > 0 if ht else seq_count[i] > 0))
    if mode == "seq-mean-token-sum":
        return total / g if g > 0 else 0.0
    if mode == "seq-mean-token-sum-norm":
        return total / (g * (n if ht else k) * tokens) if g > 0 else 0.0
    raise ValueError(mode)


def masked_grpo_loss(
    logp,
    old_logp,
    adv,
    token_mask,
    selected,
    mode,
    *,
    k,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    estimator="masked",
    inclusion=None,
    num_chunks=None,
    entropy=None,
    entropy_coef=0.0,
    ref_logp=None,
    kl_coef=0.0,
    kl_type="k3",
):
    """Total loss on dense nested lists; `adv[i][t][j]` per token. Returns a dict of parts."""
    traj = len(logp)
    n = len(logp[0]) if traj else 0
    tokens = len(logp[0][0]) if traj and n else 0
    sur = [[[0.0] * tokens for _ in range(n)] for _ in range(traj)]
    kl = [[[0.0] * tokens for _ in range(n)] for _ in range(traj)]
    for i in range(traj):
        for t in range(n):
            for j in range(tokens):
                if token_mask[i][t][j] and selected[i][t]:
                    sur[i][t][j] = surrogate(
                        logp[i][t][j],
                        old_logp[i][t][j],
                        adv[i][t][j],
                        clip_low,
                        clip_high,
                        dual_clip,
                    )
                    if ref_logp is not None:
                        kl[i][t][j] = kl_token(logp[i][t][j], ref_logp[i][t][j], kl_type)
    kw = dict(k=k, estimator=estimator, inclusion=inclusion, num_chunks=num_chunks)
    policy = aggregate(sur, token_mask, selected, mode, **kw)
    ent = aggregate(entropy, token_mask, selected, mode, **kw) if entropy is not None else 0.0
    kld = aggregate(kl, token_mask, selected, mode, **kw) if ref_logp is not None else 0.0
    return {
        "policy": policy,
        "entropy": ent,
        "kl": kld,
        "total": policy - entropy_coef * ent + kl_coef * kld,
    }


def policy_loss_by_hand(
    logp,
    old_logp,
    adv,
    token_mask,
    selected,
    mode,
    *,
    k,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    estimator="masked",
    inclusion=None,
    num_chunks=None,
):
    """The policy loss on the full dense `(traj, chunk, token)` tensors, differentiable.

    Unselected chunks and invalid tokens are removed by hand (Python loops pick the kept entries
    one at a time, so nothing else is ever read); each kept token's surrogate is written out
    with scalar tensor ops, and the modes are the sums of `aggregate`. `adv` is `(traj,)`,
    `inclusion` `(traj, chunk)` (floats), `num_chunks` a list. Returns a 0-d tensor whose
    gradient flows to `logp`.
    """
    import torch

    traj, n, tokens = logp.shape
    ht = estimator == "horvitz_thompson"
    zero = logp.new_zeros(())
    seq_sum, seq_count = [], []
    for i in range(traj):
        s, c = zero, 0
        for t in range(n):
            if not bool(selected[i][t]):
                continue
            w = 1.0 / float(inclusion[i][t]) if ht else 1.0
            for j in range(tokens):
                if not bool(token_mask[i][t][j]):
                    continue
                a = float(adv[i])
                ratio = torch.exp(torch.clamp(logp[i, t, j] - float(old_logp[i, t, j]), -20, 20))
                term = torch.maximum(
                    -a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
                )
                if dual_clip is not None and a < 0:
                    term = torch.minimum(term, zero - a * dual_clip)
                s = s + w * term
                c += 1
        seq_sum.append(s)
        seq_count.append(c)
    total = sum(seq_sum, zero)
    if mode == "token-mean":
        den = sum(num_chunks) * tokens if ht else sum(seq_count)
        return total / den if den > 0 else zero
    if mode == "seq-mean-token-mean":
        per = []
        for i in range(traj):
            den = num_chunks[i] * tokens if ht else seq_count[i]
            if den > 0:
                per.append(seq_sum[i] / den)
        return sum(per, zero) / len(per) if per else zero
    if mode == "token-sum":
        return total
    g = sum(1 for i in range(traj) if (num_chunks[i] > 0 if ht else seq_count[i] > 0))
    if mode == "seq-mean-token-sum":
        return total / g if g > 0 else zero
    if mode == "seq-mean-token-sum-norm":
        return total / (g * (n if ht else k) * tokens) if g > 0 else zero
    raise ValueError(mode)

