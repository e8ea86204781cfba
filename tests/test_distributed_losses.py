"""Two gloo ranks with PCM-shrunk batches of different sizes: DDP's averaged gradient equals the
single-process gradient on the union batch, for every loss, estimator and aggregation mode."""

import pytest
import torch
import torch.distributed as dist

from _reference.inclusion import loss_kwargs, with_packed_inclusion
from _spawn import run_workers
from chunkmask import Clip
from chunkmask.aggregation import AGGREGATION_MODES, loss_normalizers
from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import shrink
from chunkmask.log_probs import chunk_log_prob
from chunkmask.losses import bc_loss, chunked_ppo_loss, masked_grpo_loss, value_loss
from chunkmask.pcm._inclusion import inclusion_probabilities
from chunkmask.pcm._sampling import plackett_luce_sample

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORLD = 2
TRAJ = (7, 3)  # rank 0 holds more trajectories: different packed sizes
N, K, DIM, VOCAB, BUDGET = 8, 3, 4, 5, 3
F64 = torch.float64
LOSSES = ("grpo", "grpo_ht", "ppo", "value", "bc")


def rank_batch(rank):
    """Rank `rank`'s padded rollouts, its PCM-style selection, and the packed batch."""
    g = torch.Generator().manual_seed(100 + rank)
    traj = TRAJ[rank]
    lengths = torch.randint(1, N + 1, (traj,), generator=g)
    lengths[-1] = 2  # a short trajectory: fewer chunks than the budget would suggest
    valid = torch.arange(N)[None] < lengths[:, None]
    token_mask = (torch.rand(traj, N, K, generator=g) < 0.8) & valid[..., None]
    weights = torch.where(valid, torch.rand(traj, N, generator=g, dtype=F64) + 0.05, 0.0)
    sel = plackett_luce_sample(weights, BUDGET, valid=valid, generator=g)
    batch = {
        "obs": torch.randn(traj, N, K, DIM, generator=g, dtype=F64),
        "tokens": torch.randint(0, VOCAB, (traj, N, K), generator=g),
        "token_mask": token_mask,
        "old_logp": -torch.rand(traj, N, K, generator=g, dtype=F64),
        "adv": torch.randn(traj, generator=g, dtype=F64)[:, None].expand(traj, N).contiguous(),
        "returns": torch.randn(traj, N, generator=g, dtype=F64),
        "inclusion": inclusion_probabilities(weights, BUDGET, valid=valid),
    }
    return sel, shrink(batch, sel)


def parameters():
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(DIM, VOCAB, generator=g, dtype=F64).requires_grad_(True),
        torch.randn(DIM, generator=g, dtype=F64).requires_grad_(True),
    )


def compute_loss(kind, mode, sel, packed, policy, critic, **norms):
    """One loss on a packed batch; token-level for GRPO, chunk-level for PPO, value and BC."""
    logits = packed["obs"] @ policy
    token_logp = torch.log_softmax(logits, -1).gather(-1, packed["tokens"][..., None])[..., 0]
    mask = packed["token_mask"]
    if kind in ("grpo", "grpo_ht"):
        ht = kind == "grpo_ht"
        return masked_grpo_loss(token_logp, **loss_kwargs(old_logp=packed["old_logp"], advantages=packed["adv"], selection=with_packed_inclusion(sel, packed["inclusion"] if ht else None), mask=mask, loss_agg_mode=mode, estimator="horvitz_thompson" if ht else "masked", clip=Clip(low=0.2, high=0.28, dual=3.0), **norms)).loss
    chunk_mask = mask.any(-1)
    chunk_logp = chunk_log_prob(token_logp, mask)
    if kind == "ppo":
        old = chunk_log_prob(packed["old_logp"], mask)
        return chunked_ppo_loss(chunk_logp, **loss_kwargs(old_logp=old, advantages=packed["adv"], selection=sel, mask=chunk_mask, loss_agg_mode=mode, **norms)).loss
    if kind == "value":
        values = packed["obs"].mean(-2) @ critic
        return value_loss(values, **loss_kwargs(returns=packed["returns"], selection=sel, mask=chunk_mask, loss_agg_mode=mode, **norms))
    return bc_loss(chunk_logp, **loss_kwargs(selection=sel, mask=chunk_mask, loss_agg_mode=mode, event_size=K, **norms))


def normalizers(kind, sel, packed, process_group=None):
    mask = packed["token_mask"]
    if kind in ("grpo", "grpo_ht"):
        estimator = "horvitz_thompson" if kind == "grpo_ht" else "masked"
        return loss_normalizers(sel, mask, estimator=estimator, process_group=process_group)
    return loss_normalizers(sel, mask.any(-1), process_group=process_group)


def gradients(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, allow_unused=True)
                      if g is not None] or [torch.zeros(0, dtype=F64)])


def _worker(rank, world):
    sel, packed = rank_batch(rank)
    params = parameters()
    out = {"packed_rows": int(packed["obs"].shape[0])}
    for kind in LOSSES:
        norms = normalizers(kind, sel, packed, process_group=dist.group.WORLD)
        for mode in AGGREGATION_MODES:
            loss = compute_loss(kind, mode, sel, packed, *params, **norms._asdict())
            grad = gradients(loss, params)
            dist.all_reduce(grad)  # what DDP does: sum, then divide by the world size
            out[kind, mode] = grad / world
            # The trap the normalisers fix: each rank normalising by its own counts.
            naive = gradients(compute_loss(kind, mode, sel, packed, *params), params)
            dist.all_reduce(naive)
            out[kind, mode, "naive"] = naive / world
    return out


def union_batch():
    """Both ranks' packed batches and selections, concatenated along trajectories."""
    parts = [rank_batch(r) for r in range(WORLD)]
    sel = Selection(
        torch.cat([s.indices for s, _ in parts]),
        torch.cat([s.mask for s, _ in parts]),
        torch.cat([s.num_chunks for s, _ in parts]),
        N,
    )
    packed = {key: torch.cat([p[key] for _, p in parts]) for key in parts[0][1]}
    return sel, packed


def test_data_parallel_gradients_equal_the_union_batch(tmp_path):
    results = run_workers(_worker, WORLD, tmp_path)
    assert results[0]["packed_rows"] != results[1]["packed_rows"]
    sel, packed = union_batch()
    params = parameters()
    differs = []
    for kind in LOSSES:
        for mode in AGGREGATION_MODES:
            want = gradients(compute_loss(kind, mode, sel, packed, *params), params)
            assert want.abs().max() > 0, (kind, mode)
            for res in results:  # after the all-reduce every rank holds the same gradient
                torch.testing.assert_close(res[kind, mode], want, rtol=1e-10, atol=1e-12)
            naive = results[0][kind, mode, "naive"]
            differs.append((kind, mode, not torch.allclose(naive, want, rtol=1e-6)))
    # Each rank normalising by its own counts (dp_size 1) is not the union gradient, in any mode
    # (token-sum: DDP's average halves the sum).
    assert all(wrong for *_, wrong in differs), [d for d in differs if not d[2]]
