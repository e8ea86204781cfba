"""Chunk-level PPO: loop oracles for chunk rewards and GAE, the PPO and value losses on padded and packed batches, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _reference import ppo as ref
from chunkmask import Clip
from chunkmask.advantages import ChunkGAEOutput, chunk_gae, chunk_rewards, whiten_advantages
from chunkmask.aggregation import aggregate_loss
from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import shrink
from chunkmask.log_probs import chunk_log_prob
from chunkmask.losses import PolicyLossOutput, chunked_ppo_loss, clipped_surrogate, value_loss
from chunkmask.pcm._masker import ProbabilisticChunkMasker

F64 = torch.float64


def rollout_batch(seed, traj=4, n=6, h=3, *, dtype=F64, multi_episode=False):
    """A padded chunk batch with terminations, truncations, partial last chunks and NaN padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (traj,), generator=g)
    valid = torch.arange(n)[None, :] < lengths[:, None]
    last = valid & ~torch.cat([valid[:, 1:], torch.zeros(traj, 1, dtype=torch.bool)], 1)
    end_kind = torch.randint(0, 3, (traj,), generator=g)  # 0 terminated, 1 truncated, 2 cut
    terminated = last & (end_kind == 0)[:, None]
    truncated = last & (end_kind == 1)[:, None]
    if multi_episode:
        inner = valid & ~last & (torch.rand(traj, n, generator=g) < 0.25)
        kind = torch.rand(traj, n, generator=g) < 0.5
        terminated = terminated | (inner & kind)
        truncated = truncated | (inner & ~kind)
    steps = torch.full((traj, n), h, dtype=torch.int64)
    partial = torch.randint(1, h + 1, (traj, n), generator=g)
    steps = torch.where(terminated | truncated, partial, steps)
    step_mask = (torch.arange(h)[None, None, :] < steps[..., None]) & valid[..., None]
    step_rewards = torch.randn(traj, n, h, generator=g, dtype=F64)
    values = torch.randn(traj, n, generator=g, dtype=F64)
    next_values = torch.randn(traj, n, generator=g, dtype=F64)
    bootstrap = torch.randn(traj, generator=g, dtype=F64)
    nan = torch.tensor(float("nan"), dtype=F64)
    step_rewards = torch.where(step_mask, step_rewards, nan)
    values = torch.where(valid, values, nan)
    return {
        "valid": valid,
        "terminated": terminated,
        "truncated": truncated,
        "steps": torch.where(valid, steps, 0),
        "step_mask": step_mask,
        "step_rewards": step_rewards.to(dtype),
        "values": values.to(dtype),
        "next_values": next_values.to(dtype),
        "bootstrap": bootstrap.to(dtype),
    }


# ----------------------------------------------------------------------------- chunk_rewards


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 10_000), gamma=st.floats(0.0, 1.0))
def test_chunk_rewards_matches_loop(seed, gamma):
    b = rollout_batch(seed)
    got = chunk_rewards(b["step_rewards"], b["step_mask"], gamma=gamma)
    want = ref.chunk_rewards_ref(b["step_rewards"].tolist(), b["step_mask"].tolist(), gamma)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64))


def test_chunk_rewards_dtypes():
    r = torch.ones(2, 3, 4, dtype=torch.bfloat16)
    assert chunk_rewards(r, gamma=1.0).dtype == torch.float32
    assert chunk_rewards(torch.ones(2, 4, dtype=torch.int64), gamma=1.0).tolist() == [4.0, 4.0]


