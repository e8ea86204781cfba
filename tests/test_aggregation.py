"""Tests for chunkmask.aggregation: verl 0.9.1 parity, data-parallel invariance, normalisers, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _reference import verl
from chunkmask.aggregation import (
    AGGREGATION_MODES,
    LossNormalizers,
    aggregate_loss,
    loss_normalizers,
)
from chunkmask.batch._selection import Selection

MODES = list(AGGREGATION_MODES)
SEQ_MODES = [m for m in MODES if m.startswith("seq")]
F64 = torch.float64


def unchecked(fn):
    """The function without the run-time jaxtyping wrapper the test hook may add."""
    return getattr(fn, "__wrapped__", fn)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def random_batch(seed, rows=7, tokens=9, p=0.6, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(rows, tokens, generator=g, dtype=F64)
    mask = torch.rand(rows, tokens, generator=g) < p
    if empty_rows:
        mask[1] = False  # verl 0.9 leaves empty rows out of every seq mode, as chunkmask does
    else:
        mask[:, 0] = True
    return loss, mask


def global_counts(mask):
    return int(mask.sum()), int((mask.sum(-1) > 0).sum())


# ----------------------------------------------------------------------------- verl parity


def test_modes_are_verls_five():
    assert set(MODES) == {
        "token-mean",
        "token-sum",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("empty_rows", [False, True])
def test_matches_verl_on_one_rank(mode, empty_rows):
    loss, mask = random_batch(2 + empty_rows, empty_rows=empty_rows)
    close(aggregate_loss(loss, mask, mode), verl.agg_loss(loss, mask, mode))
    close(aggregate_loss(loss, None, mode), verl.agg_loss(loss, torch.ones(7, 9), mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dp_size", [2, 3, 8])
def test_matches_verl_with_dp_size_and_explicit_normalisers(mode, dp_size):
    loss, mask = random_batch(10 + dp_size)
    kwargs = dict(batch_num_tokens=37, global_batch_size=11, loss_scale_factor=64)
    want = verl.agg_loss(loss, mask, mode, dp_size, **kwargs)
    close(aggregate_loss(loss, mask, mode, dp_size=dp_size, **kwargs), want)
    # the normalisers as 0-d tensors (no host sync) give the same value
    tensors = {k: torch.tensor(v) for k, v in kwargs.items()}
    close(aggregate_loss(loss, mask, mode, dp_size=dp_size, **tensors), want)


@pytest.mark.parametrize("mode", MODES)
def test_defaults_are_this_ranks_counts(mode):
    loss, mask = random_batch(5)
    tokens, seqs = global_counts(mask)
    explicit = aggregate_loss(
        loss, mask, mode, batch_num_tokens=tokens, global_batch_size=seqs, loss_scale_factor=9
    )
    close(aggregate_loss(loss, mask, mode), explicit)


def test_sum_norm_divides_by_sequences_and_horizon():
    # 80 trajectories of sum 1 over a horizon of 10: verl 0.9 gives 1 / 10, not 80 / 10.
    loss = torch.zeros(80, 10, dtype=F64)
    loss[:, 0] = 1.0
    assert aggregate_loss(loss, None, "seq-mean-token-sum-norm").item() == pytest.approx(0.1)
    assert aggregate_loss(loss, None, "token-sum").item() == pytest.approx(80.0)


# ----------------------------------------------------------------------------- data parallelism


def shard(mask_rows, world, g):
    """A random, uneven split of the rows into `world` non-empty shards."""
    rows = mask_rows.shape[0]
    cuts = sorted(torch.randperm(rows - 1, generator=g)[: world - 1].add(1).tolist())
    order = torch.randperm(rows, generator=g)
    bounds = [0, *cuts, rows]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 10_000),
    world=st.integers(2, 4),
    mode=st.sampled_from(MODES),
    rows=st.integers(4, 12),
)
def test_rank_average_equals_union_batch(seed, world, mode, rows):
    """DDP's average of per-rank losses and gradients equals the union batch's, in every mode."""
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(rows, 6, generator=g, dtype=F64, requires_grad=True)
    mask = torch.rand(rows, 6, generator=g) < 0.5
    tokens, seqs = global_counts(mask)
    union = aggregate_loss(loss, mask, mode, loss_scale_factor=6)
    (union_grad,) = torch.autograd.grad(union, loss)
    ranks = torch.zeros((), dtype=F64)
    for part in shard(mask, world, g):
        ranks = ranks + aggregate_loss(
            loss[part],
            mask[part],
            mode,
            dp_size=world,
            batch_num_tokens=tokens,
            global_batch_size=seqs,
            loss_scale_factor=6,
        )
    averaged = ranks / world
    (rank_grad,) = torch.autograd.grad(averaged, loss)
    if tokens == 0:
        assert union.item() == 0.0 and averaged.item() == 0.0
    else:
        close(averaged, union)
    close(rank_grad, union_grad)


@pytest.mark.parametrize("mode", ["token-mean", *SEQ_MODES])
def test_per_rank_defaults_are_refused_under_data_parallelism(mode):
    loss, mask = random_batch(1)
    name = "batch_num_tokens" if mode == "token-mean" else "global_batch_size"
    with pytest.raises(ValueError, match=rf"`{name}` .* required when `dp_size` > 1"):
        unchecked(aggregate_loss)(loss, mask, mode, dp_size=2)
    # token-sum needs no normaliser
    close(aggregate_loss(loss, mask, "token-sum", dp_size=2), 2 * (loss * mask).sum())


def test_per_rank_mean_is_not_the_union_mean():
    """The failure the global normalisers fix: two ranks with 1 and 3 tokens."""
    loss = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    union = aggregate_loss(loss, mask, "token-mean").item()
    naive = 0.5 * sum(aggregate_loss(loss[i : i + 1], mask[i : i + 1]).item() for i in range(2))
    fixed = 0.5 * sum(
        aggregate_loss(loss[i : i + 1], mask[i : i + 1], dp_size=2, batch_num_tokens=4).item()
        for i in range(2)
    )
    assert union == pytest.approx(7 / 4)
    assert naive == pytest.approx(2.5)
    assert fixed == pytest.approx(union)


# ----------------------------------------------------------------------------- segments, weights


@pytest.mark.parametrize("mode", MODES)
def test_segments_equal_concatenated_rows(mode):
    g = torch.Generator().manual_seed(3)
    rows, tokens, seqs = 10, 4, 4
    loss = torch.randn(rows, tokens, generator=g, dtype=F64)
    mask = torch.rand(rows, tokens, generator=g) < 0.7
    segment = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 0])  # sequence 1 is empty
    weights = torch.rand(rows, generator=g, dtype=F64) + 0.5
    width = 5 * tokens
    dense = torch.zeros(seqs, width, dtype=F64)
    dense_mask = torch.zeros(seqs, width, dtype=torch.bool)
    fill = [0] * seqs
    for r in range(rows):
        s = int(segment[r])
        dense[s, fill[s] : fill[s] + tokens] = loss[r] * weights[r]
        dense_mask[s, fill[s] : fill[s] + tokens] = mask[r]
        fill[s] += tokens
    got = aggregate_loss(
        loss,
        mask,
        mode,
        segment=segment,
        num_segments=seqs,
        weights=weights,
        loss_scale_factor=width,
    )
    close(got, aggregate_loss(dense, dense_mask, mode))
    close(got, verl.agg_loss(dense, dense_mask, mode))


def test_seq_num_tokens_override_and_zero_divisor():
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    got = aggregate_loss(
        loss, None, "seq-mean-token-mean", seq_num_tokens=torch.tensor([3.0, 0.0], dtype=F64)
    )
    assert got.item() == pytest.approx((1.0 + 0.0) / 2)  # sequence 1 divides by 0: it gives 0
    assert aggregate_loss(loss, None, "token-mean", batch_num_tokens=0).item() == 0.0


def test_empty_sequences_do_not_count():
    loss = torch.tensor([[2.0, 4.0], [100.0, 100.0]], dtype=F64)
    mask = torch.tensor([[True, True], [False, False]])
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == 3.0
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == 6.0
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == 3.0
    assert aggregate_loss(loss, mask, "token-mean").item() == 3.0
    assert aggregate_loss(loss, mask, "token-sum").item() == 6.0


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_is_zero_with_finite_grads(mode):
    loss = torch.full((3, 4), float("nan"), dtype=F64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = aggregate_loss(loss, mask, mode, weights=torch.full((3,), float("nan"), dtype=F64))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(3, 4, dtype=F64))
    assert aggregate_loss(torch.zeros(0, 4), None, mode).item() == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_accumulates_in_float32(mode):
    loss, mask = random_batch(4)
    got = aggregate_loss(loss.to(torch.bfloat16), mask, mode)
    assert got.dtype == torch.float32
    want = aggregate_loss(loss.to(torch.bfloat16).double(), mask, mode)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    g = torch.Generator().manual_seed(12)
    loss = torch.randn(5, 3, generator=g, dtype=F64).requires_grad_(True)
    weights = (torch.rand(5, generator=g, dtype=F64) + 0.5).requires_grad_(True)
    mask = torch.rand(5, 3, generator=g) < 0.7
    segment = torch.tensor([0, 0, 1, 2, 2])
    assert torch.autograd.gradcheck(
        lambda x, w: aggregate_loss(
            x,
            mask,
            mode,
            segment=segment,
            num_segments=4,
            weights=w,
            loss_scale_factor=6,
        ),
        (loss, weights),
    )


# ----------------------------------------------------------------------------- loss_normalizers


def test_normalizers_of_a_selection():
    chosen = torch.tensor([[True, False, True], [False, False, False], [True, True, False]])
    valid = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    sel = Selection.from_mask(chosen, valid)
    token_mask = torch.ones(4, 5, dtype=torch.bool)
    token_mask[0, 3:] = False  # trajectory 0's first selected chunk has 3 valid tokens of 5
    token_mask[3] = False  # trajectory 2's second chunk has none
    norms = loss_normalizers(sel, token_mask)
    assert isinstance(norms, LossNormalizers)
    assert (norms.dp_size, int(norms.batch_num_tokens), int(norms.global_batch_size)) == (1, 13, 2)
    # one value per chunk
    per_chunk = loss_normalizers(sel, token_mask.any(-1))
    assert (int(per_chunk.batch_num_tokens), int(per_chunk.global_batch_size)) == (3, 2)
    # no mask: tokens_per_chunk per selected chunk
    plain = loss_normalizers(sel, tokens_per_chunk=5)
    assert (int(plain.batch_num_tokens), int(plain.global_batch_size)) == (20, 2)
    # Horvitz-Thompson: the full lengths, K * sum T_i, and trajectories with T_i > 0
    ht = loss_normalizers(sel, token_mask, estimator="horvitz_thompson")
    assert (int(ht.batch_num_tokens), int(ht.global_batch_size)) == (5 * 6, 3)


def test_normalizers_without_a_selection_are_verls_counts():
    loss, mask = random_batch(6)
    norms = loss_normalizers(mask=mask)
    assert (int(norms.batch_num_tokens), int(norms.global_batch_size)) == global_counts(mask)
    for mode in MODES:
        close(aggregate_loss(loss, mask, mode, **norms._asdict()), aggregate_loss(loss, mask, mode))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(), ValueError, r"`mask` is required when `selection` is None"),
        (dict(selection="sel"), TypeError, r"`selection` must be a Selection, got str"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, r"`mask` must have 2 dimensions"),
        (dict(mask=torch.ones(2, 3)), TypeError, r"`mask` must have a bool dtype"),
        (
            dict(mask=torch.ones(2, 3, dtype=torch.bool), estimator="ht"),
            ValueError,
            r"`estimator` must be one of",
        ),
        (
            dict(mask=torch.ones(2, 3, dtype=torch.bool), tokens_per_chunk=0),
            ValueError,
            r"`tokens_per_chunk` must be > 0",
        ),
        (
            dict(mask=torch.ones(2, 3, dtype=torch.bool), process_group="world"),
            TypeError,
            r"`process_group` must be a torch.distributed.ProcessGroup or None, got str",
        ),
    ],
)
def test_normalizer_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        unchecked(loss_normalizers)(**kwargs)


# ----------------------------------------------------------------------------- errors

Z = torch.zeros(2, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(loss=torch.zeros(3)), ValueError, r"`loss` must have 2 dimensions"),
        (dict(loss=torch.zeros(2, 3, dtype=torch.int64)), TypeError, r"`loss` must have a float"),
        (dict(loss=Z, mode="mean"), ValueError, r"`mode` must be one of"),
        (dict(loss=Z, mask=torch.ones(2, 3)), TypeError, r"`mask` must have a bool"),
        (
            dict(loss=Z, mask=torch.ones(2, 2, dtype=torch.bool)),
            ValueError,
            r"`mask` must have the same shape as `loss` \(2, 3\), got \(2, 2\)",
        ),
        (dict(loss=Z, dp_size=0), ValueError, r"`dp_size` must be > 0, got 0"),
        (dict(loss=Z, dp_size=2.0), TypeError, r"`dp_size` must be an int, got float"),
        (dict(loss=Z, dp_size=True), TypeError, r"`dp_size` must be an int, got bool"),
        (
            dict(loss=Z, segment=torch.zeros(3, dtype=torch.int64), num_segments=1),
            ValueError,
            r"`segment` must have shape \(2,\), got \(3,\)",
        ),
        (
            dict(loss=Z, segment=torch.zeros(2), num_segments=1),
            TypeError,
            r"`segment` must have an int dtype",
        ),
        (
            dict(loss=Z, segment=torch.zeros(2, dtype=torch.int64)),
            ValueError,
            r"`num_segments` is required with `segment`",
        ),
        (dict(loss=Z, num_segments=2), ValueError, r"`num_segments` is only used with `segment`"),
        (
            dict(loss=Z, segment=torch.zeros(2, dtype=torch.int64), num_segments=-1),
            ValueError,
            r"`num_segments` must be >= 0, got -1",
        ),
        (
            dict(loss=Z, segment=torch.tensor([0, 2]), num_segments=2),
            ValueError,
            r"`segment` must lie in \[0, 2\) \(`num_segments`=2\), got 1 value\(s\) outside it",
        ),
        (
            dict(loss=Z, segment=torch.tensor([0, -1]), num_segments=2),
            ValueError,
            r"`segment` must lie in \[0, 2\)",
        ),
        (
            dict(
                loss=Z,
                mode="seq-mean-token-sum-norm",
                segment=torch.tensor([0, 0]),
                num_segments=1,
            ),
            ValueError,
            r"`loss_scale_factor` is required with `segment`",
        ),
        (dict(loss=Z, batch_num_tokens=-1.0), ValueError, r"`batch_num_tokens` must be >= 0"),
        (
            dict(loss=Z, batch_num_tokens=torch.tensor(-3)),
            ValueError,
            r"`batch_num_tokens` must be finite and non-negative, got 1 bad value\(s\) \(first: -3.0\)",
        ),
        (
            dict(loss=Z, batch_num_tokens=torch.tensor(float("nan"))),
            ValueError,
            r"`batch_num_tokens` must be finite",
        ),
        (
            dict(loss=Z, batch_num_tokens=torch.ones(2)),
            ValueError,
            r"`batch_num_tokens` must have 0 dimensions",
        ),
        (dict(loss=Z, batch_num_tokens="4"), TypeError, r"`batch_num_tokens` must be a real"),
        (dict(loss=Z, batch_num_tokens=True), TypeError, r"`batch_num_tokens` must be a real"),
        (
            dict(loss=Z, mode="seq-mean-token-sum", global_batch_size=float("inf")),
            ValueError,
            r"`global_batch_size` must be finite",
        ),
        (
            dict(loss=Z, mode="seq-mean-token-sum-norm", loss_scale_factor=-2),
            ValueError,
            r"`loss_scale_factor` must be >= 0",
        ),
        (
            dict(loss=Z, mode="seq-mean-token-mean", seq_num_tokens=torch.ones(3)),
            ValueError,
            r"`seq_num_tokens` must have shape \(2,\), got \(3,\)",
        ),
        (
            dict(loss=Z, mode="seq-mean-token-mean", seq_num_tokens=torch.tensor([1.0, -1.0])),
            ValueError,
            r"`seq_num_tokens` must be finite and non-negative, got 1 bad",
        ),
        (
            dict(loss=Z, weights=torch.ones(3)),
            ValueError,
            r"`weights` must have shape \(2,\) or \(2, 3\) \(that of `loss`\), got \(3,\)",
        ),
        (
            dict(loss=Z, weights=torch.tensor([1.0, -0.5])),
            ValueError,
            r"`weights` must be finite and non-negative, got 3 bad value\(s\) \(first: -0.5\)",
        ),
        (
            dict(loss=Z, weights=torch.tensor([1.0, float("nan")])),
            ValueError,
            r"`weights` must be finite and non-negative, got 3 bad value\(s\) \(first: nan\)",
        ),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        unchecked(aggregate_loss)(**{"validate_args": True, **kwargs})
