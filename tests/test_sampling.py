import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import chi2_contingency, chisquare

from _reference.sampling import (
    inclusion_probabilities_enum,
    ordered_outcome_probabilities,
    set_probabilities,
    topk_reference,
)
from chunkmask.batch._selection import Selection
from chunkmask.pcm._inclusion import inclusion_probabilities
from chunkmask.pcm._sampling import (
    plackett_luce_sample,
    stratified_sample,
    top_phase_sample,
    topk_sample,
    uniform_sample,
)

ALPHA = 1e-6
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- helpers


def set_codes(sel: Selection) -> torch.Tensor:
    """Encode each row's selected set as a bitmask integer."""
    dense = sel.chunk_mask().to(torch.int64)
    return (dense * (2 ** torch.arange(dense.shape[1], device=dense.device))).sum(1).cpu()


def set_chisquare(codes: torch.Tensor, probs: dict[tuple[int, ...], float]) -> float:
    """Chi-square p-value of observed set codes against exact set probabilities."""
    keys = sorted(probs)
    index = {sum(1 << i for i in key): j for j, key in enumerate(keys)}
    observed = np.zeros(len(keys))
    for code, count in zip(*np.unique(codes.numpy(), return_counts=True), strict=True):
        assert int(code) in index, f"drew an impossible set {int(code):b}"
        observed[index[int(code)]] = count
    expected = np.array([probs[key] for key in keys])
    expected = expected / expected.sum() * observed.sum()
    return float(chisquare(observed, expected).pvalue)


def check_selection(sel: Selection, allowed: torch.Tensor, valid: torch.Tensor, k: int) -> None:
    """Invariants every selector shares; `allowed` marks the chunks that may be drawn."""
    traj, n = valid.shape
    assert isinstance(sel, Selection)
    assert sel.indices.shape == (traj, k) and sel.indices.dtype == torch.int64
    assert sel.mask.shape == (traj, k) and sel.mask.dtype == torch.bool
    assert sel.chunks_total == n
    assert torch.equal(sel.num_chunks, valid.sum(1))
    counts = sel.mask.sum(1)
    # The mask is a prefix of Trues.
    assert torch.equal(sel.mask, torch.arange(k) < counts[:, None])
    assert (sel.indices[~sel.mask] == 0).all()
    for i in range(traj):
        picked = sel.indices[i, : int(counts[i])]
        assert (picked[1:] > picked[:-1]).all(), "indices must be strictly ascending (distinct)"
        assert allowed[i, picked].all(), "drew padding or a zero-weight chunk"
    assert torch.equal(counts, torch.clamp(allowed.sum(1), max=k))


@st.composite
def weighted_batches(draw, max_traj=4, max_n=9):
    traj = draw(st.integers(1, max_traj))
    n = draw(st.integers(1, max_n))
    values = st.sampled_from([0.0, 0.0, 1e-3, 0.1, 0.5, 1.0, 2.0, 7.5])
    w = draw(arrays(np.float64, (traj, n), elements=values))
    valid = draw(arrays(np.bool_, (traj, n)))
    k = draw(st.integers(1, n + 3))
    return torch.from_numpy(w), torch.from_numpy(valid), k


# ----------------------------------------------------------------------------- Plackett-Luce


def test_plackett_luce_set_distribution_matches_enumeration():
    weights = [0.1, 0.5, 1.0, 2.0, 0.3]
    draws = 200_000
    gen = torch.Generator().manual_seed(1234)
    w = torch.tensor(weights).expand(draws, 5)
    sel = plackett_luce_sample(w, 3, generator=gen)
    assert len(ordered_outcome_probabilities(weights, 3)) == 60
    assert set_chisquare(set_codes(sel), set_probabilities(weights, 3)) > ALPHA