# ----------------------------------------------------------------------------- chunk_gae


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 10_000),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    multi=st.booleans(),
)
def test_chunk_gae_matches_loop_reference(seed, gamma, lam, multi):
    b = rollout_batch(seed, multi_episode=multi)
    rewards = chunk_rewards(b["step_rewards"], b["step_mask"], gamma=gamma)
    out = chunk_gae(
        rewards, b["values"], b["valid"], terminated=b["terminated"], truncated=b["truncated"],
        next_values=b["next_values"], bootstrap_value=b["bootstrap"], chunk_steps=b["steps"],
        gamma=gamma, lam=lam, chunk_size=3,
    )
    assert isinstance(out, ChunkGAEOutput)
    adv, ret = ref.chunk_gae_ref(
        rewards.tolist(), b["values"].tolist(), b["valid"].tolist(), b["terminated"].tolist(),
        b["truncated"].tolist(), b["next_values"].tolist(), b["bootstrap"].tolist(),
        b["steps"].tolist(), gamma, lam,
    )
    torch.testing.assert_close(out.advantages, torch.tensor(adv, dtype=F64))
    torch.testing.assert_close(out.returns, torch.tensor(ret, dtype=F64))


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 10_000), gamma=st.floats(0.5, 1.0), multi=st.booleans())
def test_chunk_gae_lambda_one_is_step_level_monte_carlo(seed, gamma, multi):
    # Independent oracle: with lambda = 1 the returns are the step-level discounted returns,
    # bootstrapped at truncation and at the rollout cut, 0 after termination.
    b = rollout_batch(seed, multi_episode=multi)
    rewards = chunk_rewards(b["step_rewards"], b["step_mask"], gamma=gamma)
    out = chunk_gae(
        rewards, b["values"], b["valid"], terminated=b["terminated"], truncated=b["truncated"],
        next_values=b["next_values"], bootstrap_value=b["bootstrap"], chunk_steps=b["steps"],
        gamma=gamma, lam=1.0, chunk_size=3,
    )
    mc = ref.monte_carlo_returns_ref(
        b["step_rewards"].tolist(), b["step_mask"].tolist(), b["terminated"].tolist(),
        b["truncated"].tolist(), b["next_values"].tolist(), b["bootstrap"].tolist(), gamma,
    )
    torch.testing.assert_close(out.returns, torch.tensor(mc, dtype=F64))


def test_chunk_gae_one_step_chunks_equal_standard_gae():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)
    out = chunk_gae(r, v, gamma=0.9, lam=0.8)
    # Textbook GAE over steps, rollout cut at the end without bootstrap.
    adv = torch.zeros_like(r)
    last = torch.zeros(3, dtype=F64)
    for t in range(6, -1, -1):
        nv = v[:, t + 1] if t < 6 else torch.zeros(3, dtype=F64)
        delta = r[:, t] + 0.9 * nv - v[:, t]
        last = delta + (0.9 * 0.8 * last if t < 6 else 0)
        adv[:, t] = last
    torch.testing.assert_close(out.advantages, adv)


def test_chunk_gae_truncation_bootstraps_and_termination_does_not():
    r = torch.zeros(2, 2)
    v = torch.zeros(2, 2)
    nv = torch.full((2, 2), 5.0)
    term = torch.tensor([[False, True], [False, False]])
    trunc = torch.tensor([[False, False], [False, True]])
    out = chunk_gae(r, v, terminated=term, truncated=trunc, next_values=nv, gamma=0.5,
                    chunk_size=1, lam=1.0)
    assert out.advantages[0].tolist() == [0.0, 0.0]
    assert out.advantages[1].tolist() == [1.25, 2.5]


def test_chunk_gae_padding_nan_ignored_and_zero():
    r = torch.tensor([[1.0, float("nan")]])
    v = torch.tensor([[0.5, float("nan")]])
    valid = torch.tensor([[True, False]])
    out = chunk_gae(r, v, valid, terminated=torch.tensor([[True, False]]))
    assert out.advantages.tolist() == [[0.5, 0.0]]
    assert out.returns.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_gae_low_precision_close_to_float64(dtype):
    b = rollout_batch(3)
    rewards = chunk_rewards(b["step_rewards"], b["step_mask"], gamma=0.99)
    kw = dict(terminated=b["terminated"], truncated=b["truncated"], chunk_steps=b["steps"],
              gamma=0.99, lam=0.95, chunk_size=3)
    hi = chunk_gae(rewards, b["values"], b["valid"], next_values=b["next_values"], **kw)
    lo = chunk_gae(rewards.to(dtype), b["values"].to(dtype), b["valid"],
                   next_values=b["next_values"].to(dtype), **kw)
    assert lo.advantages.dtype == torch.float32
    torch.testing.assert_close(lo.advantages.double(), hi.advantages, atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- chunk_log_prob


def test_chunk_log_prob_per_token_and_per_dim_agree():
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 4, 5, 2, generator=g)
    m = torch.rand(3, 4, 5, 2, generator=g) < 0.7
    per_dim = chunk_log_prob(lp, m, event_dims=2)
    per_token = chunk_log_prob(lp.reshape(3, 4, 10), m.reshape(3, 4, 10))
    torch.testing.assert_close(per_dim, per_token)
    torch.testing.assert_close(per_dim, (lp * m).sum((-1, -2)))


