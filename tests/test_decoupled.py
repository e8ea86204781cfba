"""Tests for the decoupled PPO loss, the proximal interpolation and the staleness primitives."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _reference import verl
from _reference.inclusion import loss_kwargs
from chunkmask import Behaviour, Clip
from chunkmask.aggregation import AGGREGATION_MODES
from chunkmask.batch._selection import Selection
from chunkmask.losses import decoupled_ppo_loss, interpolate_proximal_logp, masked_grpo_loss
from chunkmask.offpolicy._staleness import StalenessGate, staleness, staleness_filter

F64 = torch.float64
MODES = list(AGGREGATION_MODES)


def unchecked(fn):
    return getattr(fn, "__wrapped__", fn)


def batch(seed, rows=5, tokens=6, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(rows, tokens, generator=g, dtype=F64)).requires_grad_(True)
    prox = logp.detach() + spread * torch.randn(rows, tokens, generator=g, dtype=F64)
    behav = prox + spread * torch.randn(rows, tokens, generator=g, dtype=F64)
    adv = torch.randn(rows, generator=g, dtype=F64)
    mask = torch.rand(rows, tokens, generator=g) < 0.8
    return logp, prox, behav, adv, mask


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_no_staleness_is_the_on_policy_loss(mode, packed):
    logp, prox, _, adv, mask = batch(1)
    sel = None
    if packed:
        sel = Selection.from_mask(torch.tensor([[True, True, False], [False, True, True]]))
        adv = adv[:4]
        logp, prox, mask = logp[:4], prox[:4], mask[:4]
    kwargs = dict(loss_agg_mode=mode, dual_clip=3.0, clip_high=0.4)
    got = decoupled_ppo_loss(logp, **loss_kwargs(proximal_logp=prox, behaviour=Behaviour(prox), advantages=adv, selection=sel, mask=mask, **kwargs))
    want = masked_grpo_loss(logp, **loss_kwargs(old_logp=prox, advantages=adv, selection=sel, mask=mask, **kwargs))
    assert got.loss.item() == want.loss.item()
    (g1,) = torch.autograd.grad(got.loss, logp)
    (g2,) = torch.autograd.grad(want.loss, logp)
    assert torch.equal(g1, g2)
    assert got.capped_frac.item() == 0.0
    assert got.behaviour_weight_mean.item() == pytest.approx(1.0)


def reference(logp, prox, behav, adv, mask, mode, *, cap, floor, cap_mode, clip=(0.2, 0.28)):
    """Float64 per-token loops, then verl's aggregation."""
    rows, tokens = logp.shape
    per = torch.zeros(rows, tokens, dtype=F64)
    for i in range(rows):
        for t in range(tokens):
            if not mask[i, t]:
                continue
            a = float(adv[i])
            rho = math.exp(max(-20.0, min(20.0, float(logp[i, t]) - float(prox[i, t]))))
            w = math.exp(max(-20.0, min(20.0, float(prox[i, t]) - float(behav[i, t]))))
            out = (cap is not None and w > cap) or (floor is not None and w < floor)
            if cap_mode == "mask" and out:
                w = 0.0
            elif cap_mode == "clamp":
                w = min(max(w, floor or 0.0), cap if cap is not None else math.inf)
            surr = max(-a * rho, -a * min(max(rho, 1 - clip[0]), 1 + clip[1]))
            per[i, t] = w * surr
    return verl.agg_loss(per, mask, mode)


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(MODES),
    cap=st.sampled_from([None, 2.0, 1.2]),
    floor=st.sampled_from([None, 0.5]),
    cap_mode=st.sampled_from(["mask", "clamp"]),
)
def test_matches_the_loop_reference(seed, mode, cap, floor, cap_mode):
    logp, prox, behav, adv, mask = batch(seed)
    mask[:, 0] = True
    got = decoupled_ppo_loss(logp, proximal_logp=prox, behaviour=Behaviour(behav, cap=cap, floor=floor, mode=cap_mode), advantages=adv, mask=mask, loss_agg_mode=mode)
    want = reference(logp.detach(), prox, behav, adv, mask, mode, cap=cap, floor=floor,
                     cap_mode=cap_mode)
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9)
    w = torch.exp(prox - behav)
    out = ((w > cap) if cap is not None else torch.zeros_like(mask)) | (
        (w < floor) if floor is not None else torch.zeros_like(mask)
    )
    assert got.capped_frac.item() == pytest.approx((out & mask).sum().item() / mask.sum().item())


