"""Tests for chunkmask.losses: loop oracles, verl parity, properties, gradients, errors."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkmask._checks
from _reference import losses as ref
from _reference import verl
from _reference.inclusion import loss_kwargs, with_packed_inclusion
from chunkmask import Clip, LossNormalizers, Regularizers
from chunkmask.advantages import group_relative_advantages
from chunkmask.aggregation import AGGREGATION_MODES, aggregate_loss
from chunkmask.batch._selection import Selection
from chunkmask.losses import (
    PolicyLossOutput,
    SurrogateOutput,
    chunked_ppo_loss,
    clipped_surrogate,
    masked_grpo_loss,
)

MODES = list(AGGREGATION_MODES)


def unchecked(fn):
    """The function without the run-time jaxtyping wrapper the test hook may add.

    Error-path tests exercise the library's own argument checks (the jaxtyping hook would reject
    some bad inputs first, with its own error); the compile test needs the plain function since
    jaxtyped wrappers are not traceable by dynamo.
    """
    return getattr(fn, "__wrapped__", fn)


F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def make_batch(
    seed,
    traj=5,
    n=6,
    tokens=3,
    *,
    token_p=0.8,
    full_tokens=False,
    empty_traj=True,
    first_token=False,
    dtype=F64,
):
    """Dense `(traj, n, tokens)` batch with NaN in every invalid entry."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0 if empty_traj else 1, n + 1, (traj,), generator=g)
    valid = torch.arange(n)[None, :] < lengths[:, None]
    if full_tokens:
        token_mask = valid[..., None].expand(traj, n, tokens).clone()
    else:
        token_mask = (torch.rand(traj, n, tokens, generator=g) < token_p) & valid[..., None]
    if first_token:
        token_mask[:, 0, 0] = valid[:, 0]
    logp = -2.0 * torch.rand(traj, n, tokens, generator=g, dtype=F64)
    old_logp = logp + 0.4 * torch.randn(traj, n, tokens, generator=g, dtype=F64)
    ref_logp = logp + 0.4 * torch.randn(traj, n, tokens, generator=g, dtype=F64)
    entropy = torch.rand(traj, n, tokens, generator=g, dtype=F64)
    group = torch.arange(traj) // 2
    rewards = torch.randint(0, 2, (traj,), generator=g).to(F64)
    if traj >= 2:
        rewards[0], rewards[1] = 1.0, 0.0  # group 0 is informative
    adv = group_relative_advantages(rewards, group)
    nan = torch.tensor(float("nan"), dtype=F64)
    batch = dict(
        logp=torch.where(token_mask, logp, nan).to(dtype),
        old_logp=torch.where(token_mask, old_logp, nan).to(dtype),
        ref_logp=torch.where(token_mask, ref_logp, nan).to(dtype),
        entropy=torch.where(token_mask, entropy, nan).to(dtype),
        adv=adv.to(dtype),
    )
    return batch, valid, token_mask


def pack(selection, x):
    """Gather `(traj, n, ...)` -> packed `(M, ...)` by hand (row-major over selected chunks)."""
    traj, n = x.shape[:2]
    return x.reshape(traj * n, *x.shape[2:])[selection.flat_index()]


def packed_inputs(batch, token_mask, selection):
    p = {key: pack(selection, value) for key, value in batch.items() if key != "adv"}
    p["adv"] = batch["adv"][selection.packed_traj_index()]
    p["mask"] = pack(selection, token_mask)
    return p


def run(p, selection, **kwargs):
    return masked_grpo_loss(p["logp"], **loss_kwargs(old_logp=p["old_logp"], advantages=p["adv"], selection=selection, mask=p["mask"], regularizers=Regularizers(entropy=p.get("entropy"), ref_logp=p.get("ref_logp")), **kwargs))


def nested(x):
    return x.double().tolist()


# ----------------------------------------------------------------------------- clipped_surrogate


@pytest.mark.parametrize("dual_clip", [None, 3.0, 1.5])
def test_clipped_surrogate_matches_loop(dual_clip):
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(40, 5, generator=g, dtype=F64)
    old = logp + 0.6 * torch.randn(40, 5, generator=g, dtype=F64)
    adv = torch.randn(40, generator=g, dtype=F64)
    out = clipped_surrogate(logp, old_logp=old, advantages=adv, clip=Clip(low=0.2, high=0.28, dual=dual_clip))
    assert isinstance(out, SurrogateOutput)
    want = torch.tensor(
        [
            [
                ref.surrogate(
                    float(logp[i, j]), float(old[i, j]), float(adv[i]), 0.2, 0.28, dual_clip
                )
                for j in range(5)
            ]
            for i in range(40)
        ],
        dtype=F64,
    )
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.ratio, (logp - old).exp())
    # flags against their definitions
    ratio = out.ratio
    a = adv[:, None].expand_as(ratio)
    assert torch.equal(out.clipped_high, (a > 0) & (ratio > 1.28))
    assert torch.equal(out.clipped_low, (a < 0) & (ratio < 0.8))
    if dual_clip is None:
        assert not out.dual_clipped.any()
    else:
        assert torch.equal(out.dual_clipped, (a < 0) & (ratio > dual_clip))
    assert out.clipped_low.any() and out.clipped_high.any()


