"""Self behaviour cloning: success-buffer policies and state, BC loss gradients, weight-rule invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import shrink
from chunkmask.log_probs import chunk_log_prob
from chunkmask.losses import bc_loss
from chunkmask.selfbc._bc_weights import (
    BCWeight,
    ConstantBCWeight,
    LossBalanceBCWeight,
    ProductBCWeight,
    SuccessRateBCWeight,
)
from chunkmask.selfbc._success_buffer import (
    AdmitSuccessful,
    EntryInfo,
    EvictOldest,
    EvictSlowest,
    SuccessBuffer,
)

F64 = torch.float64


def traj(value, n=4):
    return {"obs": torch.full((n, 3), float(value)), "valid": torch.ones(n, dtype=torch.bool)}


# ----------------------------------------------------------------------------- admission


def test_default_admission_rejects_failures():
    buf = SuccessBuffer(4)
    assert buf.add(traj(1), steps=10, success=False) is False
    assert buf.add(traj(2), steps=10, success=True) is True
    assert len(buf) == 1
    assert AdmitSuccessful(max_steps=5)(EntryInfo(True, 6, 0, 0), [], 1) is False


def test_custom_admission_and_eviction_are_called():
    calls = []

    def admit(candidate, entries, capacity):
        calls.append(("admit", candidate.steps, len(entries), capacity))
        return candidate.steps % 2 == 0

    buf = SuccessBuffer(2, admission=admit, eviction=EvictOldest())
    for s in (2, 3, 4, 6):
        buf.add(traj(s), steps=s)
    assert [e.steps for e in buf.info] == [6, 4]  # FIFO replaced the oldest (2)
    assert calls[0] == ("admit", 2, 0, 2)


# ----------------------------------------------------------------------------- eviction


def test_keeps_best_k_by_steps():
    buf = SuccessBuffer(3)
    for s in (50, 30, 70, 20, 60, 10, 40):
        buf.add(traj(s), steps=s)
    assert sorted(e.steps for e in buf.info) == [10, 20, 30]
    # the stored data follows the metadata
    for entry, info in zip(buf._entries, buf.info, strict=True):
        assert entry["obs"][0, 0].item() == info.steps


def test_ties_evict_the_oldest_and_newcomer_wins_ties():
    buf = SuccessBuffer(2)
    buf.add(traj(1), steps=30)
    buf.add(traj(2), steps=30)
    assert buf.add(traj(3), steps=30) is True
    assert [e.added for e in buf.info] == [2, 1]  # entry 0 (oldest) was replaced


def test_task_balance():
    buf = SuccessBuffer(4)
    for s in (10, 11, 12, 13):
        buf.add(traj(s), steps=s, task="a")
    # a slow success of a new task still gets in: the crowded task "a" gives up its slowest
    assert buf.add(traj(99), steps=99, task="b") is True
    buf.add(traj(98), steps=98, task="b")
    tasks = sorted(e.task for e in buf.info)
    assert tasks == ["a", "a", "b", "b"]
    assert sorted(e.steps for e in buf.info if e.task == "a") == [10, 11]
    # now balanced: a slower "b" is rejected, a faster "b" replaces the slowest "b"
    assert buf.add(traj(100), steps=100, task="b") is False
    assert buf.add(traj(50), steps=50, task="b") is True
    assert sorted(e.steps for e in buf.info if e.task == "b") == [50, 98]


def test_max_age_evicts_stale_entries_first():
    buf = SuccessBuffer(2, eviction=EvictSlowest(max_age=3))
    buf.add(traj(1), steps=1)
    buf.add(traj(2), steps=2)
    for _ in range(3):
        buf.add(traj(0), steps=10_000, success=False)  # rejected, but time passes
    assert buf.add(traj(50), steps=50) is True
    assert sorted(e.steps for e in buf.info) == [2, 50]


def test_unbalanced_pool():
    evict = EvictSlowest(balance_tasks=False)
    entries = [EntryInfo(True, 5, "a", 0), EntryInfo(True, 9, "b", 1)]
    assert evict(EntryInfo(True, 7, "a", 2), entries) == 1
    assert evict(EntryInfo(True, 10, "a", 2), entries) is None


@settings(deadline=None, max_examples=20)
@given(steps=st.lists(st.integers(1, 200), min_size=1, max_size=30), cap=st.integers(1, 6))
def test_single_task_buffer_holds_the_best_k(steps, cap):
    buf = SuccessBuffer(cap)
    for s in steps:
        buf.add(traj(s), steps=s)
    assert len(buf) == min(cap, len(steps))
    assert sorted(e.steps for e in buf.info) == sorted(steps)[:cap]


# ----------------------------------------------------------------------------- state and sampling


def test_state_round_trip_and_determinism():
    buf = SuccessBuffer(5)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        buf.add(traj(i), steps=int(torch.randint(1, 100, (1,), generator=g)), task=i % 2)
    state = buf.state_dict()
    other = SuccessBuffer(5)
    other.load_state_dict(state)
    assert other.info == buf.info
    a = buf.sample(6, generator=torch.Generator().manual_seed(3))
    b = other.sample(6, generator=torch.Generator().manual_seed(3))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert a["obs"].shape == (6, 4, 3)
    # the counter continues, so both buffers make the same admission decisions afterwards
    assert buf.add(traj(7), steps=3) == other.add(traj(7), steps=3)
    assert buf.info == other.info
    # the state is a copy: mutating it leaves the buffer alone
    state["entries"][0]["obs"].fill_(-1)
    assert (other._entries[0]["obs"] != -1).all()


def test_add_batch():
    buf = SuccessBuffer(3)
    batch = {"obs": torch.arange(4.0)[:, None, None].expand(4, 2, 3).clone(),
             "valid": torch.ones(4, 2, dtype=torch.bool)}
    kept = buf.add_batch(batch, success=torch.tensor([True, False, True, True]),
                         steps=torch.tensor([5, 1, 7, 3]), task=["x", "x", "y", "y"])
    assert kept == [True, False, True, True]
    assert sorted(e.steps for e in buf.info) == [3, 5, 7]


def test_buffer_errors():
    with pytest.raises(ValueError, match="`capacity` must be > 0"):
        SuccessBuffer(0)
    with pytest.raises(TypeError, match="`admission` must be callable"):
        SuccessBuffer(2, admission=3)
    with pytest.raises(TypeError, match="`eviction` must be callable"):
        SuccessBuffer(2, eviction="x")
    buf = SuccessBuffer(2)
    with pytest.raises(ValueError, match="must hold at least one entry"):
        buf.sample(2)
    with pytest.raises(TypeError, match="`trajectory` must be a non-empty dict"):
        buf.add([torch.zeros(2)], steps=1)
    with pytest.raises(TypeError, match=r"`trajectory\['obs'\]` must be a torch.Tensor"):
        buf.add({"obs": 3}, steps=1)
    buf.add(traj(1), steps=1)
    with pytest.raises(ValueError, match="`trajectory` must have the keys, shapes and dtypes"):
        buf.add(traj(1, n=5), steps=1)
    with pytest.raises(ValueError, match="`steps` must be >= 0"):
        buf.add(traj(1), steps=-1)
    with pytest.raises(ValueError, match="`batch_size` must be > 0"):
        buf.sample(0)
    with pytest.raises(ValueError, match=r"`indices` must lie in \[0, 1\)"):
        buf.gather([3])
    with pytest.raises(ValueError, match="`batch` tensors must share the leading traj size"):
        buf.add_batch({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}, success=[1, 1], steps=[1, 1])
    with pytest.raises(ValueError, match=r"`success` must have shape \(2,\)"):
        buf.add_batch({"a": torch.zeros(2, 1)}, success=torch.ones(3, dtype=torch.bool), steps=[1, 1])
    with pytest.raises(ValueError, match="`state` is missing keys"):
        buf.load_state_dict({"entries": []})
    big = SuccessBuffer(5)
    for i in range(4):
        big.add(traj(i), steps=i)
    with pytest.raises(ValueError, match="more than `capacity` 2"):
        buf.load_state_dict(big.state_dict())

    def bad_evict(candidate, entries):
        return 7

    full = SuccessBuffer(1, eviction=bad_evict)
    full.add(traj(1), steps=1)
    with pytest.raises(ValueError, match=r"`eviction` must return an index in \[0, 1\)"):
        full.add(traj(1), steps=1)


# ----------------------------------------------------------------------------- bc_loss


def test_bc_loss_gradients_match_manual_nll():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 2, 2, generator=g, dtype=F64, requires_grad=True)
    actions = torch.randn(3, 4, 2, 2, generator=g, dtype=F64)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    logp_dims = -0.5 * (actions - mu).square()
    loss = bc_loss(chunk_log_prob(logp_dims, valid[..., None, None].expand_as(mu), event_dims=2), mask=valid, event_size=4)
    loss.backward()
    # d/dmu of the mean (over valid chunks) of 0.5 * |a - mu|^2 / 4
    want = torch.where(valid[..., None, None], -(actions - mu.detach()) / 4 / valid.sum(), 0)
    torch.testing.assert_close(mu.grad, want)


def test_bc_loss_gradcheck_and_nan_padding():
    lp = torch.randn(2, 3, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        torch.autograd.gradcheck(lambda x, m=mode: bc_loss(x, mask=mask, loss_agg_mode=m), (lp,))
    x = lp.detach().masked_fill(~mask, float("nan")).requires_grad_(True)
    bc_loss(x, mask=mask).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


def test_bc_loss_packed_equals_padded():
    lp = torch.randn(3, 4, dtype=F64)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    sel = Selection.from_mask(valid)
    packed = shrink(lp, sel)
    for mode in ("token-mean", "seq-mean-token-mean"):
        torch.testing.assert_close(bc_loss(lp, mask=valid, loss_agg_mode=mode),
                                   bc_loss(packed, selection=sel, loss_agg_mode=mode))
    assert bc_loss(torch.zeros(2, 2), mask=torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_bc_loss_errors():
    with pytest.raises(ValueError, match=r"`logp` must be \(rows, token\) or \(m,\), got 3 dimensions"):
        bc_loss(torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match="`mask` must have a bool dtype"):
        bc_loss(torch.zeros(2), mask=torch.zeros(2))
    with pytest.raises(ValueError, match=r"`mask` must have the same shape as `logp` \(2,\)"):
        bc_loss(torch.zeros(2), mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`loss_agg_mode` must be one of"):
        bc_loss(torch.zeros(2), loss_agg_mode="sum")
    with pytest.raises(ValueError, match="`event_size` must be > 0"):
        bc_loss(torch.zeros(2), event_size=0)
    with pytest.raises(ValueError, match=r"`logp` must have one row per selected chunk of `selection` \(4\), got 2"):
        bc_loss(torch.zeros(2, 2), selection=Selection.from_mask(torch.ones(2, 2, dtype=torch.bool)),
                validate_args=True)
    with pytest.raises(TypeError, match="`selection` must be a chunkmask.Selection"):
        bc_loss(torch.zeros(2), selection=3)


# ----------------------------------------------------------------------------- weight rules


@settings(deadline=None, max_examples=25)
@given(
    rates=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    low=st.floats(0.0, 1.0),
    span=st.floats(0.0, 2.0),
    momentum=st.floats(0.0, 0.99),
    direction=st.sampled_from(["decreasing", "increasing"]),
)
def test_success_rate_rule_bounded_and_monotone(rates, low, span, momentum, direction):
    rule = SuccessRateBCWeight(low, low + span, momentum=momentum, direction=direction)
    for r in rates:
        w = rule.update(success_rate=r)
        assert low - 1e-12 <= w <= low + span + 1e-12
        assert 0.0 <= rule.average <= 1.0
    # monotone in the averaged success rate
    a = SuccessRateBCWeight(low, low + span, direction=direction)
    b = SuccessRateBCWeight(low, low + span, direction=direction)
    wa, wb = a.update(success_rate=0.2), b.update(success_rate=0.7)
    assert (wa >= wb) if direction == "decreasing" else (wa <= wb)


@settings(deadline=None, max_examples=25)
@given(
    ppo=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=10),
    bc=st.lists(st.floats(1e-3, 100.0), min_size=10, max_size=10),
    ratio=st.floats(0.01, 5.0),
    momentum=st.floats(0.0, 0.99),
)
def test_loss_balance_rule_invariants(ppo, bc, ratio, momentum):
    rule = LossBalanceBCWeight(ratio, momentum=momentum, low=0.0, high=1e9)
    for p, b in zip(ppo, bc, strict=False):
        w = rule.update(ppo_scale=p, bc_scale=b)
        assert w >= 0.0
        # the weighted BC magnitude is the target share of the PPO magnitude (averages)
        assert w * rule.bc_average == pytest.approx(ratio * rule.ppo_average, rel=1e-6, abs=1e-9)
    clipped = LossBalanceBCWeight(ratio, low=0.5, high=2.0)
    assert 0.5 <= clipped.update(ppo_scale=ppo[0], bc_scale=bc[0]) <= 2.0
    # scale invariance: multiplying both magnitudes by c leaves the weight alone
    r1, r2 = LossBalanceBCWeight(ratio, momentum=momentum), LossBalanceBCWeight(ratio, momentum=momentum)
    for p, b in zip(ppo, bc, strict=False):
        w1 = r1.update(ppo_scale=p, bc_scale=b)
        w2 = r2.update(ppo_scale=7 * p, bc_scale=7 * b)
    assert w1 == pytest.approx(w2, rel=1e-9)


def test_rules_state_round_trip_and_composition():
    makers = [
        lambda: ConstantBCWeight(0.3),
        lambda: SuccessRateBCWeight(momentum=0.5),
        lambda: LossBalanceBCWeight(momentum=0.5),
        lambda: ProductBCWeight(SuccessRateBCWeight(0.0, 1.0), LossBalanceBCWeight(1.0)),
    ]
    stats = [dict(success_rate=0.1 * i, ppo_scale=1.0 + i, bc_scale=2.0) for i in range(5)]
    for make in makers:
        rule = make()
        for s in stats[:3]:
            rule.update(**s)
        clone = make()
        clone.load_state_dict(rule.state_dict())
        assert clone.value == pytest.approx(rule.value)
        for s in stats[3:]:
            assert clone.update(**s) == pytest.approx(rule.update(**s))
    prod = ProductBCWeight(ConstantBCWeight(0.5), SuccessRateBCWeight(0.0, 1.0))
    assert prod.update(success_rate=0.4) == pytest.approx(0.5 * 0.6)
    assert isinstance(prod, BCWeight)


def test_rule_errors():
    with pytest.raises(ValueError, match="`success_rate` must be given"):
        SuccessRateBCWeight().update(ppo_scale=1.0)
    with pytest.raises(ValueError, match=r"`success_rate` must lie in \[0.0, 1.0\]"):
        SuccessRateBCWeight().update(success_rate=1.5)
    with pytest.raises(ValueError, match="`bc_scale` must be given"):
        LossBalanceBCWeight().update(ppo_scale=1.0)
    with pytest.raises(ValueError, match=r"`ppo_scale` must lie in \[0.0, inf\)"):
        LossBalanceBCWeight().update(ppo_scale=-1.0, bc_scale=1.0)
    with pytest.raises(ValueError, match="`ppo_scale` must be finite"):
        LossBalanceBCWeight().update(ppo_scale=float("nan"), bc_scale=1.0)
    with pytest.raises(ValueError, match=r"`high` must lie in \[0.5, inf\)"):
        SuccessRateBCWeight(low=0.5, high=0.1)
    with pytest.raises(ValueError, match="`direction` must be one of"):
        SuccessRateBCWeight(direction="up")
    with pytest.raises(ValueError, match=r"`momentum` must lie in \[0.0, 1.0\)"):
        LossBalanceBCWeight(momentum=1.0)
    with pytest.raises(ValueError, match=r"`ratio` must lie in \(0.0, inf\)"):
        LossBalanceBCWeight(ratio=0.0)
    with pytest.raises(ValueError, match=r"`weight` must lie in \[0.0, inf\)"):
        ConstantBCWeight(-1.0)
    with pytest.raises(ValueError, match="`rules` must hold at least one rule"):
        ProductBCWeight()
    with pytest.raises(TypeError, match=r"`rules\[0\]` must be a BCWeight"):
        ProductBCWeight(3)
    with pytest.raises(ValueError, match="`state` is missing keys"):
        SuccessRateBCWeight().load_state_dict({})
    with pytest.raises(ValueError, match="must hold 1 states"):
        ProductBCWeight(ConstantBCWeight()).load_state_dict({"rules": []})
    with pytest.raises(ValueError, match=r"`success_rate` must be a scalar"):
        SuccessRateBCWeight().update(success_rate=torch.zeros(2))