def test_chi_square_catches_gumbel_added_to_probabilities():
    weights = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3])
    draws = 200_000
    gen = torch.Generator().manual_seed(1234)
    u = torch.rand(draws, 5, generator=gen).clamp_min(torch.finfo(torch.float32).tiny)
    keys = weights / weights.sum() - torch.log(-torch.log(u))  # the bug: no log on weights
    picks = torch.topk(keys, 3, dim=1).indices
    dense = torch.zeros(draws, 5, dtype=torch.bool).scatter(1, picks, True)
    buggy = Selection.from_mask(dense)
    p = set_chisquare(set_codes(buggy), set_probabilities(weights.tolist(), 3))
    assert p < ALPHA


def test_plackett_luce_with_padding_zero_weights_and_bfloat16():
    # Chunk 1 has zero weight and chunk 5 is padding: only {0, 2, 3, 4} can be drawn.
    weights = [0.125, 0.0, 1.0, 2.0, 0.25, 5.0]
    draws = 100_000
    w = torch.tensor(weights, dtype=torch.bfloat16).expand(draws, 6)
    valid = torch.tensor([True] * 5 + [False]).expand(draws, 6)
    sel = plackett_luce_sample(w, 3, valid=valid, generator=torch.Generator().manual_seed(7))
    effective = weights[:5] + [0.0]
    assert set_chisquare(set_codes(sel), set_probabilities(effective, 3)) > ALPHA
    assert (sel.num_chunks == 5).all()


def test_plackett_luce_takes_all_when_k_exceeds_available_and_k_above_n():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    sel = plackett_luce_sample(w, 6, generator=torch.Generator().manual_seed(0))
    assert sel.indices.tolist() == [[1, 3, 0, 0, 0, 0], [0, 1, 2, 3, 0, 0]]
    assert sel.mask.tolist() == [[True, True] + [False] * 4, [True] * 4 + [False] * 2]
    assert sel.num_chunks.tolist() == [4, 4] and sel.chunks_total == 4


@settings(deadline=None, max_examples=40)
@given(weighted_batches(), st.integers(0, 2**31 - 1))
def test_plackett_luce_invariants(batch, seed):
    w, valid, k = batch
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        sel = plackett_luce_sample(
            w.to(dtype), k, valid=valid, generator=torch.Generator().manual_seed(seed)
        )
        check_selection(sel, valid & (w.to(dtype) > 0), valid, k)


def test_uniform_draws_below_one_cannot_give_infinite_keys(monkeypatch):
    # A uniform draw of exactly 0 must not produce a -inf key (which would look like padding).
    real_rand = torch.rand

    def zero_rand(*args, **kwargs):
        return torch.zeros_like(real_rand(*args, **kwargs))

    monkeypatch.setattr(torch, "rand", zero_rand)
    sel = plackett_luce_sample(torch.ones(2, 4), 3)
    assert sel.mask.all()


def test_same_seed_same_selection_and_rows_do_not_interact():
    w = torch.rand(6, 20, generator=torch.Generator().manual_seed(0))
    a = plackett_luce_sample(w, 5, generator=torch.Generator().manual_seed(3))
    b = plackett_luce_sample(w, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.mask, b.mask)
    # Changing another row's weights leaves a row's draw unchanged for the same stream.
    w2 = w.clone()
    w2[1:] = torch.rand(5, 20, generator=torch.Generator().manual_seed(9))
    c = plackett_luce_sample(w2, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.indices[0], c.indices[0])
    d = plackett_luce_sample(w, 5, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a.indices, d.indices)


def test_rows_are_independent():
    # Adjacent rows of one call: the joint distribution of (row 2j, row 2j+1) factorises.
    pairs = 40_000
    w = torch.tensor([1.0, 2.0, 0.5, 3.0]).expand(2 * pairs, 4)
    sel = plackett_luce_sample(w, 2, generator=torch.Generator().manual_seed(11))
    codes = set_codes(sel).reshape(pairs, 2)
    _, first = torch.unique(codes[:, 0], return_inverse=True)
    _, second = torch.unique(codes[:, 1], return_inverse=True)
    table = torch.zeros(int(first.max()) + 1, int(second.max()) + 1)
    table.index_put_((first, second), torch.ones(pairs), accumulate=True)
    assert chi2_contingency(table.numpy()).pvalue > ALPHA


