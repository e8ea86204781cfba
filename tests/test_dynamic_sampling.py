"""Tests for chunkmask.baselines: a loop reference, the advantage link, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkmask.advantages import group_relative_advantages
from chunkmask.baselines._dynamic_sampling import dynamic_sampling_mask


def reference(success, group, low, high, valid):
    keep = []
    for i in range(len(success)):
        members = [j for j in range(len(success)) if group[j] == group[i] and valid[j]]
        rate = sum(float(success[j]) for j in members) / len(members) if members else -1.0
        keep.append(bool(valid[i]) and members != [] and low - 1e-12 <= rate <= high + 1e-12)
    return keep


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(0, 24),
    bounds=st.sampled_from([(0.1, 0.9), (0.0, 1.0), (0.25, 0.5), (0.5, 0.5)]),
    reward=st.sampled_from(["bool", "float"]),
)
def test_matches_the_loop_reference(seed, n, bounds, reward):
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(-3, 4, (n,), generator=g) * 11
    success = torch.rand(n, generator=g) < 0.5
    if reward == "float":
        success = torch.rand(n, generator=g).round(decimals=1)
    valid = torch.rand(n, generator=g) < 0.8
    got = dynamic_sampling_mask(success, group, low=bounds[0], high=bounds[1], valid=valid)
    assert got.tolist() == reference(success.tolist(), group.tolist(), *bounds, valid.tolist())


def test_default_bounds_keep_exactly_the_groups_with_a_gradient():
    g = torch.Generator().manual_seed(0)
    group = torch.arange(40) // 8  # 5 groups of 8
    success = torch.rand(40, generator=g) < torch.tensor([0.0, 1.0, 0.5, 0.2, 0.9]).repeat_interleave(8)
    keep = dynamic_sampling_mask(success, group)
    adv = group_relative_advantages(success.float(), group)
    informative = torch.zeros(40, dtype=torch.bool).index_fill_(
        0, torch.nonzero(adv != 0).flatten(), True
    )
    per_group_informative = informative.view(5, 8).any(1).repeat_interleave(8)
    assert torch.equal(keep, per_group_informative)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(success=torch.ones(3), group=torch.zeros(3)), TypeError, r"`group` must have an int"),
        (dict(success=torch.ones(3), group=torch.zeros(2, dtype=torch.int64)), ValueError,
         r"`group` must have the same shape as `success`"),
        (dict(success=torch.ones(3), group=torch.zeros(3, dtype=torch.int64), low=0.6, high=0.5),
         ValueError, r"`high` must lie in \[0.6, 1.0\]"),
        (dict(success=torch.ones(3), group=torch.zeros(3, dtype=torch.int64), low=-0.1), ValueError,
         r"`low` must lie in"),
        (dict(success=torch.tensor([1.0, float("nan"), 0.0]), group=torch.zeros(3, dtype=torch.int64)),
         ValueError, r"`success` must be finite"),
        (dict(success=torch.ones(3), group=torch.zeros(3, dtype=torch.int64), valid=torch.ones(3)),
         TypeError, r"`valid` must have a bool"),
        (dict(success="x", group=torch.zeros(3, dtype=torch.int64)), TypeError,
         r"`success` must be a torch.Tensor"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(dynamic_sampling_mask, "__wrapped__", dynamic_sampling_mask)(
            **{"validate_args": True, **kwargs}
        )