def test_masked_tokens_pass_no_gradient_but_keep_the_normaliser():
    logp, prox, behav, adv, mask = batch(3)
    mask[:] = True
    behav[0, :3] = prox[0, :3] - 5.0  # weight e^5 > cap: masked out
    out = decoupled_ppo_loss(logp, proximal_logp=prox, behaviour=Behaviour(behav, cap=2.0), advantages=adv, mask=mask)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.equal(grad[0, :3], torch.zeros(3, dtype=F64))
    # the other tokens' gradient is that of a token-mean over all 30 tokens
    weights = torch.exp(prox - behav).masked_fill(torch.exp(prox - behav) > 2.0, 0.0)
    manual = decoupled_ppo_loss(logp, proximal_logp=prox, behaviour=Behaviour(behav, cap=None), advantages=adv, mask=mask)
    (g_all,) = torch.autograd.grad(manual.loss, logp)
    unweighted = g_all / torch.exp(prox - behav)
    torch.testing.assert_close(grad, unweighted * weights)


def test_extreme_ratios_give_finite_values_and_gradients():
    logp = torch.tensor([[-1.0, -200.0, 0.0]], dtype=torch.float32, requires_grad=True)
    prox = torch.tensor([[-150.0, -1.0, -1e-3]])
    behav = torch.tensor([[0.0, -300.0, -90.0]])
    for cap_mode in ("mask", "clamp"):
        out = decoupled_ppo_loss(logp, proximal_logp=prox, behaviour=Behaviour(behav, mode=cap_mode), advantages=torch.tensor([-3.0]), clip=Clip(dual=3.0))
        assert all(torch.isfinite(v).all() for v in out)
        (grad,) = torch.autograd.grad(out.loss, logp)
        assert torch.isfinite(grad).all()


def test_on_policy_weight_diagnostics():
    logp, prox, behav, adv, mask = batch(4)
    out = decoupled_ppo_loss(logp, proximal_logp=prox, behaviour=Behaviour(prox), advantages=adv, mask=mask)
    assert out.behaviour_weight_mean.item() == pytest.approx(1.0)
    assert out.capped_frac.item() == 0.0


def test_bfloat16_inputs():
    logp, prox, behav, adv, mask = batch(5)
    out = decoupled_ppo_loss(logp.detach().bfloat16().requires_grad_(True), proximal_logp=prox.bfloat16(), behaviour=Behaviour(behav.bfloat16()), advantages=adv.bfloat16(), mask=mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(behaviour_logp=torch.zeros(5, 5)), ValueError,
         r"`behaviour.logp` must have the same shape as `logp`"),
        (dict(proximal_logp=torch.zeros(5, 6).long()), TypeError, r"`proximal_logp` must have a float"),
        (dict(cap_mode="drop"), ValueError, r"`behaviour.mode` must be one of"),
        (dict(behaviour_weight_cap=0.0), ValueError, r"`behaviour.cap` must lie in"),
        (dict(behaviour_weight_floor=3.0), ValueError, r"`behaviour.floor` must lie in"),
        (dict(behaviour_logp=torch.full((5, 6), float("nan")), validate_args=True), ValueError,
         r"`behaviour.logp` must be finite"),
        (dict(proximal_logp=torch.full((5, 6), float("nan")), validate_args=True), ValueError,
         r"`proximal_logp` must be finite"),
        (dict(mask=torch.ones(5, 6)), TypeError, r"`mask` must have a bool"),
    ],
)
def test_errors(kwargs, error, match):
    base = dict(
        logp=torch.zeros(5, 6), proximal_logp=torch.zeros(5, 6), behaviour_logp=torch.zeros(5, 6),
        advantages=torch.zeros(5),
    )
    with pytest.raises(error, match=match):
        unchecked(decoupled_ppo_loss)(**loss_kwargs(**{**base, **kwargs}))