def test_clipped_surrogate_log_ratio_clamp_and_broadcast():
    logp = torch.tensor([[50.0, -50.0]])
    out = clipped_surrogate(logp, old_logp=torch.zeros(1, 2), advantages=torch.tensor([[-1.0, 1.0]]))
    torch.testing.assert_close(out.ratio, torch.tensor([[math.exp(20.0), math.exp(-20.0)]]))
    # A = -1 with ratio e^20: max(e^20, 0.8 clip) = e^20; A = 1 with ratio e^-20: -e^-20.
    torch.testing.assert_close(out.loss, torch.tensor([[math.exp(20.0), -math.exp(-20.0)]]))
    per_token = clipped_surrogate(logp, old_logp=torch.zeros(1, 2), advantages=torch.tensor([2.0, 2.0])[None])
    broadcast = clipped_surrogate(logp, old_logp=torch.zeros(1, 2), advantages=torch.tensor([2.0]))
    torch.testing.assert_close(per_token.loss, broadcast.loss)
    assert broadcast.loss.shape == (1, 2)


def test_clipped_surrogate_bf16_computes_in_float32():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(8, 4, generator=g)).bfloat16()
    old = (logp.float() + 0.3 * torch.randn(8, 4, generator=g)).bfloat16()
    adv = torch.randn(8, generator=g).bfloat16()
    out = clipped_surrogate(logp, old_logp=old, advantages=adv)
    want = clipped_surrogate(logp.float(), old_logp=old.float(), advantages=adv.float())
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want.loss)


# ----------------------------------------------------------------------------- masked_grpo_loss


