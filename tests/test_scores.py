import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _reference.scores import PhaseScoreBufferRef, success_failure_variance_ref
from chunkmask.pcm._allocation import keep_probabilities
from chunkmask.pcm._phases import NUM_PHASES
from chunkmask.pcm._score_buffer import PhaseScoreBuffer
from chunkmask.pcm._scores import PhaseVariance, success_failure_variance

# ---------------------------------------------------------------- batches


def make_batch(seed, n_traj=None, n_chunk=None, rest=(2, 3), num_phases=4, n_groups=None):
    rng = np.random.default_rng(seed)
    n_traj = n_traj or int(rng.integers(1, 9))
    n_chunk = n_chunk or int(rng.integers(1, 7))
    n_groups = n_groups or int(rng.integers(1, 4))
    features = rng.normal(size=(n_traj, n_chunk, *rest))
    phases = rng.integers(0, num_phases, size=(n_traj, n_chunk))
    success = rng.random(n_traj) < 0.5
    group = rng.choice([-5, 3, 11, 2**40], size=n_groups, replace=False)[
        rng.integers(0, n_groups, size=n_traj)
    ]
    valid = rng.random((n_traj, n_chunk)) < 0.8
    return dict(
        features=torch.from_numpy(features),
        phases=torch.from_numpy(phases),
        success=torch.from_numpy(success),
        group=torch.from_numpy(group),
        valid=torch.from_numpy(valid),
    )


def run(batch, num_phases=4, **kw):
    return success_failure_variance(
        batch["features"],
        batch["phases"],
        batch["success"],
        batch["group"],
        num_phases=num_phases,
        valid=batch["valid"],
        **kw,
    )


def assert_same(a, b, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=rtol)
    assert torch.equal(a.defined, b.defined)
    torch.testing.assert_close(a.group_scores, b.group_scores, atol=atol, rtol=rtol)
    assert torch.equal(a.group_defined, b.group_defined)


seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------- oracle


@settings(deadline=None, max_examples=80)
@given(seeds, st.sampled_from(["uniform", "balance"]))
def test_matches_reference(seed, weighting):
    batch = make_batch(seed)
    out = run(batch, weighting=weighting)
    ref = success_failure_variance_ref(
        batch["features"].numpy(),
        batch["phases"].numpy(),
        batch["success"].numpy(),
        batch["group"].numpy(),
        4,
        batch["valid"].numpy(),
        weighting,
    )
    assert isinstance(out, PhaseVariance)
    assert out.scores.dtype == torch.float32 and out.group_scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, torch.from_numpy(ref[0]).float())
    assert out.defined.tolist() == ref[1].tolist()
    torch.testing.assert_close(out.group_scores, torch.from_numpy(ref[2]).float())
    assert out.group_defined.tolist() == ref[3].tolist()
    assert (out.scores[~out.defined] == 0).all()


def test_worked_example():
    # Group 0: two successes, one failure; phase 0 in both, phase 1 only in successes.
    features = torch.tensor(
        [[[1.0, 2.0], [5.0, 5.0]], [[3.0, 2.0], [5.0, 5.0]], [[0.0, 0.0], [0.0, 0.0]]]
    )
    phases = torch.tensor([[0, 1], [0, 1], [0, 0]])
    success = torch.tensor([True, True, False])
    group = torch.tensor([9, 9, 9])
    out = success_failure_variance(features, phases, success, group, num_phases=3)
    # mu+ = (2, 2), mu- = (0, 0) -> mean((2, 2)^2) = 4.
    assert out.scores.tolist() == [4.0, 0.0, 0.0]
    assert out.defined.tolist() == [True, False, False]
    balance = success_failure_variance(
        features, phases, success, group, num_phases=3, weighting="balance"
    )
    assert balance.scores.tolist() == [4.0, 0.0, 0.0]


