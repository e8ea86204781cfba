"""Tests for the competing selective-update rules: PODS down-sampling and high-entropy tokens."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkmask.baselines._rollout_downsampling import max_variance_downsample
from chunkmask.baselines._token_selection import high_entropy_token_mask


def variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 10_000),
    groups=st.integers(1, 4),
    size=st.integers(1, 8),
    m=st.integers(1, 6),
    binary=st.booleans(),
)
def test_pods_matches_brute_force(seed, groups, size, m, binary):
    g = torch.Generator().manual_seed(seed)
    n = groups * size
    rewards = (torch.rand(n, generator=g) < 0.5).double() if binary else torch.rand(n, generator=g, dtype=torch.float64).round(decimals=1)
    labels = torch.randperm(n, generator=g) % groups * 13
    keep = max_variance_downsample(rewards, labels, m)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten().tolist()
        kept = [i for i in members if keep[i]]
        values = rewards.tolist()
        if len(members) <= m:
            assert kept == members
            continue
        assert len(kept) == m
        best = max(variance([values[i] for i in c]) for c in itertools.combinations(members, m))
        assert variance([values[i] for i in kept]) == pytest.approx(best, abs=1e-12)


def test_pods_keeps_both_outcomes_of_a_binary_group():
    rewards = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    keep = max_variance_downsample(rewards, torch.zeros(8, dtype=torch.long), 4)
    assert keep.sum() == 4 and rewards[keep].sum() == 2  # two successes, two failures


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 10_000), fraction=st.sampled_from([0.05, 0.2, 0.5, 1.0]))
def test_entropy_mask_keeps_the_top_fraction(seed, fraction):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(4, 9, generator=g).round(decimals=1)  # ties
    mask = torch.rand(4, 9, generator=g) < 0.7
    keep = high_entropy_token_mask(h, mask, fraction=fraction)
    count = int(mask.sum())
    want = -(-count * fraction // 1) if count else 0
    assert int(keep.sum()) == int(torch.ceil(torch.tensor(count * fraction)).item()) == want
    assert not (keep & ~mask).any()
    if keep.any() and (mask & ~keep).any():
        assert h[keep].min() >= h[mask & ~keep].max()


def test_entropy_mask_degenerate_inputs():
    h = torch.tensor([float("nan"), 1.0])
    assert high_entropy_token_mask(h, torch.tensor([False, True])).tolist() == [False, True]
    assert high_entropy_token_mask(torch.zeros(0)).tolist() == []
    assert not high_entropy_token_mask(torch.ones(3), torch.zeros(3, dtype=torch.bool)).any()
    bf16 = high_entropy_token_mask(torch.tensor([0.5, 2.0, 1.0]).bfloat16(), fraction=0.3)
    assert bf16.tolist() == [False, True, False]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: max_variance_downsample(torch.ones(3), torch.zeros(3), 2), TypeError,
         r"`group` must have an int"),
        (lambda: max_variance_downsample(torch.ones(3), torch.zeros(3, dtype=torch.long), 0),
         ValueError, r"`m` must be > 0"),
        (lambda: max_variance_downsample(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long), 1),
         ValueError, r"`rewards` must be finite"),
        (lambda: max_variance_downsample(torch.ones(3), torch.zeros(2, dtype=torch.long), 1),
         ValueError, r"`group` must have the same shape as `rewards`"),
        (lambda: high_entropy_token_mask(torch.ones(3), fraction=0.0), ValueError,
         r"`fraction` must lie in \(0.0, 1.0\]"),
        (lambda: high_entropy_token_mask(torch.ones(3), torch.ones(3)), TypeError,
         r"`mask` must have a bool"),
        (lambda: high_entropy_token_mask(torch.tensor([float("inf")]), validate_args=True),
         ValueError,
         r"`entropy` must be finite"),
        (lambda: high_entropy_token_mask(torch.ones(3, dtype=torch.long)), TypeError,
         r"`entropy` must have a float"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