def dense_reference(
    batch,
    token_mask,
    sel_mask,
    mode,
    *,
    k,
    inclusion=None,
    num_chunks=None,
    estimator="masked",
    **kwargs,
):
    traj, n, tokens = batch["logp"].shape
    adv = batch["adv"].double()[:, None, None].expand(traj, n, tokens)
    clean = {
        key: torch.where(token_mask, batch[key].double(), 0.0)
        for key in ("logp", "old_logp", "ref_logp", "entropy")
    }
    return ref.masked_grpo_loss(
        nested(clean["logp"]),
        nested(clean["old_logp"]),
        nested(adv),
        token_mask.tolist(),
        sel_mask.tolist(),
        mode,
        k=k,
        estimator=estimator,
        inclusion=None if inclusion is None else nested(inclusion),
        num_chunks=None if num_chunks is None else num_chunks.tolist(),
        entropy=nested(clean["entropy"]),
        ref_logp=nested(clean["ref_logp"]),
        **kwargs,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ["masked", "horvitz_thompson"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_masked_grpo_matches_loop_reference(mode, estimator, kl_type):
    seed = MODES.index(mode) * 7 + len(kl_type) + (estimator == "masked")
    batch, valid, token_mask = make_batch(seed, traj=6, n=7, tokens=3)
    g = torch.Generator().manual_seed(seed)
    sel_mask = valid & (torch.rand(valid.shape, generator=g) < 0.5)
    sel = Selection.from_mask(sel_mask, valid, k=4 if int(sel_mask.sum(1).max()) <= 4 else None)
    inclusion = torch.rand(valid.shape, generator=g, dtype=F64) * 0.9 + 0.1
    p = packed_inputs(batch, token_mask, sel)
    kwargs = dict(
        clip_low=0.2, clip_high=0.28, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1, kl_type=kl_type
    )
    out = run(
        p,
        sel,
        loss_agg_mode=mode,
        estimator=estimator,
        inclusion=pack(sel, inclusion),
        validate_args=True,
        **kwargs,
    )
    assert isinstance(out, PolicyLossOutput)
    assert all(v.ndim == 0 for v in out)
    want = dense_reference(
        batch,
        token_mask,
        sel_mask,
        mode,
        k=sel.k,
        inclusion=inclusion,
        num_chunks=sel.num_chunks,
        estimator=estimator,
        **kwargs,
    )
    for field, key in (
        ("policy_loss", "policy"),
        ("entropy_loss", "entropy"),
        ("kl_loss", "kl"),
        ("loss", "total"),
    ):
        torch.testing.assert_close(getattr(out, field).item(), want[key], rtol=1e-10, atol=1e-12)


def full_batch_verl(batch, valid, token_mask, mode, **kwargs):
    """verl's actor loss on the full batch: one row per trajectory, chunk tokens flattened."""
    traj, n, tokens = batch["logp"].shape
    rows = lambda x: torch.where(token_mask, x.double(), 0.0).reshape(traj, n * tokens)  # noqa: E731
    response_mask = token_mask.reshape(traj, n * tokens).double()
    adv = batch["adv"].double()[:, None] * response_mask
    return rows, response_mask, adv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_full_selection_equals_verl_full_batch(mode, dual_clip):
    traj, n, tokens = 8, 6, 4
    # every trajectory has a valid token (verl's seq-mean-token-mean is NaN otherwise)
    batch, valid, token_mask = make_batch(
        10 + len(mode), traj, n, tokens, empty_traj=False, first_token=True
    )
    # widen the ratio spread so that both clips and the dual clip are active
    spread = torch.randn(batch["logp"].shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    batch["old_logp"] = batch["old_logp"] + 1.2 * spread
    # group advantages as verl computes them (groups of 2, Bessel std, eps=1e-6)
    g = torch.Generator().manual_seed(5)
    rewards = torch.randint(0, 2, (traj,), generator=g).double()
    rewards[:2] = torch.tensor([1.0, 0.0])
    group = torch.arange(traj) // 2
    batch["adv"] = group_relative_advantages(rewards, group, eps=1e-6)
    rows, response_mask, _ = full_batch_verl(batch, valid, token_mask, mode)
    adv_verl = verl.grpo_outcome_advantage(rewards[:, None], torch.ones(traj, 1), group.numpy())
    adv_rows = adv_verl[:, :1] * response_mask
    lp = rows(batch["logp"]).requires_grad_(True)
    old = rows(batch["old_logp"])
    pg_loss, clipfrac, ppo_kl, clipfrac_lower = verl.policy_loss_vanilla(
        old, lp, adv_rows, response_mask, mode, 0.2, 0.28, dual_clip
    )
    total = verl.actor_loss(
        old,
        lp,
        adv_rows,
        response_mask,
        loss_agg_mode=mode,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=dual_clip,
        entropy=rows(batch["entropy"]),
        entropy_coeff=1e-3,
        ref_log_prob=rows(batch["ref_logp"]),
        kl_loss_coef=0.05,
        kl_loss_type="low_var_kl",
    )
    sel = Selection.from_mask(valid)
    p = packed_inputs(batch, token_mask, sel)
    p["logp"] = p["logp"].clone().requires_grad_(True)
    out = run(
        p,
        sel,
        loss_agg_mode=mode,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=dual_clip,
        entropy_coef=1e-3,
        kl_coef=0.05,
        kl_type="k3",
        validate_args=True,
    )
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.policy_loss, pg_loss, **tol)
    torch.testing.assert_close(out.loss, total, **tol)
    torch.testing.assert_close(out.clip_frac_low + out.clip_frac_high, clipfrac, **tol)
    torch.testing.assert_close(out.dual_clip_frac, clipfrac_lower, **tol)
    torch.testing.assert_close(out.approx_kl, ppo_kl, **tol)
    assert out.clip_frac_low > 0 and out.clip_frac_high > 0
    assert (out.dual_clip_frac > 0) == (dual_clip is not None)
    # gradients agree too (per token, mapped back through the packing)
    (grad_verl,) = torch.autograd.grad(total, lp)
    (grad_ours,) = torch.autograd.grad(out.loss, p["logp"])
    dense = torch.zeros(traj * n, tokens, dtype=F64)
    dense[sel.flat_index()] = grad_ours
    torch.testing.assert_close(dense.reshape(traj, n * tokens), grad_verl, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_full_selection_equals_full_batch_with_empty_trajectories(mode):
    """With trajectories that have nothing valid, compare to the dense aggregate (not verl)."""
    traj, n, tokens = 6, 5, 3
    batch, valid, token_mask = make_batch(21, traj, n, tokens)
    valid[2] = False
    token_mask[2] = False
    sel = Selection.from_mask(valid)
    out = run(packed_inputs(batch, token_mask, sel), sel, loss_agg_mode=mode, dual_clip=3.0)
    surr = clipped_surrogate(torch.where(token_mask, batch["logp"], 0.0), old_logp=torch.where(token_mask, batch["old_logp"], 0.0), advantages=batch["adv"][:, None, None].expand(traj, n, tokens).contiguous(), clip=Clip(dual=3.0)).loss.reshape(traj, n * tokens)
    want = aggregate_loss(surr, token_mask.reshape(traj, n * tokens), mode)
    torch.testing.assert_close(out.policy_loss, want)


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    traj=st.integers(1, 5),
    n=st.integers(1, 6),
    tokens=st.integers(1, 3),
    keep=st.floats(0.0, 1.0),
    mode=st.sampled_from(MODES),
)
def test_mask_equals_drop(seed, traj, n, tokens, keep, mode):
    batch, valid, token_mask = make_batch(seed, traj, n, tokens)
    g = torch.Generator().manual_seed(seed)
    sel_mask = valid & (torch.rand(traj, n, generator=g) < keep)
    k = max(int(sel_mask.sum(1).max()), 1)
    sel = Selection.from_mask(sel_mask, valid, k=k)
    got = run(
        packed_inputs(batch, token_mask, sel),
        sel,
        loss_agg_mode=mode,
        dual_clip=3.0,
        entropy_coef=0.01,
        kl_coef=0.1,
    )
    # drop by hand: compact every trajectory's selected chunks into a (traj, k) batch
    dropped = {
        key: torch.full((traj, k, tokens), float("nan"), dtype=F64)
        for key in ("logp", "old_logp", "ref_logp", "entropy")
    }
    dropped_mask = torch.zeros(traj, k, tokens, dtype=torch.bool)
    dropped_valid = torch.zeros(traj, k, dtype=torch.bool)
    for i in range(traj):
        chunks = [t for t in range(n) if sel_mask[i, t]]
        for slot, t in enumerate(chunks):
            for key in dropped:
                dropped[key][i, slot] = batch[key][i, t]
            dropped_mask[i, slot] = token_mask[i, t]
            dropped_valid[i, slot] = True
    dropped["adv"] = batch["adv"]
    full = Selection.from_mask(dropped_valid)
    want = run(
        packed_inputs(dropped, dropped_mask, full),
        full,
        loss_agg_mode=mode,
        dual_clip=3.0,
        entropy_coef=0.01,
        kl_coef=0.1,
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(MODES),
    estimator=st.sampled_from(["masked", "horvitz_thompson"]),
)
def test_padding_never_reaches_outputs_or_gradients(seed, mode, estimator):
    batch, valid, token_mask = make_batch(seed, traj=4, n=5, tokens=3)
    sel = Selection.from_mask(
        valid & (torch.rand(4, 5, generator=torch.Generator().manual_seed(seed)) < 0.6), valid
    )
    p = packed_inputs(batch, token_mask, sel)
    m = p["mask"]
    results = []
    for filler in (float("nan"), float("inf"), 0.0, -7.0):
        q = {
            key: torch.where(m, value, filler) if value.shape == m.shape else value
            for key, value in p.items()
            if key != "mask"
        }
        q["mask"] = m
        inc = torch.where(torch.ones_like(q["adv"], dtype=torch.bool), 0.5, 0.5)
        q["logp"] = q["logp"].clone().requires_grad_(True)
        q["entropy"] = q["entropy"].clone().requires_grad_(True)
        out = run(
            q,
            sel,
            loss_agg_mode=mode,
            estimator=estimator,
            inclusion=inc,
            dual_clip=3.0,
            entropy_coef=0.01,
            kl_coef=0.1,
        )
        grads = torch.autograd.grad(out.loss, [q["logp"], q["entropy"]])
        for grad in grads:
            assert torch.isfinite(grad).all()
            assert (grad[~m] == 0).all()
        assert all(torch.isfinite(v) for v in out)
        results.append((out, grads))
    for out, grads in results[1:]:
        for a, b in zip(out, results[0][0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_permuting_trajectories_leaves_loss_unchanged(mode):
    batch, valid, token_mask = make_batch(31, traj=7, n=5, tokens=2)
    g = torch.Generator().manual_seed(4)
    sel_mask = valid & (torch.rand(7, 5, generator=g) < 0.6)
    inclusion = torch.rand(7, 5, generator=g, dtype=F64) * 0.5 + 0.5
    perm = torch.randperm(7, generator=g)
    outs = []
    for order in (torch.arange(7), perm):
        b = {key: value[order] for key, value in batch.items()}
        sel = Selection.from_mask(sel_mask[order], valid[order], k=5)
        for estimator in ("masked", "horvitz_thompson"):
            outs.append(
                run(
                    packed_inputs(b, token_mask[order], sel),
                    sel,
                    loss_agg_mode=mode,
                    estimator=estimator,
                    inclusion=pack(sel, inclusion[order]),
                    dual_clip=3.0,
                    entropy_coef=0.01,
                    kl_coef=0.1,
                )
            )
    for a, b in zip(outs[:2], outs[2:], strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def _subsets(n_valid, n, rng_seed):
    """All subsets of the first `n_valid` of `n` chunks (size <= 2) with random probabilities."""
    g = torch.Generator().manual_seed(rng_seed)
    subsets = [s for size in (1, 2) for s in itertools.combinations(range(n_valid), size)]
    subsets.append(())
    probs = torch.rand(len(subsets), generator=g, dtype=F64) + 0.1
    probs = probs / probs.sum()
    masks = []
    for s in subsets:
        m = torch.zeros(n, dtype=torch.bool)
        m[list(s)] = True
        masks.append(m)
    inclusion = torch.zeros(n, dtype=F64)
    for m, p in zip(masks, probs, strict=True):
        inclusion += p * m
    return masks, probs, inclusion


@pytest.mark.parametrize("full_tokens", [True, False])
def test_horvitz_thompson_is_unbiased_by_enumeration(full_tokens):
    """E[HT loss] over every subset of a small design equals the full loss, in every mode."""
    traj, n, tokens = 3, 3, 2
    batch, valid, token_mask = make_batch(41, traj, n, tokens, empty_traj=False)
    valid = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    batch = {key: torch.nan_to_num(value, nan=-0.5) for key, value in batch.items()}
    token_mask = token_mask & valid[..., None]
    token_mask[:, 0, 0] = True
    if full_tokens:
        token_mask = valid[..., None].expand(traj, n, tokens).clone()
    designs = [_subsets(int(valid[i].sum()), n, 50 + i) for i in range(traj)]
    inclusion = torch.stack([d[2] for d in designs]).clamp_min(1e-3)  # invalid chunks never used
    fields = ("loss", "policy_loss", "entropy_loss", "kl_loss")
    kwargs = dict(dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1)
    full_sel = Selection.from_mask(valid)
    full_p = packed_inputs(batch, token_mask, full_sel)
    full = {mode: run(full_p, full_sel, loss_agg_mode=mode, **kwargs) for mode in MODES}
    expected = {mode: torch.zeros(len(fields), dtype=F64) for mode in MODES}
    for combo in itertools.product(*[list(zip(d[0], d[1], strict=True)) for d in designs]):
        sel_mask = torch.stack([m for m, _ in combo])
        prob = math.prod(float(p) for _, p in combo)
        sel = Selection.from_mask(sel_mask, valid, k=2)
        p = packed_inputs(batch, token_mask, sel)
        for mode in MODES:
            out = run(
                p,
                sel,
                loss_agg_mode=mode,
                estimator="horvitz_thompson",
                inclusion=pack(sel, inclusion),
                **kwargs,
            )
            expected[mode] += prob * torch.stack([getattr(out, f) for f in fields])
    for mode in MODES:
        want = torch.stack([getattr(full[mode], f) for f in fields])
        if full_tokens or mode in ("token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            torch.testing.assert_close(expected[mode], want, rtol=1e-10, atol=1e-12)
        else:  # token-mean modes with partially valid chunks: the full-length divisor differs
            assert not torch.allclose(expected[mode], want)


def test_horvitz_thompson_expected_gradient_is_full_gradient():
    traj, n, tokens = 2, 3, 2
    batch, valid, token_mask = make_batch(43, traj, n, tokens, full_tokens=True, empty_traj=False)
    valid = torch.ones(traj, n, dtype=torch.bool)
    token_mask = torch.ones(traj, n, tokens, dtype=torch.bool)
    batch = {key: torch.nan_to_num(value, nan=-0.5) for key, value in batch.items()}
    dense = torch.where(token_mask, batch["logp"], 0.0).clone().requires_grad_(True)
    batch = {**batch, "logp": dense}
    designs = [_subsets(n, n, 60 + i) for i in range(traj)]
    inclusion = torch.stack([d[2] for d in designs])
    kwargs = dict(loss_agg_mode="seq-mean-token-mean", dual_clip=3.0)
    full_sel = Selection.from_mask(valid)
    (want,) = torch.autograd.grad(
        run(packed_inputs(batch, token_mask, full_sel), full_sel, **kwargs).loss, dense
    )
    got = torch.zeros_like(dense)
    for combo in itertools.product(*[list(zip(d[0], d[1], strict=True)) for d in designs]):
        sel = Selection.from_mask(torch.stack([m for m, _ in combo]), valid, k=2)
        prob = math.prod(float(p) for _, p in combo)
        out = run(
            packed_inputs(batch, token_mask, sel),
            sel,
            estimator="horvitz_thompson",
            inclusion=pack(sel, inclusion),
            **kwargs,
        )
        (grad,) = torch.autograd.grad(out.loss, dense, allow_unused=True)
        if grad is not None:
            got += prob * grad
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_one_token_per_chunk_and_per_token_advantages():
    batch, valid, token_mask = make_batch(7, traj=4, n=5, tokens=1)
    sel = Selection.from_mask(valid)
    p = packed_inputs(batch, token_mask, sel)
    for mode in MODES:
        a = run(p, sel, loss_agg_mode=mode, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1)
        flat = {key: (value[:, 0] if value.ndim == 2 else value) for key, value in p.items()}
        b = run(flat, sel, loss_agg_mode=mode, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1)
        per_token = dict(p, adv=p["adv"][:, None].clone())
        c = run(per_token, sel, loss_agg_mode=mode, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1)
        for x, y, z in zip(a, b, c, strict=True):
            torch.testing.assert_close(x, y)
            torch.testing.assert_close(x, z)


def test_diagnostics():
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 4.0], [1.0, 1.0]], dtype=F64))
    old = torch.zeros(3, 2, dtype=F64)
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    sel = Selection.from_mask(torch.tensor([[True, True], [True, False]]))
    out = masked_grpo_loss(logp, old_logp=old, advantages=adv, selection=sel, mask=mask, clip=Clip(dual=3.0))
    assert out.clip_frac_high.item() == pytest.approx(1 / 5)  # 1.5 > 1.28 with A > 0
    assert out.clip_frac_low.item() == pytest.approx(1 / 5)  # 0.5 < 0.8 with A < 0
    assert out.dual_clip_frac.item() == pytest.approx(1 / 5)  # 4 > 3 with A < 0
    lr = torch.log(torch.tensor([1.5, 0.5, 0.5, 4.0, 1.0], dtype=F64))
    assert out.approx_kl.item() == pytest.approx(float(-lr.mean()))
    assert not out.approx_kl.requires_grad
    zero = masked_grpo_loss(logp, old_logp=old, advantages=adv, selection=sel, mask=mask)
    assert zero.entropy_loss.item() == 0.0 and zero.kl_loss.item() == 0.0


def test_empty_selection_gives_zero_loss_and_finite_grads():
    sel = Selection.from_mask(torch.zeros(3, 4, dtype=torch.bool))
    logp = torch.zeros(0, 2, requires_grad=True)
    for mode in MODES:
        for estimator in ("masked", "horvitz_thompson"):
            out = masked_grpo_loss(logp, old_logp=logp.detach(), advantages=torch.zeros(0), selection=with_packed_inclusion(sel, torch.zeros(0) + 0.5), loss_agg_mode=mode, estimator=estimator)
            assert all(v.item() == 0.0 for v in out[:-1])  # all but the on-policy weight 1
            assert out.behaviour_weight_mean.item() == 1.0
            (grad,) = torch.autograd.grad(out.loss, logp)
            assert grad.shape == (0, 2)


def test_zero_gradient_at_masked_positions():
    batch, valid, token_mask = make_batch(8, traj=4, n=5, tokens=3)
    sel = Selection.from_mask(valid)
    p = packed_inputs(batch, token_mask, sel)
    for key in ("logp", "old_logp", "ref_logp", "entropy", "adv"):
        p[key] = p[key].clone().requires_grad_(True)
    for mode in MODES:
        out = run(p, sel, loss_agg_mode=mode, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1)
        grads = torch.autograd.grad(out.loss, [p["logp"], p["ref_logp"], p["entropy"]])
        for grad in grads:
            assert torch.isfinite(grad).all()
            assert (grad[~p["mask"]] == 0).all()
            assert (grad[p["mask"]] != 0).any()


# ----------------------------------------------------------------------------- gradcheck


def test_gradcheck_clipped_surrogate():
    g = torch.Generator().manual_seed(11)
    logp = (-torch.rand(6, 3, generator=g, dtype=F64)).requires_grad_(True)
    old = logp.detach() + 0.5 * torch.randn(6, 3, generator=g, dtype=F64)
    adv = torch.randn(6, generator=g, dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda lp, a: clipped_surrogate(lp, old_logp=old, advantages=a, clip=Clip(dual=1.5)).loss, (logp, adv)
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ["masked", "horvitz_thompson"])
def test_gradcheck_masked_grpo_loss(mode, estimator):
    batch, valid, token_mask = make_batch(13, traj=3, n=3, tokens=2)
    sel = Selection.from_mask(valid)
    p = packed_inputs(batch, token_mask, sel)
    inclusion = torch.full_like(p["adv"], 0.7)
    m = p["mask"]
    args = [
        torch.where(m, p[key], 0.0).requires_grad_(True) for key in ("logp", "entropy", "ref_logp")
    ]
    adv = p["adv"].clone().requires_grad_(True)

    def f(logp, entropy, ref_logp, advantages):
        return masked_grpo_loss(logp, old_logp=torch.where(m, p["old_logp"], 0.0), advantages=advantages, selection=with_packed_inclusion(sel, inclusion), mask=m, loss_agg_mode=mode, estimator=estimator, clip=Clip(dual=3.0), regularizers=Regularizers(entropy=entropy, entropy_coef=0.1, ref_logp=ref_logp, kl_coef=0.2)).loss

    assert torch.autograd.gradcheck(f, (*args, adv))


# ----------------------------------------------------------------------------- dtypes, compile


@pytest.mark.parametrize("estimator", ["masked", "horvitz_thompson"])
def test_bfloat16_is_finite_and_close_to_float32(estimator):
    batch, valid, token_mask = make_batch(14, traj=6, n=8, tokens=4)
    sel = Selection.from_mask(valid)
    p32 = {
        k: v.float() if v.is_floating_point() else v
        for k, v in packed_inputs(batch, token_mask, sel).items()
    }
    p16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in p32.items()}
    inc = torch.full((p32["logp"].shape[0],), 0.6)
    for mode in MODES:
        kw = dict(
            loss_agg_mode=mode, estimator=estimator, dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1
        )
        a = run(p16, sel, inclusion=inc.bfloat16(), **kw)
        b = run(p32, sel, inclusion=inc, **kw)
        assert a.loss.dtype == torch.float32
        for x, y in zip(a, b, strict=True):
            assert torch.isfinite(x)
            torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-2)