def test_chunk_log_prob_masked_nan_has_zero_gradient():
    lp = torch.tensor([[-1.0, float("nan")], [-2.0, -3.0]], requires_grad=True)
    m = torch.tensor([[True, False], [True, True]])
    out = chunk_log_prob(lp, m)
    out.sum().backward()
    assert out.tolist() == [-1.0, -5.0]
    assert lp.grad.tolist() == [[1.0, 0.0], [1.0, 1.0]]


# ----------------------------------------------------------------------------- chunked_ppo_loss


def ppo_inputs(seed, traj=4, n=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n + 1, (traj,), generator=g)
    valid = torch.arange(n)[None, :] < lengths[:, None]
    logp = -3 * torch.rand(traj, n, generator=g, dtype=F64)
    old = logp + 0.3 * torch.randn(traj, n, generator=g, dtype=F64)
    adv = torch.randn(traj, n, generator=g, dtype=F64)
    nan = torch.tensor(float("nan"), dtype=F64)
    return (torch.where(valid, logp, nan), torch.where(valid, old, nan),
            torch.where(valid, adv, nan), valid)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
)
def test_chunked_ppo_loss_padded_equals_core_primitives(mode):
    logp, old, adv, valid = ppo_inputs(0)
    out = chunked_ppo_loss(logp, old_logp=old, advantages=adv, mask=valid, loss_agg_mode=mode, clip=Clip(dual=3.0))
    assert isinstance(out, PolicyLossOutput)
    z = torch.zeros((), dtype=F64)
    sur = clipped_surrogate(torch.where(valid, logp, z), old_logp=torch.where(valid, old, z), advantages=torch.where(valid, adv, z), clip=Clip(dual=3.0))
    torch.testing.assert_close(out.loss, aggregate_loss(sur.loss, valid, mode))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_chunked_ppo_loss_packed_equals_padded(mode):
    logp, old, adv, valid = ppo_inputs(1)
    sel = Selection.from_mask(valid)
    packed = shrink({"logp": logp, "old": old, "adv": adv}, sel)
    a = chunked_ppo_loss(logp, old_logp=old, advantages=adv, mask=valid, loss_agg_mode=mode)
    b = chunked_ppo_loss(packed["logp"], old_logp=packed["old"], advantages=packed["adv"], selection=sel, loss_agg_mode=mode)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.approx_kl, b.approx_kl)


def test_chunked_ppo_loss_gradient_zero_at_padding():
    logp, old, adv, valid = ppo_inputs(2)
    logp = logp.clone().requires_grad_(True)
    out = chunked_ppo_loss(logp, old_logp=old, advantages=adv, mask=valid)
    out.loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~valid] == 0).all()


def test_chunked_ppo_gradcheck():
    logp, old, adv, valid = ppo_inputs(4)
    z = torch.zeros((), dtype=F64)
    x = torch.where(valid, logp, z).requires_grad_(True)
    torch.autograd.gradcheck(
        lambda t: chunked_ppo_loss(t, old_logp=old, advantages=adv, mask=valid, clip=Clip(high=1e3, low=0.999)).loss, (x,)
    )


