"""Cross-module properties of the PCM pipeline: select, shrink, then the masked GRPO loss.

The primitives are tested one by one in their own files; here they are composed the way a
trainer composes them, and checked against slow references that remove the unselected chunks by
hand, against verl's full-batch loss, and on degenerate and malformed inputs.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkmask._checks
from _reference import losses as ref
from _reference import verl
from _reference.inclusion import loss_kwargs, with_packed_inclusion
from chunkmask import Clip, Regularizers
from chunkmask.advantages import group_relative_advantages
from chunkmask.aggregation import AGGREGATION_MODES, aggregate_loss
from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import shrink
from chunkmask.losses import masked_grpo_loss
from chunkmask.pcm._allocation import (
    keep_probabilities,
    neyman_allocation,
    neyman_allocation_continuous,
    suggest_budget,
)
from chunkmask.pcm._inclusion import inclusion_probabilities
from chunkmask.pcm._phases import (
    NUM_PHASES,
    gripper_close_fraction,
    label_gripper_phases,
    label_time_segments,
)
from chunkmask.pcm._sampling import (
    plackett_luce_sample,
    stratified_sample,
    top_phase_sample,
    topk_sample,
    uniform_sample,
)
from chunkmask.pcm._score_buffer import PhaseScoreBuffer
from chunkmask.pcm._scores import success_failure_variance

F64 = torch.float64
MODES = list(AGGREGATION_MODES)
NAN = float("nan")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


# ----------------------------------------------------------------------------- helpers


def padded_batch(seed, traj, n, tokens, *, nonempty=False):
    """A dense float64 `(traj, n, tokens)` batch with NaN wherever a token or chunk is invalid."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(traj, n, generator=g) < 0.75
    token_mask = (torch.rand(traj, n, tokens, generator=g) < 0.8) & valid[..., None]
    if nonempty:  # every trajectory has a valid token (verl's seq-mean-token-mean needs it)
        valid[:, 0] = True
        token_mask[:, 0, 0] = True
    logp = -2.0 * torch.rand(traj, n, tokens, generator=g, dtype=F64)
    old_logp = logp + 0.5 * torch.randn(traj, n, tokens, generator=g, dtype=F64)
    ref_logp = logp + 0.3 * torch.randn(traj, n, tokens, generator=g, dtype=F64)
    entropy = torch.rand(traj, n, tokens, generator=g, dtype=F64)
    weights = torch.rand(traj, n, generator=g, dtype=F64)
    weights[torch.rand(traj, n, generator=g) < 0.2] = 0.0
    rewards = torch.randint(0, 2, (traj,), generator=g).to(F64)
    group = torch.arange(traj) // 2
    return dict(
        valid=valid,
        token_mask=token_mask,
        logp=torch.where(token_mask, logp, NAN),
        old_logp=torch.where(token_mask, old_logp, NAN),
        ref_logp=torch.where(token_mask, ref_logp, NAN),
        entropy=torch.where(token_mask, entropy, NAN),
        weights=torch.where(valid, weights, NAN),
        rewards=rewards,
        group=group,
    )


def nested(x):
    return torch.nan_to_num(x.detach().double(), nan=0.0).tolist()


def check_selection(sel, allowed, valid, k):
    """Every selector's invariants: distinct, ascending, never padding, takes all when short."""
    traj, n = valid.shape
    assert sel.indices.shape == (traj, k) and sel.mask.shape == (traj, k)
    assert sel.chunks_total == n
    counts = sel.mask.sum(1)
    assert torch.equal(sel.mask, torch.arange(k, device=sel.mask.device) < counts[:, None])
    assert (sel.indices[~sel.mask] == 0).all()
    dense = sel.chunk_mask()
    assert torch.equal(dense.sum(1), counts), "an index repeats"
    assert not (dense & ~allowed).any(), "drew padding or a zero-weight chunk"
    assert torch.equal(counts, allowed.sum(1).clamp(max=k))