# ----------------------------------------------------------------------------- interpolation


def test_interpolation():
    behav = torch.tensor([[-2.0, -4.0], [-1.0, -1.0], [-3.0, -3.0]])
    current = torch.tensor([[-1.0, -2.0], [-2.0, -2.0], [-1.0, -1.0]], requires_grad=True)
    got = interpolate_proximal_logp(behav, current, torch.tensor([2, 5, 4]), 4, 6)
    # alpha: (4-2)/(6-2) = 0.5; sample at 5 > prox 4: alpha 0; sample at 4: alpha 0
    want = torch.tensor([[-1.5, -3.0], [-1.0, -1.0], [-3.0, -3.0]])
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
    same = interpolate_proximal_logp(behav, current, 6, 6, 6)
    torch.testing.assert_close(same, current.detach())
    torch.testing.assert_close(interpolate_proximal_logp(behav, current, 2, 2, 6), behav)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.zeros(2), torch.zeros(3), 0, 0, 1), ValueError, r"`current_logp` must have the same"),
        ((torch.zeros(2), torch.zeros(2), 0, 2, 1), ValueError, r"`proximal_version` must be <="),
        ((torch.zeros(2), torch.zeros(2), 3, 1, 2), ValueError, r"`behaviour_version` must be <="),
        ((torch.zeros(2), torch.zeros(2), torch.tensor([0, 3]), 1, 2), ValueError,
         r"`behaviour_version` must lie in \[0, `current_version`=2\]"),
        ((torch.zeros(2), torch.zeros(2), torch.zeros(2), 1, 2), TypeError,
         r"`behaviour_version` must have an int"),
        ((torch.zeros(2), torch.zeros(2), 0.5, 1, 2), TypeError, r"`behaviour_version` must be an int"),
        ((torch.zeros(2), torch.zeros(2), 0, 1, -2), ValueError, r"`current_version` must be >= 0"),
    ],
)
def test_interpolation_errors(args, error, match):
    with pytest.raises(error, match=match):
        unchecked(interpolate_proximal_logp)(*args, validate_args=True)


# ----------------------------------------------------------------------------- staleness