def test_balance_weights_groups():
    features = torch.tensor([[[1.0]], [[0.0]], [[2.0]], [[0.0]], [[0.0]], [[0.0]]])
    phases = torch.zeros(6, 1, dtype=torch.long)
    success = torch.tensor([True, False, True, False, False, False])
    group = torch.tensor([0, 0, 1, 1, 1, 1])
    # V_0 = 1 (p = 1/2, w = 1/4), V_1 = 4 (p = 1/4, w = 3/16).
    uniform = success_failure_variance(features, phases, success, group, num_phases=1)
    balance = success_failure_variance(
        features, phases, success, group, num_phases=1, weighting="balance"
    )
    assert uniform.scores.tolist() == [2.5]
    torch.testing.assert_close(balance.scores, torch.tensor([(0.25 * 1 + 0.1875 * 4) / 0.4375]))


# ---------------------------------------------------------------- degenerate cases


@pytest.mark.parametrize("outcome", [True, False])
def test_all_success_or_all_failure(outcome):
    batch = make_batch(1, n_traj=6)
    batch["success"] = torch.full((6,), outcome)
    out = run(batch)
    assert not out.defined.any() and not out.group_defined.any()
    assert (out.scores == 0).all() and (out.group_scores == 0).all()


def test_absent_phase_and_one_chunk():
    features = torch.tensor([[[1.0]], [[3.0]]])
    out = success_failure_variance(
        features,
        torch.tensor([[1], [1]]),
        torch.tensor([True, False]),
        torch.tensor([0, 0]),
        num_phases=NUM_PHASES,
    )
    assert out.defined.tolist() == [False, True, False, False, False]
    assert out.scores.tolist() == [0.0, 4.0, 0.0, 0.0, 0.0]
    assert out.group_scores.shape == (1, NUM_PHASES)


def test_fully_padded_batch():
    batch = make_batch(2, n_traj=4, n_chunk=3)
    batch["valid"] = torch.zeros(4, 3, dtype=torch.bool)
    batch["features"][:] = float("nan")
    out = run(batch)
    assert not out.defined.any() and not out.group_defined.any()
    assert (out.scores == 0).all() and (out.group_scores == 0).all()


def test_mixed_group_counts_only_when_phase_on_both_sides():
    # The group is mixed, but phase 0 appears only on the success side.
    features = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    phases = torch.tensor([[0, 1], [1, 1]])
    out = success_failure_variance(
        features, phases, torch.tensor([True, False]), torch.tensor([0, 0]), num_phases=2
    )
    assert out.defined.tolist() == [False, True]
    assert out.scores.tolist() == [0.0, 2.25]  # mu+ = 2, mu- = 3.5


# ---------------------------------------------------------------- properties


@settings(deadline=None, max_examples=40)
@given(
    seeds,
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]),
    st.sampled_from(["uniform", "balance"]),
)
def test_padding_contents_never_matter(seed, fill, weighting):
    batch = make_batch(seed)
    out = run(batch, weighting=weighting)
    pad = ~batch["valid"]
    batch["features"] = batch["features"].clone()
    batch["features"][pad] = fill
    batch["phases"] = torch.where(pad, -7, batch["phases"])  # out-of-range ids at padding
    assert_same(run(batch, weighting=weighting), out)