# ----------------------------------------------------------------------------- end to end


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    traj=st.integers(1, 5),
    n=st.integers(1, 6),
    tokens=st.integers(1, 3),
    k=st.integers(1, 8),
    mode=st.sampled_from(MODES),
    estimator=st.sampled_from(["masked", "horvitz_thompson"]),
    dual_clip=st.sampled_from([None, 3.0]),
)
def test_loss_on_shrunk_sample_equals_loss_with_unselected_chunks_removed(
    seed, traj, n, tokens, k, mode, estimator, dual_clip
):
    b = padded_batch(seed, traj, n, tokens)
    valid, token_mask = b["valid"], b["token_mask"]
    adv = group_relative_advantages(b["rewards"], b["group"])
    sel = plackett_luce_sample(
        b["weights"], k, valid=valid, generator=torch.Generator().manual_seed(seed)
    )
    pi = inclusion_probabilities(b["weights"], k, valid=valid)
    logp = b["logp"].clone().requires_grad_(True)
    batch = shrink(
        {
            "logp": logp,
            "old_logp": b["old_logp"],
            "ref_logp": b["ref_logp"],
            "entropy": b["entropy"],
            "adv": adv,
            "mask": token_mask,
            "pi": pi,
        },
        sel,
    )
    ht = estimator == "horvitz_thompson"
    kwargs = dict(dual_clip=dual_clip, entropy_coef=0.01, kl_coef=0.1, kl_type="k3")
    out = masked_grpo_loss(batch["logp"], **loss_kwargs(old_logp=batch["old_logp"], advantages=batch["adv"], selection=with_packed_inclusion(sel, batch["pi"] if ht else None), mask=batch["mask"], loss_agg_mode=mode, estimator=estimator, validate_args=True, regularizers=Regularizers(entropy=batch["entropy"], ref_logp=batch["ref_logp"]), **kwargs))
    chosen = sel.chunk_mask()
    want = ref.masked_grpo_loss(
        nested(b["logp"]),
        nested(b["old_logp"]),
        adv[:, None, None].expand(traj, n, tokens).tolist(),
        token_mask.tolist(),
        chosen.tolist(),
        mode,
        k=sel.k,
        estimator=estimator,
        inclusion=pi.tolist(),
        num_chunks=sel.num_chunks.tolist(),
        entropy=nested(b["entropy"]),
        ref_logp=nested(b["ref_logp"]),
        **kwargs,
    )
    for field, key in (("policy_loss", "policy"), ("entropy_loss", "entropy"), ("kl_loss", "kl")):
        assert math.isclose(getattr(out, field).item(), want[key], rel_tol=1e-10, abs_tol=1e-12)
    assert math.isclose(out.loss.item(), want["total"], rel_tol=1e-10, abs_tol=1e-12)
    assert all(torch.isfinite(v) for v in out)

    # Gradients reach the full logp tensor only at selected valid tokens, and match the loss
    # computed by hand on the full tensor with the unselected chunks removed.
    (grad,) = torch.autograd.grad(out.policy_loss, logp, retain_graph=True)
    dense_logp = b["logp"].clone().requires_grad_(True)
    by_hand = ref.policy_loss_by_hand(
        dense_logp,
        b["old_logp"],
        adv,
        token_mask,
        chosen,
        mode,
        k=sel.k,
        dual_clip=dual_clip,
        estimator=estimator,
        inclusion=pi,
        num_chunks=sel.num_chunks.tolist(),
    )
    if by_hand.requires_grad:
        (want_grad,) = torch.autograd.grad(by_hand, dense_logp, allow_unused=True)
        want_grad = torch.zeros_like(grad) if want_grad is None else want_grad
    else:
        want_grad = torch.zeros_like(grad)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    (total_grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(total_grad).all()
    kept = chosen[..., None] & token_mask
    assert (total_grad[~kept] == 0).all(), "a gradient reached padding or an unselected chunk"


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    traj=st.integers(1, 5),
    n=st.integers(1, 6),
    tokens=st.integers(1, 3),
    dual_clip=st.sampled_from([None, 3.0]),
)
def test_full_selection_equals_full_batch_grpo_in_every_mode(seed, traj, n, tokens, dual_clip):
    b = padded_batch(seed, traj, n, tokens, nonempty=True)
    valid, token_mask = b["valid"], b["token_mask"]
    adv = group_relative_advantages(b["rewards"], b["group"])
    sel = Selection.from_mask(valid)
    assert sel.k == n and torch.equal(sel.num_chunks, valid.sum(1))
    for mode in MODES:
        logp = b["logp"].clone().requires_grad_(True)
        batch = shrink(
            {
                "logp": logp,
                "old": b["old_logp"],
                "ref": b["ref_logp"],
                "ent": b["entropy"],
                "adv": adv,
                "mask": token_mask,
            },
            sel,
        )
        out = masked_grpo_loss(batch["logp"], old_logp=batch["old"], advantages=batch["adv"], selection=sel, mask=batch["mask"], loss_agg_mode=mode, clip=Clip(dual=dual_clip), regularizers=Regularizers(entropy=batch["ent"], entropy_coef=1e-3, ref_logp=batch["ref"], kl_coef=0.05, kl_type="k3"))
        # verl on the full batch: one row of n * tokens tokens per trajectory.
        rows = lambda x: torch.where(token_mask, x, 0.0).reshape(traj, n * tokens)  # noqa: E731
        response_mask = token_mask.reshape(traj, n * tokens)
        adv_rows = torch.where(response_mask, adv[:, None], 0.0)
        vlogp = b["logp"].clone().requires_grad_(True)
        pg_loss, clipfrac, ppo_kl, clipfrac_lower = verl.policy_loss_vanilla(
            rows(b["old_logp"]), rows(vlogp), adv_rows, response_mask, mode, 0.2, 0.28, dual_clip
        )
        total = verl.actor_loss(
            rows(b["old_logp"]),
            rows(vlogp),
            adv_rows,
            response_mask,
            loss_agg_mode=mode,
            clip_ratio_low=0.2,
            clip_ratio_high=0.28,
            clip_ratio_c=dual_clip,
            entropy=rows(b["entropy"]),
            entropy_coeff=1e-3,
            ref_log_prob=rows(b["ref_logp"]),
            kl_loss_coef=0.05,
            kl_loss_type="low_var_kl",
        )
        tol = dict(rtol=1e-6, atol=1e-9)  # verl divides seq-mean-token-mean by n_s + 1e-8
        torch.testing.assert_close(out.policy_loss, pg_loss, **tol)
        torch.testing.assert_close(out.loss, total, **tol)
        torch.testing.assert_close(out.clip_frac_low + out.clip_frac_high, clipfrac, **tol)
        torch.testing.assert_close(out.dual_clip_frac, clipfrac_lower, **tol)
        torch.testing.assert_close(out.approx_kl, ppo_kl, **tol)
        (ours,) = torch.autograd.grad(out.loss, logp)
        (theirs,) = torch.autograd.grad(total, vlogp)
        torch.testing.assert_close(ours, theirs, **tol)