def test_pcm_selection_shrink_then_ppo_and_value_loss():
    """The PCM combination: select chunks, shrink the batch, PPO + value loss on the packed batch."""
    g = torch.Generator().manual_seed(5)
    traj, n, h, d = 6, 8, 4, 3
    lengths = torch.tensor([8, 6, 7, 8, 5, 8])
    valid = torch.arange(n)[None] < lengths[:, None]
    actions = torch.randn(traj, n, h, d, generator=g)
    actions[..., -1] = torch.where(torch.arange(n)[None, :, None] % 4 < 2, -1.0, 1.0)
    success = torch.tensor([True, False, True, False, True, False])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    obs = torch.randn(traj, n, 5, generator=g)
    policy = torch.nn.Linear(5, 1, dtype=torch.float32)
    critic = torch.nn.Linear(5, 1)
    old_logp = torch.randn(traj, n, generator=g) - 2
    adv = torch.randn(traj, n, generator=g)
    returns = torch.randn(traj, n, generator=g)
    old_values = torch.randn(traj, n, generator=g)
    masker = ProbabilisticChunkMasker(budget=3, seed=0)
    sel = masker.select(actions=actions, success=success, group=group, valid=valid)
    assert sel.counts.tolist() == [3] * traj
    batch = shrink({"obs": obs, "old_logp": old_logp, "adv": adv, "returns": returns,
                    "old_values": old_values}, sel)
    m = batch["obs"].shape[0]
    assert m == 3 * traj
    logp = policy(batch["obs"]).squeeze(-1) + batch["old_logp"]
    pol = chunked_ppo_loss(logp, old_logp=batch["old_logp"], advantages=batch["adv"], selection=sel, loss_agg_mode="seq-mean-token-mean")
    vl = value_loss(critic(batch["obs"]).squeeze(-1), returns=batch["returns"], selection=sel, old_values=batch["old_values"])
    (pol.loss + vl).backward()
    assert policy.weight.grad is not None and torch.isfinite(policy.weight.grad).all()
    assert critic.weight.grad is not None and torch.isfinite(critic.weight.grad).all()
    # The packed loss equals the padded loss restricted to the selected chunks.
    with torch.no_grad():
        full_logp = policy(obs).squeeze(-1) + old_logp
        chosen = sel.chunk_mask()
        dense = chunked_ppo_loss(full_logp, old_logp=old_logp, advantages=adv, mask=chosen, loss_agg_mode="seq-mean-token-mean")
        torch.testing.assert_close(dense.loss, pol.loss.detach())
        dense_v = value_loss(critic(obs).squeeze(-1), returns=returns, mask=chosen, old_values=old_values)
        torch.testing.assert_close(dense_v, vl.detach())


# ----------------------------------------------------------------------------- value_loss


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), clip=st.sampled_from([None, 0.2, 1.0]),
       loss_type=st.sampled_from(["huber", "mse"]), delta=st.floats(0.1, 10.0))
def test_value_loss_matches_loop(seed, clip, loss_type, delta):
    g = torch.Generator().manual_seed(seed)
    v = 5 * torch.randn(12, generator=g, dtype=F64)
    ret = 5 * torch.randn(12, generator=g, dtype=F64)
    old = v + torch.randn(12, generator=g, dtype=F64)
    mask = torch.rand(12, generator=g) < 0.7
    got = value_loss(v.view(3, 4), returns=ret.view(3, 4), mask=mask.view(3, 4), old_values=old.view(3, 4), loss_type=loss_type, huber_delta=delta, value_clip=clip)
    want = ref.value_loss_ref(v.tolist(), ret.tolist(), old.tolist(), mask.tolist(), clip, delta,
                              loss_type)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64))


def test_value_loss_gradcheck_and_padding():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    ret = 20 * torch.randn(2, 3, generator=g, dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.autograd.gradcheck(lambda x: value_loss(x, returns=ret, mask=mask, value_clip=None), (v,))
    value_loss(v, returns=ret.masked_fill(~mask, float("nan")), mask=mask).backward()
    assert (v.grad[~mask] == 0).all() and torch.isfinite(v.grad).all()


# ----------------------------------------------------------------------------- whiten


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 10_000), shift=st.booleans())
def test_whiten_matches_loop(seed, shift):
    g = torch.Generator().manual_seed(seed)
    a = 3 * torch.randn(20, generator=g, dtype=F64) + 1
    mask = torch.rand(20, generator=g) < 0.6
    mask[:2] = True
    got = whiten_advantages(a.masked_fill(~mask, float("nan")).view(4, 5), mask.view(4, 5),
                            shift_mean=shift, eps=1e-8)
    want = torch.tensor(ref.whiten_ref(a.tolist(), mask.tolist(), 1e-8), dtype=F64)
    if not shift:
        want = torch.where(mask, want + a[mask].mean(), 0)
    torch.testing.assert_close(got.view(-1), want)