@settings(deadline=None, max_examples=40)
@given(seeds, st.randoms(), st.sampled_from(["uniform", "balance"]))
def test_trajectory_permutation_and_group_relabelling(seed, rnd, weighting):
    batch = make_batch(seed)
    out = run(batch, weighting=weighting)
    perm = list(range(batch["success"].shape[0]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    permuted = {k: v[perm] for k, v in batch.items()}
    assert_same(run(permuted, weighting=weighting), out)
    # Relabel the groups by an order-preserving map: identical group order and outputs.
    relabelled = dict(batch, group=batch["group"] * 3 + 1000)
    assert_same(run(relabelled, weighting=weighting), out)
    # Any relabelling (order-changing) permutes the group rows but keeps V_c.
    flipped = dict(batch, group=-batch["group"])
    other = run(flipped, weighting=weighting)
    torch.testing.assert_close(other.scores, out.scores)
    assert torch.equal(other.defined, out.defined)
    torch.testing.assert_close(other.group_scores, out.group_scores.flip(0))


@settings(deadline=None, max_examples=40)
@given(seeds, st.floats(-50, 50), st.floats(0.1, 10))
def test_shift_and_scale(seed, shift, scale):
    batch = make_batch(seed)
    out = run(batch)
    shifted = run(dict(batch, features=batch["features"] + shift))
    assert_same(shifted, out, atol=1e-5)
    scaled = run(dict(batch, features=batch["features"] * scale))
    torch.testing.assert_close(scaled.scores, out.scores * scale**2, atol=1e-5, rtol=1e-5)
    assert torch.equal(scaled.defined, out.defined)


@settings(deadline=None, max_examples=30)
@given(seeds, st.sampled_from(["uniform", "balance"]))
def test_duplication_invariance(seed, weighting):
    batch = make_batch(seed)
    out = run(batch, weighting=weighting)
    # Every trajectory twice, in its own group: each V_{c,g} and p_g unchanged.
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
    assert_same(run(doubled, weighting=weighting), out)
    # The whole batch again under fresh group labels: every group duplicated, V_c unchanged.
    copy = dict(batch, group=batch["group"] + 2**50)
    both = {k: torch.cat([batch[k], copy[k]]) for k in batch}
    twice = run(both, weighting=weighting)
    torch.testing.assert_close(twice.scores, out.scores)
    assert torch.equal(twice.defined, out.defined)


@settings(deadline=None, max_examples=20)
@given(seeds)
def test_bf16_and_float32_features(seed):
    batch = make_batch(seed)
    low = batch["features"].to(torch.bfloat16)
    ref = run(dict(batch, features=low.double()))
    for dtype in (torch.bfloat16, torch.float32):
        assert_same(run(dict(batch, features=low.to(dtype))), ref)


def test_rest_shapes_are_flattened():
    batch = make_batch(3, rest=(4, 2))
    flat = dict(batch, features=batch["features"].reshape(*batch["features"].shape[:2], 8))
    assert_same(run(batch), run(flat))
    # (traj, chunk) features are one coordinate: the same as (traj, chunk, 1), and the reference.
    no_rest = dict(batch, features=batch["features"][..., 0, 0])
    got = run(no_rest)
    assert_same(got, run(dict(no_rest, features=no_rest["features"][..., None])))
    ref = success_failure_variance_ref(
        no_rest["features"][..., None].numpy(),
        batch["phases"].numpy(),
        batch["success"].numpy(),
        batch["group"].numpy(),
        4,
        batch["valid"].numpy(),
        "uniform",
    )
    torch.testing.assert_close(got.scores, torch.from_numpy(ref[0]).float())
    assert got.defined.tolist() == ref[1].tolist()
    assert got.defined.any()  # the batch is informative, so the comparison is not vacuous


# ---------------------------------------------------------------- errors


def test_variance_errors():
    b = make_batch(0, n_traj=4, n_chunk=3)
    f, ph, s, g, v = b["features"], b["phases"], b["success"], b["group"], b["valid"]

    def call(**kw):
        args = dict(features=f, phases=ph, success=s, group=g, num_phases=4, valid=v)
        args.update(kw)
        return success_failure_variance(
            args.pop("features"),
            args.pop("phases"),
            args.pop("success"),
            args.pop("group"),
            **args,
        )

    with pytest.raises(TypeError, match="`features`"):
        call(features=f.long())
    with pytest.raises(ValueError, match="`features`.*at least 2"):
        call(features=f[0, 0, 0])
    with pytest.raises(ValueError, match="`features`.*feature coordinate"):
        call(features=torch.zeros(4, 3, 0))
    with pytest.raises(TypeError, match="`phases`"):
        call(phases=ph.float())
    with pytest.raises(ValueError, match=r"`phases`.*\(4, 3\)"):
        call(phases=ph[:, :2])
    with pytest.raises(TypeError, match="`success`"):
        call(success=s.long())
    with pytest.raises(ValueError, match=r"`success`.*\(4,\)"):
        call(success=s[:3])
    with pytest.raises(TypeError, match="`group`"):
        call(group=g.double())
    with pytest.raises(ValueError, match=r"`group`.*\(4,\)"):
        call(group=g[:2])
    with pytest.raises(ValueError, match="`group`.*1 dimensions"):
        call(group=g[:, None])
    with pytest.raises(ValueError, match="`num_phases`"):
        call(num_phases=0)
    with pytest.raises(TypeError, match="`num_phases`"):
        call(num_phases=4.0)
    with pytest.raises(ValueError, match="`weighting`"):
        call(weighting="pq")
    with pytest.raises(ValueError, match=r"`valid`.*\(4, 3\)"):
        call(valid=v[:, :2])
    with pytest.raises(TypeError, match="`valid`"):
        call(valid=v.float())
    bad = f.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`features`.*finite"):
        call(features=bad, valid=torch.ones(4, 3, dtype=torch.bool), validate_args=True)
    call(features=bad, valid=torch.ones(4, 3, dtype=torch.bool))  # the default reads no values
    with pytest.raises(ValueError, match=r"`phases`.*\[0, 4\).*\[4\]"):
        call(phases=torch.full((4, 3), 4), valid=torch.ones(4, 3, dtype=torch.bool),
             validate_args=True)
    with pytest.raises(ValueError, match=r"`phases`.*\[-1\]"):
        call(phases=torch.full((4, 3), -1), valid=torch.ones(4, 3, dtype=torch.bool),
             validate_args=True)
    # Without validation, out-of-range ids at valid chunks are ignored.
    out = call(phases=torch.full((4, 3), 9), validate_args=False)
    assert not out.defined.any()


# ---------------------------------------------------------------- buffer


@st.composite
def score_streams(draw, num_phases=4):
    n = draw(st.integers(1, 13))
    steps = []
    for _ in range(n):
        value = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7]) | st.floats(0, 10, allow_subnormal=False)
        scores = draw(st.lists(value, min_size=num_phases, max_size=num_phases))
        defined = draw(st.lists(st.booleans(), min_size=num_phases, max_size=num_phases))
        steps.append((scores, defined))
    return steps