# ----------------------------------------------------------------------------- selectors


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    traj=st.integers(1, 4),
    n=st.integers(1, 9),
    k=st.integers(1, 11),
    num_phases=st.integers(1, 4),
)
def test_every_selector_is_distinct_padding_free_and_seed_deterministic(
    seed, traj, n, k, num_phases
):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(traj, n, generator=g) < 0.7
    weights = torch.rand(traj, n, generator=g)
    weights[torch.rand(traj, n, generator=g) < 0.25] = 0.0
    weights = torch.where(valid, weights, NAN)  # garbage at padding is never looked at
    phases = torch.where(valid, torch.randint(0, num_phases, (traj, n), generator=g), -1)
    scores = torch.rand(num_phases, generator=g)
    alloc = torch.randint(0, 3, (num_phases,), generator=g)
    alloc[0] += 1

    def draw(seed_):
        gen = lambda: torch.Generator().manual_seed(seed_)  # noqa: E731
        return {
            "plackett_luce": plackett_luce_sample(weights, k, valid=valid, generator=gen()),
            "uniform": uniform_sample(valid, k, generator=gen()),
            "top_phase": top_phase_sample(phases, scores, k, valid=valid, generator=gen()),
            "topk": topk_sample(torch.nan_to_num(weights, nan=0.0), k, valid=valid),
            "stratified": stratified_sample(phases, alloc, valid=valid, generator=gen()),
        }

    first, second = draw(seed + 1), draw(seed + 1)
    present = torch.zeros(traj, num_phases + 1, dtype=torch.bool)
    present.scatter_(1, torch.where(valid, phases, num_phases), True)
    best = torch.where(present[:, :num_phases], scores, -1.0).argmax(1)
    allowed = {
        "plackett_luce": valid & (torch.nan_to_num(weights) > 0),
        "uniform": valid,
        "top_phase": valid & (phases == best[:, None]),
        "topk": valid,
    }
    for name, sel in first.items():
        assert torch.equal(sel.num_chunks, valid.sum(1))
        if name in allowed:
            check_selection(sel, allowed[name], valid, k)
        else:  # stratified: per-phase quotas, never padding
            dense = sel.chunk_mask()
            assert not (dense & ~valid).any()
            for c in range(num_phases):
                avail = (phases == c).sum(1)
                assert torch.equal((dense & (phases == c)).sum(1), avail.clamp(max=int(alloc[c])))
        again = second[name]
        assert torch.equal(sel.indices, again.indices) and torch.equal(sel.mask, again.mask)


def test_selectors_are_equivariant_under_trajectory_permutation(monkeypatch):
    """With the same per-row noise, permuting trajectories permutes the selection."""
    import chunkmask.pcm._sampling as sampling

    g = torch.Generator().manual_seed(3)
    traj, n, k = 7, 10, 4
    valid = torch.rand(traj, n, generator=g) < 0.8
    weights = torch.where(valid, torch.rand(traj, n, generator=g), 0.0)
    phases = torch.where(valid, torch.randint(0, 3, (traj, n), generator=g), -1)
    alloc = torch.tensor([1, 2, 1])
    noise = torch.rand(traj, n, generator=g, dtype=F64)
    perm = torch.randperm(traj, generator=g)
    current = {"u": noise}
    monkeypatch.setattr(
        sampling, "_uniform", lambda shape, gen, like, dtype: current["u"].to(dtype)
    )
    base = (
        plackett_luce_sample(weights, k, valid=valid),
        stratified_sample(phases, alloc, valid=valid),
        uniform_sample(valid, k),
    )
    current["u"] = noise[perm]
    permuted = (
        plackett_luce_sample(weights[perm], k, valid=valid[perm]),
        stratified_sample(phases[perm], alloc, valid=valid[perm]),
        uniform_sample(valid[perm], k),
    )
    for a, b in zip(base, permuted, strict=True):
        assert torch.equal(a.indices[perm], b.indices) and torch.equal(a.mask[perm], b.mask)
        assert torch.equal(a.num_chunks[perm], b.num_chunks)


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    phases=st.integers(1, 5),
    budget=st.integers(1, 20),
    floor=st.sampled_from([0.01, 0.1, 0.5, 1.0]),
    power=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_allocation_sums_to_budget_and_keep_probabilities_lie_in_floor_one(
    seed, rows, phases, budget, floor, power
):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 8, (rows, phases), generator=g)
    scores = torch.rand(rows, phases, generator=g, dtype=F64) ** 3
    scores[torch.rand(rows, phases, generator=g) < 0.2] = 0.0
    defined = torch.rand(rows, phases, generator=g) < 0.8
    p = keep_probabilities(torch.where(defined, scores, NAN), defined, p_min=floor, power=power)
    assert ((p >= floor) & (p <= 1)).all()
    stds = p.sqrt()  # Neyman on the keep probabilities as a proxy
    alloc = neyman_allocation(budget, sizes, stds)
    assert torch.equal(alloc.sum(-1), sizes.sum(-1).clamp(max=budget))
    assert ((alloc >= 0) & (alloc <= sizes)).all()
    cont = neyman_allocation_continuous(budget, sizes, stds)
    torch.testing.assert_close(cont.sum(-1), sizes.sum(-1).clamp(max=budget).to(F64))
    perm = torch.randperm(rows, generator=g)
    assert torch.equal(neyman_allocation(budget, sizes[perm], stds[perm]), alloc[perm])


