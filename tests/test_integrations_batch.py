"""The fixed-shape gather and the Horvitz-Thompson fold that the trainer integrations build on.

`gather_chunks` is compared against `shrink` (its masked slots) and a Python loop; the fold
against `masked_grpo_loss(..., estimator="horvitz_thompson")` itself, in every mode.
"""

import pytest
import torch

from chunkmask import Clip, Selection, masked_grpo_loss, pps_sample, shrink
from chunkmask.aggregation import AGGREGATION_MODES
from chunkmask.batch import (
    fold_into_advantages,
    gather_chunks,
    horvitz_thompson_weights,
    scatter_chunks,
)
from chunkmask.batch._fold import _MODES


def _draw(seed=0, traj=5, n=7, budget=3):
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(n)[None, :] < torch.randint(1, n + 1, (traj,), generator=g)[:, None]
    valid[0] = False  # an empty trajectory
    sizes = torch.rand(traj, n, generator=g) + 0.05
    return pps_sample(sizes, budget, valid=valid, scope="trajectory", generator=g), valid


def test_modes_restated_in_fold_match_aggregation():
    assert _MODES == AGGREGATION_MODES


def test_gather_chunks_against_loop_and_shrink():
    sel, _ = _draw()
    x = torch.randn(sel.num_traj, sel.chunks_total, 4, requires_grad=True)
    adv = torch.randn(sel.num_traj)
    out = gather_chunks({"x": x, "adv": adv, "name": "keep"}, sel)
    assert out["x"].shape == (sel.num_traj, sel.k, 4)
    assert out["name"] == "keep" and out["adv"] is adv
    for i in range(sel.num_traj):
        for s in range(sel.k):
            torch.testing.assert_close(out["x"][i, s], x[i, sel.indices[i, s]])
    torch.testing.assert_close(out["x"][sel.mask], shrink(x, sel))
    out["x"][sel.mask].sum().backward()
    torch.testing.assert_close(x.grad.sum((0, 2)) > 0, sel.chunk_mask().any(0))


def test_scatter_chunks_inverts_gather_on_selected_chunks():
    sel, _ = _draw(seed=3)
    x = torch.randn(sel.num_traj, sel.chunks_total, 2)
    back = scatter_chunks(gather_chunks(x, sel), sel, fill=float("nan"))
    dense = sel.chunk_mask()
    torch.testing.assert_close(back[dense], x[dense])
    assert torch.isnan(back[~dense]).all()


def test_gather_chunks_compiles_without_recompiling_across_draws():
    compiled = torch.compile(lambda x, sel: gather_chunks(x, sel), fullgraph=True, dynamic=False)
    x = torch.randn(5, 7, 3)
    for seed in range(3):
        sel, _ = _draw(seed)
        torch.testing.assert_close(compiled(x, sel), gather_chunks(x, sel))


def test_gather_chunks_bad_input():
    sel, _ = _draw()
    with pytest.raises(TypeError, match="`selection` must be a chunkmask.Selection"):
        gather_chunks(torch.ones(5, 7), "sel")
    with pytest.raises(ValueError, match=r"`tree\['x'\]` must be shaped \(traj, N, ...\)"):
        gather_chunks({"x": torch.ones(5, 6)}, sel)
    with pytest.raises(ValueError, match=r"`tree` must be shaped \(traj, k, ...\)"):
        scatter_chunks(torch.ones(5, sel.k + 1), sel)
    with pytest.raises(TypeError, match="`fill` must be a Python bool"):
        scatter_chunks(torch.ones(5, sel.k), sel, fill="x")


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_fold_equals_horvitz_thompson_loss(mode, partial, dual):
    sel, _ = _draw(seed=1)
    g = torch.Generator().manual_seed(2)
    m, k_tok = sel.num_selected(), 4
    logp = (torch.randn(m, k_tok, generator=g) * 0.3).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(m, k_tok, generator=g)
    adv = torch.randn(m, generator=g)
    mask = torch.ones(m, k_tok, dtype=torch.bool)
    if partial:
        mask[::3, 2:] = False
    clip = Clip(dual=dual)
    ht = masked_grpo_loss(logp, old_logp=old, advantages=adv, selection=sel, mask=mask, clip=clip,
                          loss_agg_mode=mode, estimator="horvitz_thompson")
    (g_ht,) = torch.autograd.grad(ht.loss, logp)
    traj, slot = sel.packed_slot_index()
    tokens = torch.zeros(sel.mask.shape)
    tokens[traj, slot] = mask.sum(1).float()
    w = horvitz_thompson_weights(sel, mode, tokens=tokens, tokens_per_chunk=k_tok)
    assert (w[sel.mask] > 0).all() and (w[~sel.mask] == 0).all()
    folded = fold_into_advantages(adv, w[traj, slot])
    masked = masked_grpo_loss(logp, old_logp=old, advantages=folded, selection=sel, mask=mask,
                              clip=clip, loss_agg_mode=mode)
    (g_m,) = torch.autograd.grad(masked.loss, logp)
    torch.testing.assert_close(masked.loss, ht.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_m, g_ht, rtol=1e-5, atol=1e-7)


def test_with_packed_inclusion_inverts_packed_inclusion():
    sel, _ = _draw(seed=4)
    back = sel._replace(inclusion=None).with_packed_inclusion(sel.packed_inclusion())
    torch.testing.assert_close(back.inclusion, sel.inclusion)
    assert back.with_packed_inclusion(None).inclusion is None


def test_fold_bad_input():
    sel, _ = _draw()
    with pytest.raises(ValueError, match="`selection.inclusion` is required"):
        horvitz_thompson_weights(sel._replace(inclusion=None), "token-mean")
    with pytest.raises(ValueError, match="`loss_agg_mode` must be one of"):
        horvitz_thompson_weights(sel, "mean")
    with pytest.raises(ValueError, match="`tokens` must have shape"):
        horvitz_thompson_weights(sel, "token-sum", tokens=torch.ones(2, 2))
    with pytest.raises(TypeError, match="`tokens` must be a torch.Tensor"):
        horvitz_thompson_weights(sel, "token-sum", tokens=[1, 2])
    with pytest.raises(ValueError, match="`tokens_per_chunk` must be"):
        horvitz_thompson_weights(sel, "token-sum", tokens_per_chunk=0)
    with pytest.raises(ValueError, match="`advantages` must start with the shape of `weights`"):
        fold_into_advantages(torch.ones(3, 2), torch.ones(2))
    with pytest.raises(TypeError, match="`weights` must have a float dtype"):
        fold_into_advantages(torch.ones(3), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="`packed` must hold one probability per selected chunk"):
        sel.with_packed_inclusion(torch.ones(sel.num_selected() + 1))
    with pytest.raises(TypeError, match="`packed` must have a float dtype"):
        sel.with_packed_inclusion(torch.ones(sel.num_selected(), dtype=torch.int64))


def test_selection_type_is_unchanged():
    assert Selection._fields == ("indices", "mask", "num_chunks", "chunks_total", "inclusion")
