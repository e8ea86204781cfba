"""Tests for chunkmask.advantages: loop oracle, verl parity, properties and error paths."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _reference import advantages as ref
from _reference import verl
from chunkmask.advantages import group_relative_advantages


def _batch(draw_seed, n, num_groups, binary):
    g = torch.Generator().manual_seed(draw_seed)
    labels = torch.randint(-(10**12), 10**12, (num_groups,), generator=g)
    group = labels[torch.randint(0, num_groups, (n,), generator=g)]
    if binary:
        rewards = torch.randint(0, 2, (n,), generator=g).to(torch.float64)
    else:
        rewards = torch.randn(n, generator=g, dtype=torch.float64)
    return rewards, group


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 30),
    num_groups=st.integers(1, 8),
    binary=st.booleans(),
    scale=st.booleans(),
    eps=st.sampled_from([1e-6, 1e-4, 0.0]),
    use_valid=st.booleans(),
)
def test_matches_loop_reference(seed, n, num_groups, binary, scale, eps, use_valid):
    rewards, group = _batch(seed, n, num_groups, binary)
    valid = None
    if use_valid:
        valid = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < 0.7
    got = group_relative_advantages(rewards, group, eps=eps, scale_by_std=scale, valid=valid)
    want = ref.group_relative_advantages(
        rewards.tolist(),
        group.tolist(),
        eps=eps,
        scale_by_std=scale,
        valid=None if valid is None else valid.tolist(),
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [True, False])
def test_parity_with_verl_grpo_outcome_advantage(scale):
    g = torch.Generator().manual_seed(0)
    group = torch.arange(8).repeat_interleave(10)[torch.randperm(80, generator=g)]
    rewards = torch.randint(0, 2, (80,), generator=g).to(torch.float64)
    rewards[group == 3] = 1.0  # an all-success group
    length = 5
    token_rewards = torch.zeros(80, length, dtype=torch.float64)
    token_rewards[:, -1] = rewards
    response_mask = torch.ones(80, length)
    want = verl.grpo_outcome_advantage(
        token_rewards, response_mask, group.numpy(), 1e-6, norm_adv_by_std_in_grpo=scale
    )
    got = group_relative_advantages(rewards, group, eps=1e-6, scale_by_std=scale)
    torch.testing.assert_close(got[:, None].expand(80, length), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, None].expand(80, length), want, rtol=1e-12, atol=1e-12)


def test_singleton_group_differs_from_verl_by_design():
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1])
    got = group_relative_advantages(rewards, group)
    want = verl.grpo_outcome_advantage(rewards[:, None], torch.ones(3, 1), group.numpy())[:, 0]
    assert got[2] == 0.0
    assert abs(float(want[2]) - 1.0 / (1.0 + 1e-6)) < 1e-12
    torch.testing.assert_close(got[:2], want[:2])


def test_constant_group_is_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7], dtype=torch.float64)
    group = torch.tensor([5, 5, 5, 2, 2])
    assert group_relative_advantages(rewards, group).tolist() == [0.0] * 5
    assert group_relative_advantages(rewards, group, scale_by_std=False).tolist() == [0.0] * 5


def test_valid_excludes_from_statistics_and_zeroes():
    rewards = torch.tensor([1.0, 0.0, float("nan"), 0.0])
    group = torch.tensor([0, 0, 0, 0])
    valid = torch.tensor([True, True, False, True])
    got = group_relative_advantages(rewards, group, valid=valid)
    want = group_relative_advantages(rewards[valid], group[valid])
    assert got[2] == 0.0
    torch.testing.assert_close(got[valid], want)
    # a group left with one valid member gets 0
    only = torch.tensor([True, False, False, False])
    assert group_relative_advantages(rewards, group, valid=only).tolist() == [0.0] * 4


def test_permutation_equivariance():
    rewards, group = _batch(3, 40, 5, binary=False)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    relabel = {int(v): 7 * int(v) + 3 for v in group.unique()}
    group2 = torch.tensor([relabel[int(v)] for v in group[perm]])
    a = group_relative_advantages(rewards, group)
    b = group_relative_advantages(rewards[perm], group2)
    torch.testing.assert_close(b, a[perm])


@pytest.mark.parametrize(
    ("dtype", "out"),
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.int64, torch.float32),
        (torch.bool, torch.float32),
    ],
)
def test_dtypes(dtype, out):
    rewards = torch.tensor([1, 0, 0, 1, 1, 0]).to(dtype)
    group = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)
    got = group_relative_advantages(rewards, group)
    assert got.dtype == out
    want = group_relative_advantages(torch.tensor([1.0, 0, 0, 1, 1, 0], dtype=torch.float64), group)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_empty():
    got = group_relative_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert got.shape == (0,) and got.dtype == torch.float32


def test_nan_reward_raises():
    with pytest.raises(ValueError, match=r"`rewards` must be finite"):
        group_relative_advantages(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]), validate_args=True)
    with pytest.raises(ValueError, match=r"`rewards` must be finite"):
        group_relative_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), validate_args=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(rewards=torch.zeros(3), group=torch.zeros(4, dtype=torch.int64)),
            ValueError,
            r"`group` must have the same shape as `rewards` \(3,\), got \(4,\)",
        ),
        (
            dict(rewards=torch.zeros(3, 1), group=torch.zeros(3, dtype=torch.int64)),
            ValueError,
            r"`rewards` must have 1 dimensions",
        ),
        (
            dict(rewards=torch.zeros(3), group=torch.zeros(3)),
            TypeError,
            r"`group` must have an int dtype",
        ),
        (
            dict(
                rewards=torch.zeros(3, dtype=torch.complex64),
                group=torch.zeros(3, dtype=torch.int64),
            ),
            TypeError,
            r"`rewards` must have a",
        ),
        (
            dict(rewards=[1.0, 0.0], group=torch.zeros(2, dtype=torch.int64)),
            TypeError,
            r"`rewards` must be a torch.Tensor",
        ),
        (
            dict(
                rewards=torch.zeros(3), group=torch.zeros(3, dtype=torch.int64), valid=torch.ones(3)
            ),
            TypeError,
            r"`valid` must have a bool dtype",
        ),
        (
            dict(
                rewards=torch.zeros(3),
                group=torch.zeros(3, dtype=torch.int64),
                valid=torch.ones(2, dtype=torch.bool),
            ),
            ValueError,
            r"`valid` must have the same shape as `rewards` \(3,\), got \(2,\)",
        ),
        (
            dict(rewards=torch.zeros(3), group=torch.zeros(3, dtype=torch.int64), eps=-1.0),
            ValueError,
            r"`eps` must be >= 0",
        ),
        (
            dict(rewards=torch.zeros(3), group=torch.zeros(3, dtype=torch.int64), eps=float("nan")),
            ValueError,
            r"`eps` must be finite",
        ),
    ],
)
def test_errors(kwargs, error, match):
    # the library's own checks, without the run-time jaxtyping wrapper the test hook may add
    raw = getattr(group_relative_advantages, "__wrapped__", group_relative_advantages)
    with pytest.raises(error, match=match):
        raw(**kwargs)


def test_no_python_loop_over_groups_scales():
    # Many singleton-ish groups: result still matches the oracle (segment reductions).
    rng = np.random.default_rng(0)
    group = torch.from_numpy(rng.integers(0, 500, 2000))
    rewards = torch.from_numpy(rng.random(2000))
    got = group_relative_advantages(rewards, group)
    want = ref.group_relative_advantages(rewards.tolist(), group.tolist())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