# ----------------------------------------------------------------------------- degenerate input


def gripper_batch(success):
    """Four trajectories of 5 chunks x 4 steps with one grasp cycle each (+1 closes)."""
    traj, n, h = len(success), 5, 4
    open_, close = -1.0, 1.0
    cycle = torch.tensor([open_, open_, close, close, open_])
    gripper = cycle[None, :, None].expand(traj, n, h).clone()
    actions = torch.randn(traj, n, h, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    actions = actions + torch.tensor(success, dtype=F64)[:, None, None, None]
    return gripper, actions


def run_pipeline(gripper, actions, success, valid, k, *, buffer=None):
    """Every primitive in order, as the masker composes them, plus the loss on the shrunk batch."""
    traj, n = valid.shape
    success = torch.tensor(success)
    group = torch.zeros(traj, dtype=torch.int64)
    phases = label_gripper_phases(gripper_close_fraction(gripper, valid), valid)
    variance = success_failure_variance(actions, phases, success, group, num_phases=5, valid=valid)
    buffer = buffer or PhaseScoreBuffer(NUM_PHASES)
    keep = buffer.update(variance.scores, variance.defined)
    weights = torch.where(valid, keep[phases.clamp_min(0)], 0.0)
    sel = plackett_luce_sample(weights, k, valid=valid, generator=torch.Generator().manual_seed(0))
    pi = inclusion_probabilities(weights, k, valid=valid)
    adv = group_relative_advantages(success.to(F64), group)
    tokens = 3
    logp = torch.full((traj, n, tokens), -1.0, dtype=F64, requires_grad=True)
    old = torch.full((traj, n, tokens), -1.2, dtype=F64)
    batch = shrink({"logp": logp, "old": old, "adv": adv, "pi": pi}, sel)
    outs = {
        est: masked_grpo_loss(batch["logp"], old_logp=batch["old"], advantages=batch["adv"], selection=with_packed_inclusion(sel, batch["pi"]), estimator=est, validate_args=True)
        for est in ("masked", "horvitz_thompson")
    }
    return dict(
        phases=phases, variance=variance, keep=keep, sel=sel, pi=pi, adv=adv, outs=outs, logp=logp
    )


def assert_nan_free(res):
    for key in ("keep", "pi", "adv"):
        assert torch.isfinite(res[key]).all(), key
    assert torch.isfinite(res["variance"].scores).all()
    for out in res["outs"].values():
        assert all(torch.isfinite(v) for v in out)
        (grad,) = torch.autograd.grad(out.loss, res["logp"], allow_unused=True, retain_graph=True)
        assert grad is None or torch.isfinite(grad).all()


@pytest.mark.parametrize("outcome", [True, False], ids=["all_success", "all_failure"])
def test_degenerate_all_successes_or_all_failures(outcome):
    success = [outcome] * 4
    gripper, actions = gripper_batch(success)
    valid = torch.ones(4, 5, dtype=torch.bool)
    res = run_pipeline(gripper, actions, success, valid, k=2)
    assert_nan_free(res)
    assert not res["variance"].defined.any() and (res["variance"].scores == 0).all()
    assert res["keep"].tolist() == [1.0] * NUM_PHASES  # no information: uniform weights
    assert (res["adv"] == 0).all()
    for out in res["outs"].values():
        assert out.loss.item() == 0.0 and out.policy_loss.item() == 0.0


def test_degenerate_phase_absent():
    success = [True, False, True, False]
    gripper, actions = gripper_batch(success)
    valid = torch.ones(4, 5, dtype=torch.bool)
    res = run_pipeline(gripper, actions, success, valid, k=2)
    assert_nan_free(res)
    # One grasp cycle of 5 chunks with f in {0, 1}: no pre-grasp chunk (f < pre_min) and no tail.
    present = set(res["phases"].flatten().tolist())
    absent = [c for c in range(NUM_PHASES) if c not in present]
    assert absent, "the batch must miss a phase"
    assert not res["variance"].defined[absent].any()
    torch.testing.assert_close(res["keep"][absent], torch.full((len(absent),), 0.1))  # p_min
    assert res["keep"].max() == 1.0


def test_degenerate_one_chunk_trajectories_and_k_at_least_T():
    success = [True, False, True, False]
    gripper, actions = gripper_batch(success)
    valid = torch.zeros(4, 5, dtype=torch.bool)
    valid[0, 0] = valid[1, 0] = True  # one chunk each
    valid[2, :3] = valid[3, :] = True
    res = run_pipeline(gripper, actions, success, valid, k=5)
    assert_nan_free(res)
    sel = res["sel"]
    assert torch.equal(sel.counts, valid.sum(1))  # k >= T: everything is taken
    assert torch.equal(sel.chunk_mask(), valid)
    assert (res["pi"][valid] == 1).all() and (res["pi"][~valid] == 0).all()
    masked, ht = res["outs"]["masked"], res["outs"]["horvitz_thompson"]
    torch.testing.assert_close(masked.loss, ht.loss, rtol=1e-12, atol=1e-12)


def test_degenerate_empty_trajectory_and_k_above_N():
    valid = torch.tensor([[True, True, False], [False, False, False]])
    w = torch.where(valid, 1.0, NAN)
    sel = plackett_luce_sample(w, 7, valid=valid)
    assert sel.counts.tolist() == [2, 0] and sel.k == 7
    pi = inclusion_probabilities(w, 7, valid=valid)
    assert pi.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    logp = torch.zeros(2, 3, 1, dtype=F64, requires_grad=True)
    batch = shrink({"logp": logp, "adv": torch.tensor([1.0, -1.0], dtype=F64)}, sel)
    # Ratio 1: every selected token's surrogate is -A = -1; only trajectory 0 has tokens.
    expected = {
        "token-mean": -1.0,
        "seq-mean-token-mean": -1.0,
        "token-sum": -2.0,
        "seq-mean-token-sum": -2.0,
        "seq-mean-token-sum-norm": -2.0 / 7,  # divided by G = 1 and by k * tokens
    }
    for mode in MODES:
        out = masked_grpo_loss(batch["logp"], old_logp=batch["logp"].detach(), advantages=batch["adv"], selection=sel, loss_agg_mode=mode)
        assert out.loss.item() == pytest.approx(expected[mode], rel=1e-12)
    seg = label_time_segments(valid, num_segments=3)
    assert seg.tolist() == [[0, 1, -1], [-1, -1, -1]]


# ----------------------------------------------------------------------------- bad input


def _budget_args():
    return torch.tensor([3, 4]), torch.tensor([1.0, 2.0])


BAD_INPUTS = [
    # mismatched shapes
    (
        "shape",
        lambda: plackett_luce_sample(torch.ones(2, 4), 2, valid=torch.ones(2, 3).bool()),
        ValueError,
        r"`valid` must have shape \(2, 4\).*got \(2, 3\)",
    ),
    (
        "shape",
        lambda: group_relative_advantages(torch.zeros(3), torch.zeros(4).long()),
        ValueError,
        r"`group` must have the same shape as `rewards` \(3,\), got \(4,\)",
    ),
    (
        "shape",
        lambda: success_failure_variance(
            torch.zeros(2, 3, 1),
            torch.zeros(2, 2).long(),
            torch.ones(2).bool(),
            torch.zeros(2).long(),
            num_phases=2,
        ),
        ValueError,
        r"`phases` must have shape \(2, 3\).*got \(2, 2\)",
    ),
    (
        "shape",
        lambda: neyman_allocation(2, *_budget_args()[:1], torch.ones(3)),
        ValueError,
        r"`stds` must have the same shape as `sizes` \(2,\), got \(3,\)",
    ),
    (
        "shape",
        lambda: masked_grpo_loss(torch.zeros(3, 2), old_logp=torch.zeros(3, 3), advantages=torch.zeros(3), selection=Selection.from_mask(torch.ones(1, 3).bool())),
        ValueError,
        r"`old_logp` must have the same shape as `logp` \(3, 2\), got \(3, 3\)",
    ),
    (
        "shape",
        lambda: label_gripper_phases(torch.zeros(2, 4), torch.ones(2, 3).bool()),
        ValueError,
        r"`valid` must have shape \(2, 4\).*got \(2, 3\)",
    ),
    # wrong dtypes
    (
        "dtype",
        lambda: plackett_luce_sample(torch.ones(2, 4).long(), 2),
        TypeError,
        r"`weights` must have a float dtype, got torch.int64",
    ),
    (
        "dtype",
        lambda: group_relative_advantages(torch.zeros(3), torch.zeros(3)),
        TypeError,
        r"`group` must have an int dtype, got torch.float32",
    ),
    (
        "dtype",
        lambda: keep_probabilities(torch.tensor([1, 2])),
        TypeError,
        r"`scores` must have a float dtype, got torch.int64",
    ),
    (
        "dtype",
        lambda: masked_grpo_loss(torch.zeros(3).long(), old_logp=torch.zeros(3), advantages=torch.zeros(3), selection=Selection.from_mask(torch.ones(1, 3).bool())),
        TypeError,
        r"`logp` must have a float dtype, got torch.int64",
    ),
    (
        "dtype",
        lambda: gripper_close_fraction(torch.zeros(1, 2, 3).bool()),
        TypeError,
        r"`gripper` must have a float or int dtype, got torch.bool",
    ),
    (
        "dtype",
        lambda: stratified_sample(torch.zeros(1, 3), torch.tensor([1])),
        TypeError,
        r"`phases` must have an int dtype, got torch.float32",
    ),
    # NaN/Inf rewards or scores
    (
        "nan",
        lambda: group_relative_advantages(torch.tensor([1.0, NAN]), torch.zeros(2).long(), validate_args=True),
        ValueError,
        r"`rewards` must be finite, got 1 NaN/Inf",
    ),
    (
        "nan",
        lambda: group_relative_advantages(torch.tensor([1.0, math.inf]), torch.zeros(2).long(), validate_args=True),
        ValueError,
        r"`rewards` must be finite, got 1 NaN/Inf",
    ),
    (
        "nan",
        lambda: keep_probabilities(torch.tensor([NAN, 1.0]), validate_args=True),
        ValueError,
        r"`scores` must be finite and non-negative at defined phases, got 1 bad",
    ),
    (
        "nan",
        lambda: keep_probabilities(torch.tensor([math.inf, 1.0]), validate_args=True),
        ValueError,
        r"`scores` must be finite and non-negative at defined phases, got 1 bad",
    ),
    (
        "nan",
        lambda: PhaseScoreBuffer(2).update(torch.tensor([math.inf, 1.0]), validate_args=True),
        ValueError,
        r"`scores` must be finite and non-negative at defined phases, got 1 bad",
    ),
    (
        "nan",
        lambda: PhaseScoreBuffer(2).update(torch.tensor([NAN, 1.0]), validate_args=True),
        ValueError,
        r"`scores` must be finite and non-negative at defined phases, got 1 bad",
    ),
    (
        "nan",
        lambda: suggest_budget(torch.tensor([1.0, NAN])),
        ValueError,
        r"`scores` must be finite and non-negative at valid chunks, got 1 bad",
    ),
    (
        "nan",
        lambda: topk_sample(torch.tensor([[1.0, NAN]]), 1, validate_args=True),
        ValueError,
        r"`scores` must not be NaN at valid chunks",
    ),
    (
        "nan",
        lambda: top_phase_sample(torch.tensor([[0, 1]]), torch.tensor([NAN, 1.0]), 1, validate_args=True),
        ValueError,
        r"`scores` must not contain NaN",
    ),
    (
        "nan",
        lambda: plackett_luce_sample(torch.tensor([[1.0, math.inf]]), 1, validate_args=True),
        ValueError,
        r"`weights` must be finite and non-negative at valid chunks, got 1 bad",
    ),
    (
        "nan",
        lambda: success_failure_variance(
            torch.tensor([[[NAN]], [[1.0]]]),
            torch.zeros(2, 1).long(),
            torch.tensor([True, False]),
            torch.zeros(2).long(),
            num_phases=1,
            validate_args=True,
        ),
        ValueError,
        r"`features` must be finite, got 1 NaN/Inf",
    ),
    (
        "nan",
        lambda: masked_grpo_loss(torch.zeros(2), old_logp=torch.zeros(2), advantages=torch.tensor([NAN, 0.0]), selection=Selection.from_mask(torch.ones(1, 2).bool()), validate_args=True),
        ValueError,
        r"`advantages` must be finite",
    ),
    # a budget <= 0
    (
        "budget",
        lambda: plackett_luce_sample(torch.ones(2, 4), 0),
        ValueError,
        r"`budget` must be > 0, got 0",
    ),
    (
        "budget",
        lambda: uniform_sample(torch.ones(2, 4).bool(), -1),
        ValueError,
        r"`budget` must be > 0, got -1",
    ),
    (
        "budget",
        lambda: inclusion_probabilities(torch.ones(2, 4), 0),
        ValueError,
        r"`budget` must be > 0, got 0",
    ),
    (
        "budget",
        lambda: neyman_allocation(0, *_budget_args()),
        ValueError,
        r"`budget` must be > 0, got 0",
    ),
    (
        "budget",
        lambda: neyman_allocation(-3, *_budget_args()),
        ValueError,
        r"`budget` must be > 0, got -3",
    ),
    (
        "budget",
        lambda: neyman_allocation_continuous(0.0, *_budget_args()),
        ValueError,
        r"`budget` must be > 0, got 0.0",
    ),
    (
        "budget",
        lambda: stratified_sample(torch.tensor([[0, 1]]), torch.tensor([0, 0])),
        ValueError,
        r"`allocation` must request at least one chunk",
    ),
    # p_min outside (0, 1]
    (
        "p_min",
        lambda: PhaseScoreBuffer(3, p_min=0.0),
        ValueError,
        r"`p_min` must lie in \(0.0, 1.0\], got 0.0",
    ),
    (
        "p_min",
        lambda: PhaseScoreBuffer(3, p_min=1.01),
        ValueError,
        r"`p_min` must lie in \(0.0, 1.0\], got 1.01",
    ),
    (
        "p_min",
        lambda: PhaseScoreBuffer(3, p_min=-0.5),
        ValueError,
        r"`p_min` must lie in \(0.0, 1.0\], got -0.5",
    ),
    (
        "p_min",
        lambda: PhaseScoreBuffer(3, p_min=NAN),
        ValueError,
        r"`p_min` must be finite, got nan",
    ),
    (
        "p_min",
        lambda: keep_probabilities(torch.ones(3), p_min=0.0),
        ValueError,
        r"`p_min` must lie in \(0.0, 1.0\], got 0.0",
    ),
    (
        "p_min",
        lambda: keep_probabilities(torch.ones(3), p_min=2.0),
        ValueError,
        r"`p_min` must lie in \(0.0, 1.0\], got 2.0",
    ),
    # a gripper convention that makes no sense
    (
        "gripper",
        lambda: gripper_close_fraction(torch.zeros(1, 2, 3), close="open"),
        ValueError,
        r"`close` must be one of \('positive', 'zero', 'negative', 'threshold'\)",
    ),
    (
        "gripper",
        lambda: gripper_close_fraction(torch.zeros(1, 2, 3), close="threshold"),
        ValueError,
        r"`close_threshold` must be given when `close=\"threshold\"`, got None",
    ),
    (
        "gripper",
        lambda: gripper_close_fraction(torch.zeros(1, 2, 3), close_threshold=NAN),
        ValueError,
        r"`close_threshold` must be finite, got nan",
    ),
    (
        "gripper",
        lambda: gripper_close_fraction(torch.zeros(1, 2, 3), close_threshold=math.inf),
        ValueError,
        r"`close_threshold` must be finite, got inf",
    ),
    (
        "gripper",
        lambda: gripper_close_fraction(torch.zeros(1, 2, 3), close=1),
        ValueError,
        r"`close` must be one of",
    ),
    (
        "gripper",
        lambda: label_gripper_phases(torch.zeros(1, 3), active=0.9, sustained=0.75),
        ValueError,
        r"`active` must be <= `sustained` \(0.75\), got 0.9",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [pytest.param(c, e, m, id=f"{kind}-{i}") for i, (kind, c, e, m) in enumerate(BAD_INPUTS)],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- dtypes, devices


def test_bfloat16_inputs_for_the_primitives_without_their_own_test():
    bf = torch.bfloat16
    s = torch.tensor([0.0, 0.5, 2.0, 1.0], dtype=bf)  # exactly representable
    a, b = PhaseScoreBuffer(4, refresh_every=2), PhaseScoreBuffer(4, refresh_every=2)
    for step in range(3):
        torch.testing.assert_close(a.update(s * (step + 1)), b.update((s * (step + 1)).float()))
    sizes = torch.tensor([4, 6, 3])
    stds = torch.tensor([0.5, 2.0, 1.0], dtype=bf)
    assert (
        neyman_allocation(5, sizes, stds).tolist()
        == neyman_allocation(5, sizes, stds.float()).tolist()
    )
    torch.testing.assert_close(
        neyman_allocation_continuous(5, sizes.to(bf), stds),
        neyman_allocation_continuous(5, sizes.double(), stds.double()),
    )
    scores = torch.tensor([[4.0, 4.0, 1.0, 1.0, 0.5, 0.5]], dtype=bf)
    assert suggest_budget(scores).budget == suggest_budget(scores.double()).budget == 2
    phases = torch.tensor([[0, 1, 1, 2, 2, 2]])
    sel = top_phase_sample(phases, torch.tensor([0.1, 0.9, 0.5], dtype=bf), 2)
    assert torch.gather(phases, 1, sel.indices).tolist() == [[1, 1]]
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, 0.25]], dtype=bf)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for mode in MODES:
        got = aggregate_loss(loss, mask, mode)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, aggregate_loss(loss.float(), mask, mode))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_on_device_and_dtype_matches_cpu_float64(device, dtype):
    """Every primitive keeps its outputs on the input device, in its documented dtype."""
    b = padded_batch(11, traj=6, n=8, tokens=4, nonempty=True)
    success = b["rewards"] > 0
    g = torch.Generator().manual_seed(1)
    actions = torch.randn(6, 8, 3, 2, generator=g, dtype=F64)
    gripper = torch.where(torch.rand(6, 8, 3, generator=g) < 0.5, -1.0, 1.0).to(F64)

    def pipeline(dev, dt):
        to = lambda x: x.to(dev, dt) if x.is_floating_point() else x.to(dev)  # noqa: E731
        valid = b["valid"].to(dev)
        frac = gripper_close_fraction(to(gripper), valid)
        phases = label_gripper_phases(frac, valid)
        var = success_failure_variance(
            to(actions), phases, success.to(dev), b["group"].to(dev), num_phases=5, valid=valid
        )
        keep = PhaseScoreBuffer(5).update(var.scores, var.defined)
        weights = torch.where(valid, keep[phases.clamp_min(0)], 0.0)
        sel = plackett_luce_sample(
            weights, 3, valid=valid, generator=torch.Generator().manual_seed(5)
        )
        pi = inclusion_probabilities(weights, 3, valid=valid)
        adv = group_relative_advantages(to(b["rewards"]), b["group"].to(dev))
        batch = shrink(
            {
                "logp": to(b["logp"]),
                "old": to(b["old_logp"]),
                "adv": adv,
                "mask": b["token_mask"].to(dev),
                "pi": pi.to(dt),
            },
            sel,
        )
        out = masked_grpo_loss(batch["logp"], old_logp=batch["old"], advantages=batch["adv"], selection=with_packed_inclusion(sel, batch["pi"]), mask=batch["mask"], estimator="horvitz_thompson")
        return dict(
            frac=frac,
            phases=phases,
            scores=var.scores,
            keep=keep,
            indices=sel.indices,
            mask=sel.mask,
            pi=pi,
            adv=adv,
            loss=out.loss,
        )

    got = pipeline(device, dtype)
    want = pipeline("cpu", F64)
    for key, value in got.items():
        assert value.device.type == device, key
        assert value.dtype != F64 or key == "pi", key  # nothing leaks float64 but pi
    assert torch.equal(got["phases"].cpu(), want["phases"])
    assert torch.equal(got["indices"].cpu(), want["indices"])
    assert torch.equal(got["mask"].cpu(), want["mask"])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for key in ("frac", "scores", "keep", "pi", "adv", "loss"):
        torch.testing.assert_close(got[key].cpu().double(), want[key].double(), **tol)