@settings(deadline=None, max_examples=60)
@given(
    score_streams(),
    st.integers(1, 4),
    st.sampled_from([0.05, 0.1, 1.0]),
    st.sampled_from([1.0, 0.5, 2.0]),
)
def test_buffer_matches_reference(steps, refresh_every, p_min, power):
    buf = PhaseScoreBuffer(4, refresh_every=refresh_every, p_min=p_min, power=power)
    ref = PhaseScoreBufferRef(4, refresh_every, p_min, power)
    for scores, defined in steps:
        s = torch.tensor(scores, dtype=torch.float64)
        d = torch.tensor(defined)
        s[~d] = float("nan")  # undefined values are ignored
        out = buf.update(s, d)
        expected = ref.update([(scores, defined, None)])
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.from_numpy(expected).float())
        torch.testing.assert_close(buf.keep_probabilities, out)
    assert buf.num_updates == len(steps)


@st.composite
def weighted_streams(draw, num_phases=4):
    steps = draw(score_streams(num_phases))
    weights = [
        draw(st.lists(st.integers(0, 6).map(float), min_size=num_phases, max_size=num_phases))
        for _ in steps
    ]
    return [(s, d, w) for (s, d), w in zip(steps, weights, strict=True)]


@settings(deadline=None, max_examples=80)
@given(
    weighted_streams(),
    st.integers(1, 4),
    st.sampled_from(["steps", "weighted"]),
    st.sampled_from([0.0, 1.0, 3.0, 7.5]),
)
def test_robust_buffer_matches_reference(steps, refresh_every, window, min_groups):
    buf = PhaseScoreBuffer(4, refresh_every=refresh_every, window=window, min_groups=min_groups)
    ref = PhaseScoreBufferRef(4, refresh_every, window=window, min_groups=min_groups)
    for scores, defined, weight in steps:
        s = torch.tensor(scores, dtype=torch.float64)
        d = torch.tensor(defined)
        out = buf.update(s, d, weight=torch.tensor(weight, dtype=torch.float64))
        expected = ref.update([(scores, defined, weight)])
        torch.testing.assert_close(out, torch.from_numpy(expected).float())