def test_plackett_luce_compiles_fullgraph():
    # `aot_eager` traces the whole function with TorchDynamo (fullgraph) and AOTAutograd, which is
    # what fullgraph compatibility means; Inductor code generation would add ~20 s of C++
    # compilation without testing anything of ours. It also keeps eager RNG semantics, so the
    # compiled draw must equal the eager one for the same seed.
    torch._dynamo.reset()
    w = torch.rand(16, 12, generator=torch.Generator().manual_seed(0))
    w[:, :3] = 0.0
    valid = torch.ones(16, 12, dtype=torch.bool)
    valid[:, -2:] = False

    def draw(w, valid):
        sel = plackett_luce_sample(w, 5, valid=valid, validate_args=False)
        return sel.indices, sel.mask, sel.num_chunks

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    indices, mask, num_chunks = compiled(w, valid)
    sel = Selection(indices, mask, num_chunks, 12)
    check_selection(sel, valid & (w > 0), valid, 5)
    torch.manual_seed(0)
    again = compiled(w, valid)
    assert torch.equal(indices, again[0])
    torch.manual_seed(0)
    eager = draw(w, valid)
    assert torch.equal(indices, eager[0]) and torch.equal(mask, eager[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_with_cuda_weights():
    w = torch.rand(4, 10, device="cuda")
    a = plackett_luce_sample(w, 3, generator=torch.Generator().manual_seed(2))
    b = plackett_luce_sample(w.cpu(), 3, generator=torch.Generator().manual_seed(2))
    assert a.indices.device.type == "cuda"
    assert torch.equal(a.indices.cpu(), b.indices)


# ----------------------------------------------------------------------------- inclusion


def test_inclusion_probabilities_match_enumeration():
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        for k in range(1, n + 2):
            w = rng.uniform(0.1, 1.0, size=(6, n))
            w[rng.random((6, n)) < 0.2] = 0.0
            valid = rng.random((6, n)) > 0.15
            got = inclusion_probabilities(torch.from_numpy(w), k, valid=torch.from_numpy(valid))
            assert got.dtype == torch.float64
            for i in range(6):
                effective = [w[i, t] if valid[i, t] else 0.0 for t in range(n)]
                want = torch.tensor(inclusion_probabilities_enum(effective, k), dtype=torch.float64)
                torch.testing.assert_close(got[i], want, atol=1e-9, rtol=0)


def test_inclusion_probabilities_wide_weight_range():
    # Weights over four orders of magnitude: the complementary form keeps the error small.
    w = [1e-3, 2e-3, 0.05, 0.4, 1.0, 3.0, 9.0]
    for k in (1, 2, 3, 5):
        got = inclusion_probabilities(torch.tensor([w], dtype=torch.float64), k)[0]
        want = torch.tensor(inclusion_probabilities_enum(w, k), dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6)


def test_inclusion_probabilities_match_monte_carlo():
    n, k, draws = 64, 12, 20_000
    gen = torch.Generator().manual_seed(21)
    w = 0.1 + torch.rand(n, generator=gen, dtype=torch.float64) ** 3
    pi = inclusion_probabilities(w[None], k)[0]
    sel = plackett_luce_sample(w.expand(draws, n), k, generator=gen)
    freq = sel.chunk_mask().to(torch.float64).mean(0)
    z = (freq - pi) / torch.sqrt(pi * (1 - pi) / draws)
    assert z.abs().max() < 6.0  # Bonferroni over 64 items at alpha ~ 1e-6
    assert math.isclose(float(pi.sum()), k, abs_tol=1e-8)


def test_horvitz_thompson_total_is_unbiased():
    n, k, draws = 32, 6, 20_000
    gen = torch.Generator().manual_seed(5)
    w = 0.1 + torch.rand(n, generator=gen, dtype=torch.float64)
    y = 3.0 * w + torch.randn(n, generator=gen, dtype=torch.float64)
    pi = inclusion_probabilities(w[None], k)[0]
    sel = plackett_luce_sample(w.expand(draws, n), k, generator=gen)
    dense = sel.chunk_mask()
    estimate = torch.where(dense, y / pi, 0.0).sum(1)
    stderr = estimate.std() / math.sqrt(draws)
    assert abs(float(estimate.mean() - y.sum())) < 5.5 * float(stderr)


@settings(deadline=None, max_examples=30)
@given(weighted_batches(max_n=10))
def test_inclusion_probability_invariants(batch):
    w, valid, k = batch
    pi = inclusion_probabilities(w, k, valid=valid)
    usable = valid & (w > 0)
    assert ((pi >= 0) & (pi <= 1)).all()
    assert (pi[~usable] == 0).all()
    positive = usable.sum(1)
    torch.testing.assert_close(
        pi.sum(1), torch.clamp(positive, max=k).to(torch.float64), atol=1e-8, rtol=0
    )
    full = positive <= k
    assert (pi[full][usable[full]] == 1).all()
    # Permutation equivariance over trajectories and scale invariance of the weights.
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(inclusion_probabilities(w[perm], k, valid=valid[perm]), pi[perm])
    torch.testing.assert_close(
        inclusion_probabilities(3.0 * w, k, valid=valid), pi, atol=1e-9, rtol=0
    )


def test_inclusion_probabilities_accepts_low_precision():
    w = torch.tensor([[0.25, 0.5, 1.0, 0.0]], dtype=torch.bfloat16)
    pi = inclusion_probabilities(w, 2)
    want = torch.tensor(
        [inclusion_probabilities_enum([0.25, 0.5, 1.0, 0.0], 2)], dtype=torch.float64
    )
    torch.testing.assert_close(pi, want, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- stratified


def test_stratified_sample_counts_and_uniformity():
    draws = 60_000
    phases = torch.tensor([0, 0, 0, 0, 1, 1, 2, -1]).expand(draws, 8)
    sel = stratified_sample(
        phases, torch.tensor([2, 1, 3]), generator=torch.Generator().manual_seed(3)
    )
    # k is the requested total 6; phase 2 holds one chunk, so 2 + 1 + 1 = 4 are selected.
    assert sel.k == 6 and (sel.counts == 4).all() and (sel.num_chunks == 7).all()
    picked = torch.gather(phases, 1, sel.indices)
    assert ((picked == 0) & sel.mask).sum(1).eq(2).all()
    assert ((picked == 1) & sel.mask).sum(1).eq(1).all()
    assert ((picked == 2) & sel.mask).sum(1).eq(1).all()
    # Within phase 0, the 6 pairs are equally likely; within phase 1, both chunks.
    codes = set_codes(sel)
    pairs0 = {(a, b): 1 / 6 for a in range(4) for b in range(a + 1, 4)}
    assert set_chisquare(codes & 0b1111, pairs0) > ALPHA
    assert set_chisquare((codes >> 4) & 0b11, {(0,): 0.5, (1,): 0.5}) > ALPHA


@settings(deadline=None, max_examples=40)
@given(st.data())
def test_stratified_sample_invariants(data):
    traj = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 10))
    num_phases = data.draw(st.integers(1, 4))
    phases = torch.from_numpy(
        data.draw(arrays(np.int64, (traj, n), elements=st.integers(-1, num_phases - 1)))
    )
    shared = data.draw(st.booleans())
    shape = (num_phases,) if shared else (traj, num_phases)
    alloc = torch.from_numpy(data.draw(arrays(np.int64, shape, elements=st.integers(0, 4))))
    if int(alloc.expand(traj, num_phases).sum(1).max()) == 0:
        alloc = alloc + 1
    seed = data.draw(st.integers(0, 2**31 - 1))
    sel = stratified_sample(phases, alloc, generator=torch.Generator().manual_seed(seed))
    valid = phases >= 0
    full = alloc.expand(traj, num_phases)
    k = int(full.sum(1).max())
    assert sel.k == k
    dense = sel.chunk_mask()
    assert not (dense & ~valid).any()
    for c in range(num_phases):
        avail = ((phases == c) & valid).sum(1)
        assert torch.equal((dense & (phases == c)).sum(1), torch.minimum(avail, full[:, c]))
    counts = sel.mask.sum(1)
    assert torch.equal(sel.mask, torch.arange(k) < counts[:, None])
    assert torch.equal(sel.num_chunks, valid.sum(1))
    again = stratified_sample(phases, alloc, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again.indices, sel.indices)


# ----------------------------------------------------------------------------- baselines


def test_uniform_sample_is_uniform():
    draws = 60_000
    valid = torch.tensor([True, True, False, True, True, True]).expand(draws, 6)
    sel = uniform_sample(valid, 2, generator=torch.Generator().manual_seed(8))
    items = [0, 1, 3, 4, 5]
    probs = {(a, b): 0.1 for i, a in enumerate(items) for b in items[i + 1 :]}
    assert set_chisquare(set_codes(sel), probs) > ALPHA


@settings(deadline=None, max_examples=30)
@given(weighted_batches(), st.integers(0, 2**31 - 1))
def test_uniform_sample_invariants(batch, seed):
    _, valid, k = batch
    sel = uniform_sample(valid, k, generator=torch.Generator().manual_seed(seed))
    check_selection(sel, valid, valid, k)


def test_top_phase_sample_uses_only_the_best_present_phase():
    phases = torch.tensor([[0, 1, 1, 2, 2, 2, -1], [0, 0, 1, 1, 1, 1, 1], [3, 3, 0, 0, 0, 0, 0]])
    scores = torch.tensor([0.1, 0.3, 0.9, 0.9])
    sel = top_phase_sample(phases, scores, 2, generator=torch.Generator().manual_seed(1))
    picked = torch.gather(phases, 1, sel.indices)
    assert picked.tolist() == [[2, 2], [1, 1], [3, 3]]
    # Fewer chunks than k in the best phase: take them all, flag the rest (no top-up).
    sel = top_phase_sample(phases, scores, 4, generator=torch.Generator().manual_seed(1))
    assert sel.counts.tolist() == [3, 4, 2]
    assert sel.indices[2].tolist() == [0, 1, 0, 0]
    # Ties go to the lower phase id; per-trajectory scores; -inf ranks lowest.
    both = torch.tensor([[2, 3, 2, 3]])
    tied = top_phase_sample(both, torch.tensor([0.0, 0.0, 1.0, 1.0]), 4)
    assert tied.indices[0, : int(tied.counts[0])].tolist() == [0, 2]
    per_traj = torch.tensor(
        [[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [-math.inf, 0, 0, -math.inf]]
    )
    sel = top_phase_sample(phases, per_traj, 1, generator=torch.Generator().manual_seed(0))
    assert torch.gather(phases, 1, sel.indices).flatten().tolist() == [0, 0, 0]


def test_top_phase_sample_within_phase_uniform():
    draws = 40_000
    phases = torch.tensor([1, 0, 1, 1, 2]).expand(draws, 5)
    sel = top_phase_sample(
        phases, torch.tensor([0.0, 1.0, 0.5]), 2, generator=torch.Generator().manual_seed(4)
    )
    assert set_chisquare(set_codes(sel), {(0, 2): 1 / 3, (0, 3): 1 / 3, (2, 3): 1 / 3}) > ALPHA


@settings(deadline=None, max_examples=40)
@given(weighted_batches())
def test_topk_sample_matches_reference(batch):
    w, valid, k = batch
    scores = torch.round(w * 2)  # coarse values create ties
    sel = topk_sample(scores.to(torch.float32), k, valid=valid)
    check_selection(sel, valid, valid, k)
    for i in range(w.shape[0]):
        want = topk_reference(scores[i].tolist(), valid[i].tolist(), k)
        assert sel.indices[i, : len(want)].tolist() == want
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(1))
    permuted = topk_sample(scores[perm].to(torch.float32), k, valid=valid[perm])
    assert torch.equal(permuted.indices, sel.indices[perm])


def test_topk_sample_negative_infinity_beats_padding_and_bfloat16():
    scores = torch.tensor([[-math.inf, 1.0, 3.0, 2.0]], dtype=torch.bfloat16)
    valid = torch.tensor([[True, True, False, False]])
    sel = topk_sample(scores, 3, valid=valid)
    assert sel.indices.tolist() == [[0, 1, 0]] and sel.mask.tolist() == [[True, True, False]]


# ----------------------------------------------------------------------------- errors


def test_plackett_luce_errors():
    w = torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got 0"):
        plackett_luce_sample(w, 0)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got -2"):
        plackett_luce_sample(w, -2)
    with pytest.raises(TypeError, match=r"`budget` must be an int"):
        plackett_luce_sample(w, 2.0)
    with pytest.raises(TypeError, match=r"`weights` must have a float dtype"):
        plackett_luce_sample(torch.ones(2, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"`weights` must have 2 dimensions"):
        plackett_luce_sample(torch.ones(4), 2)
    with pytest.raises(ValueError, match=r"`valid` must have shape \(2, 4\)"):
        plackett_luce_sample(w, 2, valid=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"`valid` must have a bool dtype"):
        plackett_luce_sample(w, 2, valid=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"`weights` must be finite and non-negative.*1 bad"):
        plackett_luce_sample(torch.tensor([[1.0, -0.5, 1.0]]), 2, validate_args=True)
    with pytest.raises(ValueError, match=r"`weights` must be finite and non-negative.*1 bad"):
        plackett_luce_sample(torch.tensor([[1.0, math.nan, 1.0]]), 2, validate_args=True)
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator"):
        plackett_luce_sample(w, 2, generator=0)
    # Bad values at padding are ignored.
    padded = torch.tensor([[1.0, math.nan, -1.0]])
    sel = plackett_luce_sample(padded, 2, valid=torch.tensor([[True, False, False]]))
    assert sel.indices.tolist() == [[0, 0]] and sel.mask.tolist() == [[True, False]]


def test_inclusion_probabilities_errors():
    w = torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got 0"):
        inclusion_probabilities(w, 0)
    with pytest.raises(ValueError, match=r"`num_nodes` must be > 0, got 0"):
        inclusion_probabilities(w, 2, num_nodes=0)
    with pytest.raises(ValueError, match=r"`weights` must be finite and non-negative.*1 bad"):
        inclusion_probabilities(torch.tensor([[1.0, -1.0]]), 1)
    with pytest.raises(ValueError, match=r"`weights` must be finite and non-negative"):
        inclusion_probabilities(torch.tensor([[1.0, math.inf]]), 1)
    with pytest.raises(TypeError, match=r"`weights` must have a float dtype"):
        inclusion_probabilities(torch.ones(2, 4, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match=r"`valid` must have shape \(2, 4\)"):
        inclusion_probabilities(w, 1, valid=torch.ones(4, 2, dtype=torch.bool))


def test_stratified_sample_errors():
    phases = torch.tensor([[0, 1, 1, -1]])
    with pytest.raises(ValueError, match=r"`allocation` must be >= 0, got a minimum of -1"):
        stratified_sample(phases, torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"`allocation` must request at least one chunk"):
        stratified_sample(phases, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"`allocation` must have shape \(1, phase\)"):
        stratified_sample(phases, torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`phases` must lie in \[0, 1\).*got a maximum of 1"):
        stratified_sample(phases, torch.tensor([1]))
    with pytest.raises(TypeError, match=r"`allocation` must have an int dtype"):
        stratified_sample(phases, torch.tensor([1.0, 1.0]))
    with pytest.raises(TypeError, match=r"`phases` must have an int dtype"):
        stratified_sample(phases.float(), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"`valid` must have shape \(1, 4\)"):
        stratified_sample(phases, torch.tensor([1, 1]), valid=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator"):
        stratified_sample(phases, torch.tensor([1, 1]), generator=1)


def test_baseline_errors():
    phases = torch.tensor([[0, 1, 1, 2]])
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got 0"):
        uniform_sample(torch.ones(1, 4, dtype=torch.bool), 0)
    with pytest.raises(TypeError, match=r"`valid` must have a bool dtype"):
        uniform_sample(torch.ones(1, 4), 2)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got 0"):
        top_phase_sample(phases, torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"`scores` must not contain NaN"):
        top_phase_sample(phases, torch.tensor([1.0, math.nan, 0.0]), 2, validate_args=True)
    with pytest.raises(ValueError, match=r"`scores` must have shape \(1, phase\) or \(phase,\)"):
        top_phase_sample(phases, torch.ones(2, 3), 2)
    with pytest.raises(ValueError, match=r"`phases` must lie in \[0, 2\).*got a maximum of 2"):
        top_phase_sample(phases, torch.ones(2), 2, validate_args=True)
    with pytest.raises(ValueError, match=r"`budget` must be > 0, got -1"):
        topk_sample(torch.ones(1, 4), -1)
    with pytest.raises(ValueError, match=r"`scores` must not be NaN at valid chunks"):
        topk_sample(torch.tensor([[1.0, math.nan]]), 1, validate_args=True)
    with pytest.raises(ValueError, match=r"`scores` must have 2 dimensions"):
        topk_sample(torch.ones(4), 1)
    with pytest.raises(ValueError, match=r"`valid` must have shape \(1, 4\)"):
        topk_sample(torch.ones(1, 4), 1, valid=torch.ones(1, 5, dtype=torch.bool))
    # Without validation (no host sync): out-of-range phase ids are never drawn.
    sel = top_phase_sample(phases, torch.tensor([0.0, 1.0]), 3, validate_args=False)
    assert sel.indices.tolist() == [[1, 2, 0]] and sel.counts.tolist() == [2]
    assert topk_sample(
        torch.tensor([[1.0, 3.0, 2.0]]), 2, validate_args=False
    ).indices.tolist() == [[1, 2]]


def test_samplers_that_know_their_inclusion_probabilities_fill_them():
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    sel = uniform_sample(valid, 2, generator=g)
    torch.testing.assert_close(sel.packed_inclusion(), torch.tensor([2 / 6] * 2 + [2 / 3] * 2, dtype=torch.float64))
    phases = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, -1]])
    sel = stratified_sample(phases, torch.tensor([1, 2, 0]), generator=g)
    want = torch.tensor([[0.5, 0.5, 2 / 3, 2 / 3, 2 / 3, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(sel.packed_inclusion(), want[sel.chunk_mask()])
    sel = top_phase_sample(phases, torch.tensor([0.1, 0.3, 0.9]), 2, generator=g)
    # row 0: phase 2 has 1 chunk (pi 1); row 1: phase 2 has 2 chunks, both drawn (pi 1).
    assert sel.packed_inclusion().tolist() == [1.0, 1.0, 1.0]
    sel = top_phase_sample(phases, torch.tensor([0.1, 0.9, 0.3]), 1, generator=g)
    assert sel.packed_inclusion().tolist() == pytest.approx([1 / 3, 1 / 2])
    weights = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    sel = plackett_luce_sample(weights, 2, generator=g, inclusion=True)
    pi = inclusion_probabilities(weights, 2)
    torch.testing.assert_close(sel.packed_inclusion(), pi[sel.chunk_mask()])
    assert plackett_luce_sample(weights, 2, generator=g).inclusion is None
    assert topk_sample(weights, 2).inclusion is None
    budgets = torch.tensor([1])
    sel = plackett_luce_sample(weights, budgets, generator=g, inclusion=True)
    assert sel.k == 4 and sel.counts.tolist() == [1]
    torch.testing.assert_close(sel.packed_inclusion(), inclusion_probabilities(weights, budgets)[sel.chunk_mask()])
    for selection in (uniform_sample(valid, 3, generator=g), sel):
        selection.check(values=True)