def test_output_dtypes():
    batch, valid, token_mask = make_batch(15, traj=3, n=3, tokens=2)
    sel = Selection.from_mask(valid)
    p = packed_inputs(batch, token_mask, sel)
    assert all(v.dtype == F64 for v in run(p, sel))
    p32 = {k: v.float() if v.is_floating_point() else v for k, v in p.items()}
    assert all(v.dtype == torch.float32 for v in run(p32, sel))


@pytest.mark.skipif(
    hasattr(chunkmask._checks.check_tensor, "__wrapped__"),
    reason="run-time jaxtyping/beartype wrappers are not traceable by dynamo (pytorch#122093); "
    "run this test without the jaxtyping pytest hook",
)
def test_torch_compile_fullgraph():
    batch, valid, token_mask = make_batch(16, traj=4, n=5, tokens=3, dtype=torch.float32)
    sel = Selection.from_mask(valid)
    p = packed_inputs(batch, token_mask, sel)
    sel = with_packed_inclusion(sel, torch.full((p["logp"].shape[0],), 0.5))

    def f(logp, old_logp, adv, selection, mask, entropy, ref_logp):
        return masked_grpo_loss(logp, old_logp=old_logp, advantages=adv, selection=selection, mask=mask, loss_agg_mode="seq-mean-token-mean", estimator="horvitz_thompson", validate_args=False, clip=Clip(dual=3.0), regularizers=Regularizers(entropy=entropy, entropy_coef=0.01, ref_logp=ref_logp, kl_coef=0.1))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (p["logp"], p["old_logp"], p["adv"], sel, p["mask"], p["entropy"], p["ref_logp"])
    got = compiled(*args)
    want = f(*args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- errors


def _ok():
    sel = Selection.from_mask(torch.tensor([[True, True], [True, False]]))
    return dict(
        logp=torch.zeros(3, 2), old_logp=torch.zeros(3, 2), advantages=torch.zeros(3), selection=sel
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            dict(old_logp=torch.zeros(3, 3)),
            ValueError,
            r"`old_logp` must have the same shape as `logp` \(3, 2\), got \(3, 3\)",
        ),
        (
            dict(logp=torch.zeros(3, 2, 1), old_logp=torch.zeros(3, 2, 1)),
            ValueError,
            r"`logp` must be packed \(M,\) or \(M, K\), got 3 dimensions",
        ),
        (dict(logp=torch.zeros(3, 2, dtype=torch.int64)), TypeError, r"`logp` must have a float"),
        (
            dict(advantages=torch.zeros(4)),
            ValueError,
            r"`advantages` must have the shape of `logp` \(3, 2\) or a leading part of it, got \(4,\)",
        ),
        (dict(advantages=torch.zeros(3, dtype=torch.int64)), TypeError, r"`advantages` must have"),
        (dict(mask=torch.ones(3, 2)), TypeError, r"`mask` must have a bool dtype"),
        (
            dict(mask=torch.ones(3, 1, dtype=torch.bool)),
            ValueError,
            r"`mask` must have the same shape as `logp` \(3, 2\), got \(3, 1\)",
        ),
        (dict(selection=(1, 2)), TypeError, r"`selection` must be a chunkmask.Selection, got tuple"),
        (dict(loss_agg_mode="seq-mean"), ValueError, r"`loss_agg_mode` must be one of"),
        (dict(estimator="ht"), ValueError, r"`estimator` must be one of"),
        (dict(kl_type="k4"), ValueError, r"`regularizers.kl_type` must be one of"),
        (dict(clip_low=-0.1), ValueError, r"`clip.low` must lie in \[0.0, 1.0\]"),
        (dict(clip_low=1.5), ValueError, r"`clip.low` must lie in"),
        (dict(clip_high=-0.1), ValueError, r"`clip.high` must lie in"),
        (dict(clip_high=float("nan")), ValueError, r"`clip.high` must be finite"),
        (dict(dual_clip=1.0), ValueError, r"`clip.dual` must lie in \(1.0, inf\)"),
        (dict(dual_clip=0.5), ValueError, r"`clip.dual` must lie in"),
        (dict(estimator="horvitz_thompson"), ValueError, r"`selection.inclusion` is required"),
        (
            dict(
                estimator="horvitz_thompson",
                inclusion=torch.tensor([0.5, 0.0, 1.0]),
                validate_args=True,
            ),
            ValueError,
            r"`selection.inclusion` must lie in \(0, 1\], got 1 value",
        ),
        (
            dict(
                estimator="horvitz_thompson",
                inclusion=torch.tensor([0.5, 1.5, 1.0]),
                validate_args=True,
            ),
            ValueError,
            r"`selection.inclusion` must lie in \(0, 1\]",
        ),
        (dict(entropy_coef=0.1), ValueError, r"`regularizers.entropy` is required"),
        (dict(kl_coef=0.1), ValueError, r"`regularizers.ref_logp` is required"),
        (dict(entropy=torch.zeros(3, 1)), ValueError, r"`regularizers.entropy` must have the same shape"),
        (dict(ref_logp=torch.zeros(2, 2)), ValueError, r"`regularizers.ref_logp` must have the same shape"),
        (
            dict(entropy_coef=float("inf"), entropy=torch.zeros(3, 2)),
            ValueError,
            r"`regularizers.entropy_coef` must be finite",
        ),
        (
            dict(
                logp=torch.zeros(4, 2),
                old_logp=torch.zeros(4, 2),
                advantages=torch.zeros(4),
                validate_args=True,
            ),
            ValueError,
            r"`logp` must have one row per selected chunk of `selection` \(3\), got 4 rows",
        ),
        (
            dict(logp=torch.full((3, 2), float("nan")), validate_args=True),
            ValueError,
            r"`logp` must be finite",
        ),
        (
            dict(advantages=torch.tensor([0.0, float("nan"), 0.0]), validate_args=True),
            ValueError,
            r"`advantages` must be finite",
        ),
    ],
)
def test_masked_grpo_loss_errors(change, error, match):
    """Each bad argument gets an error that names it."""
    kwargs = {**_ok(), **change}
    with pytest.raises(error, match=match):
        unchecked(masked_grpo_loss)(**loss_kwargs(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(logp=torch.zeros(2), old_logp=torch.zeros(3), advantages=torch.zeros(2)),
            ValueError,
            r"`old_logp` must have the same shape as `logp` \(2,\), got \(3,\)",
        ),
        (
            dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), advantages=torch.zeros(3)),
            ValueError,
            r"`advantages` must have the shape of `logp` \(2, 3\)",
        ),
        (
            dict(
                logp=torch.zeros(2),
                old_logp=torch.zeros(2, dtype=torch.int32),
                advantages=torch.zeros(2),
            ),
            TypeError,
            r"`old_logp` must have a float",
        ),
        (
            dict(
                logp=torch.zeros(2),
                old_logp=torch.zeros(2),
                advantages=torch.zeros(2),
                clip_low=-0.2,
            ),
            ValueError,
            r"`clip.low` must lie in",
        ),
        (
            dict(
                logp=torch.zeros(2),
                old_logp=torch.zeros(2),
                advantages=torch.zeros(2),
                dual_clip=1.0,
            ),
            ValueError,
            r"`clip.dual` must lie in",
        ),
        (
            dict(
                logp=torch.zeros(2),
                old_logp=torch.zeros(2),
                advantages=torch.zeros(2),
                log_ratio_clamp=0.0,
            ),
            ValueError,
            r"`clip.log_ratio_clamp` must lie in",
        ),
    ],
)
def test_clipped_surrogate_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        unchecked(clipped_surrogate)(**loss_kwargs(**kwargs))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dp_size", [1, 4])
def test_without_selection_rows_are_verls_sequences(mode, dp_size):
    """`selection=None`: each (rows, token) row is a sequence, verl's own layout, dp_size included."""
    g = torch.Generator().manual_seed(21 + dp_size)
    traj, length = 6, 10
    logp = (-torch.rand(traj, length, generator=g, dtype=F64)).requires_grad_(True)
    old = logp.detach() + 0.8 * torch.randn(traj, length, generator=g, dtype=F64)
    adv = torch.randn(traj, generator=g, dtype=F64)
    mask = torch.rand(traj, length, generator=g) < 0.7
    mask[2] = False  # an empty row: left out of the seq modes by both
    norms = dict(batch_num_tokens=3 * int(mask.sum()), global_batch_size=17, loss_scale_factor=32)
    if dp_size == 1:
        norms = {}
    out = masked_grpo_loss(logp, **loss_kwargs(old_logp=old, advantages=adv, selection=None, mask=mask, loss_agg_mode=mode, clip=Clip(dual=3.0), norms=LossNormalizers(dp_size=dp_size), **norms))
    adv_rows = adv[:, None].expand(traj, length)
    pessimistic = torch.maximum(
        -adv_rows * torch.exp(logp - old),
        -adv_rows * torch.exp(logp - old).clamp(0.8, 1.28),
    )
    per_token = torch.where(adv_rows < 0, torch.minimum(pessimistic, -adv_rows * 3.0), pessimistic)
    want = verl.agg_loss(per_token, mask, mode, dp_size, **norms)
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-9)
    (ours,) = torch.autograd.grad(out.loss, logp)
    (theirs,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("inclusion", "error", "match"),
    [
        (lambda sel: torch.ones(sel.num_traj + 1, sel.k), ValueError,
         r"`selection.inclusion` must have shape"),
        (lambda sel: torch.ones(sel.mask.shape, dtype=torch.int64), TypeError,
         r"`selection.inclusion` must have a float"),
    ],
)
def test_selection_inclusion_errors(inclusion, error, match):
    kwargs = _ok()
    sel = kwargs["selection"]
    kwargs["selection"] = sel._replace(inclusion=inclusion(sel))
    with pytest.raises(error, match=match):
        masked_grpo_loss(**kwargs, estimator="horvitz_thompson")