def test_thin_phase_no_longer_takes_the_top_probability():
    # The failure mode found on the testbed: "tail", defined by one group in one step of the
    # window with a large score, took p = 1 under Eq. 7 and rescaled every other phase.
    paper = PhaseScoreBuffer(3, refresh_every=3)
    robust = PhaseScoreBuffer(3, refresh_every=3, window="weighted", min_groups=4)
    d_all, d_two = torch.tensor([True, True, True]), torch.tensor([True, True, False])
    stream = [
        (torch.tensor([1.0, 2.0, 0.0]), d_two, torch.tensor([8.0, 8.0, 0.0])),
        (torch.tensor([1.0, 2.0, 0.0]), d_two, torch.tensor([8.0, 8.0, 0.0])),
        (torch.tensor([1.0, 2.0, 9.0]), d_all, torch.tensor([8.0, 8.0, 1.0])),
    ]
    for s, d, w in stream:
        p_paper = paper.update(s, d, weight=w)
        p_robust = robust.update(s, d, weight=w)
    torch.testing.assert_close(p_paper, torch.tensor([1 / 9, 2 / 9, 1.0]))
    torch.testing.assert_close(p_robust, torch.tensor([0.5, 1.0, 0.1]))
    # Weighting alone (no minimum) averages the phase's steps by their groups.
    w = PhaseScoreBuffer(2, refresh_every=2, window="weighted")
    w.update(torch.tensor([1.0, 4.0]), weight=torch.tensor([1.0, 1.0]))
    out = w.update(torch.tensor([1.0, 1.0]), weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([1.0 / 1.75, 1.0]))  # (4 + 3) / 4 = 1.75
    # The weighted window survives a state round trip mid-window.
    a = PhaseScoreBuffer(2, refresh_every=3, window="weighted", min_groups=2)
    a.update(torch.tensor([1.0, 4.0]), weight=torch.tensor([1.0, 2.0]))
    b = PhaseScoreBuffer(2, refresh_every=3, window="weighted", min_groups=2)
    b.load_state_dict(a.state_dict())
    for s, wt in (([2.0, 1.0], [1.0, 1.0]), ([3.0, 2.0], [3.0, 1.0])):
        torch.testing.assert_close(
            a.update(torch.tensor(s), weight=torch.tensor(wt)),
            b.update(torch.tensor(s), weight=torch.tensor(wt)),
        )
    assert "window='weighted'" in repr(b) and "min_groups=2.0" in repr(b)