def test_whiten_degenerate_inputs_finite():
    assert whiten_advantages(torch.tensor([2.0]), torch.tensor([True])).tolist() == [0.0]
    assert whiten_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.bool)).tolist() == [0.0] * 3
    assert whiten_advantages(torch.ones(2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- errors


def test_errors():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"`gamma` must lie in \[0.0, 1.0\]"):
        chunk_rewards(r, gamma=1.5)
    with pytest.raises(TypeError, match="`mask` must have a bool dtype"):
        chunk_rewards(r, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`mask` must have the same shape as `rewards` \(2, 3\)"):
        chunk_rewards(r, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="`rewards` must have a float or int dtype"):
        chunk_rewards(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`values` must have the same shape as `rewards`"):
        chunk_gae(r, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="`rewards` must have 2 dimensions"):
        chunk_gae(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="`next_values` is required"):
        chunk_gae(r, r, truncated=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`valid` must be a prefix"):
        chunk_gae(r, r, torch.tensor([[True, False, True], [True, True, True]]), validate_args=True)
    with pytest.raises(ValueError, match="`rewards` must be finite"):
        chunk_gae(torch.tensor([[float("nan")]]), torch.zeros(1, 1), validate_args=True)
    with pytest.raises(ValueError, match=r"`bootstrap_value` must have shape \(2,\)"):
        chunk_gae(r, r, bootstrap_value=torch.zeros(3))
    with pytest.raises(ValueError, match=r"`lam` must lie in"):
        chunk_gae(r, r, lam=-0.1)
    with pytest.raises(ValueError, match="`chunk_size` must be > 0"):
        chunk_gae(r, r, chunk_size=0)
    with pytest.raises(TypeError, match="`chunk_steps` must have an int dtype"):
        chunk_gae(r, r, chunk_steps=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`event_dims` must be > 0"):
        chunk_log_prob(r, event_dims=0)
    with pytest.raises(ValueError, match="`logp` must have at least 3 dimensions"):
        chunk_log_prob(r, event_dims=3)
    with pytest.raises(ValueError, match=r"`old_logp` must have the same shape as `logp`"):
        chunked_ppo_loss(r, old_logp=torch.zeros(2, 2), advantages=r)
    with pytest.raises(ValueError, match="`loss_agg_mode` must be one of"):
        chunked_ppo_loss(r, old_logp=r, advantages=r, loss_agg_mode="mean")
    with pytest.raises(ValueError, match=r"`logp` must have one row per selected chunk of `selection` \(6\), got 2"):
        chunked_ppo_loss(r, old_logp=r, advantages=r, selection=Selection.from_mask(torch.ones(2, 3, dtype=torch.bool)),
                         validate_args=True)
    with pytest.raises(TypeError, match="`selection` must be a chunkmask.Selection"):
        chunked_ppo_loss(torch.zeros(3), old_logp=torch.zeros(3), advantages=torch.zeros(3), selection="x")
    with pytest.raises(ValueError, match=r"`logp` must be \(rows, token\) or \(m,\), got 3 dimensions"):
        chunked_ppo_loss(torch.zeros(1, 2, 3), old_logp=torch.zeros(1, 2, 3), advantages=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        value_loss(r, returns=r, loss_type="l1")
    with pytest.raises(ValueError, match=r"`huber_delta` must lie in \(0.0, inf\)"):
        value_loss(r, returns=r, huber_delta=0.0)
    with pytest.raises(ValueError, match=r"`value_clip` must lie in \(0.0, inf\)"):
        value_loss(r, returns=r, old_values=r, value_clip=-1.0)
    with pytest.raises(ValueError, match=r"`old_values` must have the same shape as `values`"):
        value_loss(r, returns=r, old_values=torch.zeros(3))
    with pytest.raises(TypeError, match="`advantages` must have a float dtype"):
        whiten_advantages(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`eps` must lie in \[0.0, inf\)"):
        whiten_advantages(torch.zeros(3), eps=-1.0)