def test_swapped_tensors_fail_loudly():
    """Every tensor after `logp` is keyword-only: the verl-order trap is a TypeError."""
    logp, old, adv = torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3)
    for loss in (masked_grpo_loss, chunked_ppo_loss, clipped_surrogate):
        with pytest.raises(TypeError, match="positional argument"):
            loss(old, logp, adv)


def test_default_loss_calls_make_no_host_sync():
    """Default calls read no tensor contents (no value checks, no data-dependent shapes)."""
    from _sync import SyncRecorder
    from chunkmask import Behaviour, bc_loss, decoupled_ppo_loss, value_loss

    sel = with_packed_inclusion(
        Selection.from_mask(torch.tensor([[True, True, False], [True, False, False]])),
        torch.tensor([0.5, 0.5, 1.0]),
    )
    logp = -torch.rand(3, 4, requires_grad=True)
    old, adv = logp.detach() - 0.1, torch.randn(3)
    calls = [
        lambda v: masked_grpo_loss(logp, old_logp=old, advantages=adv, selection=sel,
                                   validate_args=v).loss,
        lambda v: masked_grpo_loss(logp, old_logp=old, advantages=adv, selection=sel,
                                   estimator="horvitz_thompson", validate_args=v).loss,
        lambda v: chunked_ppo_loss(logp[:, 0], old_logp=old[:, 0], advantages=adv,
                                   selection=sel, validate_args=v).loss,
        lambda v: decoupled_ppo_loss(logp, proximal_logp=old, behaviour=Behaviour(old - 0.2),
                                     advantages=adv, selection=sel, validate_args=v).loss,
        lambda v: value_loss(logp[:, 0], returns=old[:, 0], selection=sel, validate_args=v),
        lambda v: bc_loss(logp[:, 0], selection=sel, validate_args=v),
    ]
    for call in calls:
        with SyncRecorder() as rec:
            call(False).backward()
        assert rec.ops == []
        with SyncRecorder() as rec:  # the recorder does see the value checks
            call(True)
        assert "_local_scalar_dense" in " ".join(rec.ops)