def test_buffer_schedule():
    buf = PhaseScoreBuffer(3, refresh_every=3, p_min=0.1)
    assert buf.keep_probabilities.tolist() == [1.0, 1.0, 1.0]
    yes = torch.tensor([True, True, True])
    p1 = buf.update(torch.tensor([1.0, 2.0, 4.0]), yes)  # initialise from the first batch
    torch.testing.assert_close(p1, torch.tensor([0.25, 0.5, 1.0]))
    p2 = buf.update(torch.tensor([4.0, 0.0, 0.0]), yes)  # held
    torch.testing.assert_close(p2, p1)
    p3 = buf.update(torch.tensor([4.0, 1.0, 2.0]), torch.tensor([True, True, False]))  # refresh
    # Eq. 7: means (3, 1, 2) -> max-normalised (1, 1/3, 2/3).
    torch.testing.assert_close(p3, torch.tensor([1.0, 1 / 3, 2 / 3]))
    # Next window: only phase 0 defined -> the rest fall to the floor.
    for _ in range(3):
        p = buf.update(torch.tensor([5.0, 1.0, 1.0]), torch.tensor([True, False, False]))
    torch.testing.assert_close(p, torch.tensor([1.0, 0.1, 0.1]))
    # A window that defines nothing holds the previous probabilities.
    for _ in range(3):
        p = buf.update(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(p, torch.tensor([1.0, 0.1, 0.1]))


def test_buffer_uses_keep_probabilities():
    buf = PhaseScoreBuffer(5, refresh_every=1, p_min=0.2, power=0.5)
    s = torch.tensor([0.0, 1.0, 4.0, 9.0, 2.0])
    d = torch.tensor([True, True, True, True, False])
    torch.testing.assert_close(
        buf.update(s, d), keep_probabilities(s, d, p_min=0.2, power=0.5).float()
    )


def test_buffer_weights_combine_like_one_rank():
    # A single rank: the weight does not change the step score.
    a = PhaseScoreBuffer(2, refresh_every=2)
    b = PhaseScoreBuffer(2, refresh_every=2)
    for s in ([1.0, 2.0], [3.0, 0.5], [0.2, 0.1]):
        torch.testing.assert_close(
            a.update(torch.tensor(s), weight=torch.tensor([3.0, 7.0])), b.update(torch.tensor(s))
        )
    # A zero weight makes the phase undefined.
    c = PhaseScoreBuffer(2, refresh_every=1)
    assert c.update(torch.tensor([1.0, 5.0]), weight=torch.tensor([1.0, 0.0])).tolist() == [
        1.0,
        pytest.approx(0.1),
    ]


def test_buffer_state_dict_roundtrip_and_reset():
    stream = [
        torch.tensor([1.0, 2.0, 0.5]),
        torch.tensor([0.1, 3.0, 0.2]),
        torch.tensor([2.0, 2.0, 2.0]),
        torch.tensor([0.0, 1.0, 5.0]),
        torch.tensor([4.0, 0.0, 1.0]),
    ]
    a = PhaseScoreBuffer(3, refresh_every=3)
    for s in stream[:2]:
        a.update(s)
    state = a.state_dict()
    b = PhaseScoreBuffer(3, refresh_every=3)
    b.load_state_dict(state)
    assert b.num_updates == 2
    for s in stream[2:]:
        torch.testing.assert_close(a.update(s), b.update(s))
    state["window_sum"].fill_(123.0)  # the state dict holds copies
    a.reset()
    fresh = PhaseScoreBuffer(3, refresh_every=3)
    assert a.num_updates == 0
    for s in stream:
        torch.testing.assert_close(a.update(s), fresh.update(s))
    assert "num_updates=5" in repr(a)


def test_buffer_errors():
    with pytest.raises(ValueError, match="`num_phases`"):
        PhaseScoreBuffer(0)
    with pytest.raises(ValueError, match="`refresh_every`"):
        PhaseScoreBuffer(3, refresh_every=0)
    with pytest.raises(TypeError, match="`refresh_every`"):
        PhaseScoreBuffer(3, refresh_every=2.5)
    with pytest.raises(ValueError, match="`p_min`"):
        PhaseScoreBuffer(3, p_min=0.0)
    with pytest.raises(ValueError, match="`p_min`"):
        PhaseScoreBuffer(3, p_min=1.5)
    with pytest.raises(ValueError, match="`power`"):
        PhaseScoreBuffer(3, power=0.0)
    with pytest.raises(ValueError, match="`power`"):
        PhaseScoreBuffer(3, power=float("inf"))
    with pytest.raises(TypeError, match="`power`"):
        PhaseScoreBuffer(3, power="1")
    with pytest.raises(ValueError, match=r"`window` must be one of \('steps', 'weighted'\), got 'mean'"):
        PhaseScoreBuffer(3, window="mean")
    with pytest.raises(ValueError, match=r"`min_groups` must lie in \[0.0, inf\), got -1.0"):
        PhaseScoreBuffer(3, min_groups=-1.0)
    with pytest.raises(ValueError, match="`min_groups` must be finite, got nan"):
        PhaseScoreBuffer(3, min_groups=float("nan"))
    with pytest.raises(TypeError, match="`min_groups`"):
        PhaseScoreBuffer(3, min_groups="2")
    buf = PhaseScoreBuffer(3)
    with pytest.raises(ValueError, match=r"`scores`.*\(3,\)"):
        buf.update(torch.zeros(4))
    with pytest.raises(ValueError, match="`scores`.*1 dimensions"):
        buf.update(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="`scores`"):
        buf.update(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="`defined`"):
        buf.update(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"`defined`.*\(3,\)"):
        buf.update(torch.zeros(3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="`scores`.*finite and non-negative"):
        buf.update(torch.tensor([0.0, float("nan"), 1.0]), validate_args=True)
    with pytest.raises(ValueError, match="`scores`.*finite and non-negative"):
        buf.update(torch.tensor([0.0, -1.0, 1.0]), validate_args=True)
    with pytest.raises(TypeError, match="`weight`"):
        buf.update(torch.zeros(3), weight=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`weight`.*\(3,\)"):
        buf.update(torch.zeros(3), weight=torch.ones(2))
    with pytest.raises(ValueError, match="`weight`.*non-negative"):
        buf.update(torch.zeros(3), weight=torch.tensor([1.0, -1.0, 1.0]), validate_args=True)
    assert buf.num_updates == 0  # failed updates change nothing
    state = buf.state_dict()
    with pytest.raises(ValueError, match="`state`.*missing.*window_sum"):
        buf.load_state_dict({k: v for k, v in state.items() if k != "window_sum"})
    with pytest.raises(ValueError, match="`state`.*missing.*window_weight"):
        buf.load_state_dict({k: v for k, v in state.items() if k != "window_weight"})
    with pytest.raises(ValueError, match=r"`state\['window_weight'\]`.*non-negative"):
        buf.load_state_dict(dict(state, window_weight=torch.tensor([0.0, -1.0, 0.0])))
    with pytest.raises(ValueError, match="`state`.*unexpected.*extra"):
        buf.load_state_dict(dict(state, extra=1))
    with pytest.raises(ValueError, match=r"`state\['keep_probabilities'\]`.*\(3,\)"):
        buf.load_state_dict(dict(state, keep_probabilities=torch.ones(4)))
    with pytest.raises(TypeError, match=r"`state\['window_count'\]`"):
        buf.load_state_dict(dict(state, window_count=[0, 0, 0]))
    with pytest.raises(ValueError, match=r"`state\['num_updates'\]`"):
        buf.load_state_dict(dict(state, num_updates=-1))


def test_buffer_defaults_are_the_papers():
    buf = PhaseScoreBuffer(NUM_PHASES)
    assert (buf.refresh_every, buf.p_min, buf.power) == (5, 0.1, 1.0)
    s = torch.tensor([0.0, 1.0, 2.0, 4.0, 0.2])
    assert torch.equal(buf.update(s), keep_probabilities(s).float())  # the first batch initialises
    for _ in range(3):
        held = buf.update(torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0]))
        assert torch.equal(held, keep_probabilities(s).float())  # held until update 5
    fresh = buf.update(torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0]))
    # Eq. 7 over the five buffered steps: means (3.2, 0.2, 0.4, 0.8, 0.04).
    want = keep_probabilities(torch.tensor([3.2, 0.2, 0.4, 0.8, 0.04], dtype=torch.float64))
    torch.testing.assert_close(fresh, want.float())