@pytest.mark.skipif(
    hasattr(chunkmask._checks.check_tensor, "__wrapped__"),
    reason="run-time jaxtyping wrappers are not traceable by dynamo (pytorch#122093)",
)
def test_sample_shrink_loss_compile_fullgraph_together():
    """Sampler, shrink and loss in one `fullgraph=True` graph, forward and backward.

    With `k` chunks available in every row the packed size `M = traj * k` is static, so the
    whole step traces without a host sync. `aot_eager` traces through TorchDynamo and
    AOTAutograd (the backward included) and keeps eager RNG semantics, so the compiled step
    equals the eager one for the same seed; Inductor code generation adds nothing to check here.
    """
    torch._dynamo.reset()
    traj, n, tokens, k = 6, 8, 3, 3
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(traj, n, generator=g) + 0.1
    valid = torch.ones(traj, n, dtype=torch.bool)
    valid[:, -2:] = False
    old = -torch.rand(traj, n, tokens, generator=g)
    adv = torch.randn(traj, generator=g)

    def step(weights, valid, logp, old, adv):
        sel = plackett_luce_sample(weights, k, valid=valid, validate_args=False)
        batch = shrink(
            {"logp": logp, "old": old, "adv": adv}, sel, size=traj * k, validate_args=False
        )
        return masked_grpo_loss(batch["logp"], old_logp=batch["old"], advantages=batch["adv"], selection=sel, clip=Clip(dual=3.0)).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        logp = (old + 0.3).clone().requires_grad_(True)
        torch.manual_seed(0)
        loss = fn(weights, valid, logp, old, adv)
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss, grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert (results[0][1][:, -2:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_remaining_primitives_follow_the_input_device(device):
    """Allocation, the other selectors, aggregation and segments: same result as on the CPU."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sizes = torch.tensor([[4, 6, 3], [2, 0, 5]])
    stds = torch.tensor([[0.5, 2.0, 1.0], [1.0, 3.0, 0.0]])
    phases = torch.tensor([[0, 1, 1, 2, 2, -1], [2, 2, 0, 1, -1, -1]])
    valid = phases >= 0
    loss = torch.randn(4, 3, generator=gen())
    mask = torch.rand(4, 3, generator=gen()) < 0.7
    segment = torch.tensor([0, 0, 2, 2])

    def compute(dev):
        d = lambda x: x.to(dev)  # noqa: E731
        return {
            "neyman": neyman_allocation(5, d(sizes), d(stds)),
            "continuous": neyman_allocation_continuous(5, d(sizes), d(stds)),
            "keep": keep_probabilities(d(stds), d(stds) > 0),
            "curve": suggest_budget(d(stds)).curve_y,
            "stratified": stratified_sample(
                d(phases), d(torch.tensor([1, 1, 1])), generator=gen()
            ).indices,
            "uniform": uniform_sample(d(valid), 2, generator=gen()).indices,
            "top_phase": top_phase_sample(
                d(phases), d(torch.tensor([0.1, 0.5, 0.2])), 2, generator=gen()
            ).indices,
            "topk": topk_sample(d(stds), 2).indices,
            "segments": label_time_segments(d(valid), num_segments=2),
            **{
                mode: aggregate_loss(
                    d(loss), d(mask), mode, segment=d(segment), num_segments=3, loss_scale_factor=5
                )
                for mode in MODES
            },
        }

    got, want = compute(device), compute("cpu")
    for key, value in got.items():
        assert value.device.type == device, key
        if value.is_floating_point():
            torch.testing.assert_close(value.cpu(), want[key])
        else:
            assert torch.equal(value.cpu(), want[key]), key