def test_staleness_and_filter():
    assert staleness(torch.tensor([[1, 3], [3, 3]]), torch.tensor(3)).tolist() == [[2, 0], [0, 0]]
    v = torch.tensor([[4, 9, 5], [2, 3, 3], [5, 5, 5], [0, 0, 0]])
    valid = torch.tensor([[True, False, True], [True, True, True], [True, True, True],
                          [False, False, False]])
    assert staleness_filter(v, 5, 1, valid).tolist() == [True, False, True, False]
    assert staleness_filter(torch.tensor([5, 3, 4]), 5, 1).tolist() == [True, False, True]
    assert staleness_filter(torch.zeros(0, dtype=torch.int64), 5, 1).tolist() == []


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: staleness(torch.tensor([1.0]), 2), TypeError, r"`versions` must have an int"),
        (lambda: staleness(torch.tensor([3]), 2, validate_args=True), ValueError, r"`versions` must not be newer"),
        (lambda: staleness(torch.tensor([-1]), 2, validate_args=True), ValueError, r"`versions` must be >= 0"),
        (lambda: staleness(torch.tensor([1]), 2.0), TypeError, r"`current_version` must be an int"),
        (lambda: staleness_filter(torch.tensor([1]), 2, -1), ValueError, r"`max_staleness` must be >= 0"),
        (lambda: staleness_filter(torch.tensor([1]), 2, 1, torch.tensor([[True]])), ValueError,
         r"`valid` is only used with"),
        (lambda: staleness_filter(torch.ones(2, 2, dtype=torch.int64), 2, 1, torch.ones(2, 3, dtype=torch.bool)),
         ValueError, r"`valid` must have the same shape as `versions`"),
        (lambda: StalenessGate(0), ValueError, r"`batch_size` must be > 0"),
        (lambda: StalenessGate(2, -1), ValueError, r"`max_staleness` must be >= 0"),
        (lambda: StalenessGate(2, 1, max_concurrent=0), ValueError, r"`max_concurrent` must be > 0"),
        (lambda: StalenessGate(2).try_start(-1), ValueError, r"`version` must be >= 0"),
        (lambda: StalenessGate(2).finish(accepted=True), ValueError, r"`finish` needs a running"),
        (lambda: StalenessGate(2).finish(accepted=1), TypeError, r"`accepted` must be a bool"),
        (lambda: StalenessGate(2).load_state_dict({"accepted": -1, "dropped": 0}), ValueError,
         r"`state\['accepted'\]` must be >= 0"),
        (lambda: StalenessGate(2).load_state_dict({"accepted": 1}), ValueError, r"`state` is missing"),
    ],
)
def test_staleness_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 10_000),
    batch_size=st.integers(1, 6),
    max_staleness=st.integers(0, 3),
    max_concurrent=st.sampled_from([None, 1, 3, 8]),
)
def test_gate_bounds_the_staleness_of_every_consumed_trajectory(
    seed, batch_size, max_staleness, max_concurrent
):
    """Random interleavings of starts, finishes (in start order) and updates: nothing consumed is
    older than eta. Out-of-order finishes need `staleness_filter` too (see the next test)."""
    rng = random.Random(seed)
    gate = StalenessGate(batch_size, max_staleness, max_concurrent=max_concurrent)
    version, running, ready, consumed = 0, [], [], 0
    for _ in range(400):
        action = rng.random()
        if action < 0.45:
            if gate.try_start(version):
                running.append(version)
        elif action < 0.85 and running:
            started = running.pop(0)
            keep = rng.random() < 0.9
            gate.finish(accepted=keep)
            if keep:
                ready.append(started)
        elif len(ready) >= batch_size:
            batch_versions, ready = ready[:batch_size], ready[batch_size:]
            assert all(version - v <= max_staleness for v in batch_versions)
            consumed += batch_size
            version += 1
        if max_concurrent is not None:
            assert len(running) <= max_concurrent
        assert gate.running == len(running)
    assert gate.accepted == consumed + len(ready)


def test_out_of_order_finishes_are_caught_by_the_filter():
    """With finishes out of start order the gate alone can let an old rollout slip past eta; the
    filter at consumption drops exactly those, so nothing consumed is older than eta."""
    rng = random.Random(0)
    gate = StalenessGate(2, 1)
    version, running, ready, slipped, dropped = 0, [], [], 0, 0
    for _ in range(4000):
        action = rng.random()
        if action < 0.45:
            if gate.try_start(version):
                running.append(version)
        elif action < 0.85 and running:
            started = running.pop(rng.randrange(len(running)))
            gate.finish(accepted=True)
            ready.append(started)
        elif len(ready) >= 2:
            batch_versions = torch.tensor(ready[:2])
            ready = ready[2:]
            slipped += int((version - batch_versions > 1).sum())
            keep = staleness_filter(batch_versions, version, 1)
            dropped += int((~keep).sum())
            assert (version - batch_versions[keep] <= 1).all()
            version += 1
    assert slipped > 0 and dropped == slipped


def test_gate_is_thread_safe():
    import threading

    gate = StalenessGate(batch_size=1000, max_staleness=10)
    started = []

    def work():
        for _ in range(500):
            if gate.try_start(0):
                started.append(1)
                gate.finish(accepted=True)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gate.accepted == len(started) == 2000 and gate.running == 0