def test_buffer_detaches_scores():
    buf = PhaseScoreBuffer(2, refresh_every=2)
    s = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not buf.update(s * 2).requires_grad
    assert not buf.state_dict()["window_sum"].requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weighting", ["uniform", "balance"])
def test_cuda_matches_cpu(weighting):
    batch = make_batch(5, n_traj=8, n_chunk=6, n_groups=3)
    cpu = run(batch, weighting=weighting)
    gpu = run({k: v.cuda() for k, v in batch.items()}, weighting=weighting)
    assert gpu.scores.device.type == "cuda"
    assert_same(PhaseVariance(*(x.cpu() for x in gpu)), cpu)
    a, b = PhaseScoreBuffer(4, refresh_every=2), PhaseScoreBuffer(4, refresh_every=2)
    for step in range(3):
        out = a.update(cpu.scores * (step + 1), cpu.defined)
        out_gpu = b.update(gpu.scores * (step + 1), gpu.defined)
        torch.testing.assert_close(out_gpu.cpu(), out)


def test_empty_batches_and_int32_ids():
    empty = success_failure_variance(
        torch.zeros(0, 3, 2),
        torch.zeros(0, 3, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool),
        torch.zeros(0, dtype=torch.long),
        num_phases=2,
    )
    assert empty.group_scores.shape == (0, 2) and not empty.defined.any()
    no_chunks = success_failure_variance(
        torch.zeros(2, 0, 2),
        torch.zeros(2, 0, dtype=torch.int32),
        torch.tensor([True, False]),
        torch.tensor([1, 1], dtype=torch.int32),
        num_phases=2,
    )
    assert no_chunks.group_defined.tolist() == [[False, False]]
    batch = make_batch(4)
    small = dict(batch, phases=batch["phases"].int(), group=(batch["group"] % 1000).int())
    wide = dict(batch, group=batch["group"] % 1000)
    assert_same(run(small), run(wide))
