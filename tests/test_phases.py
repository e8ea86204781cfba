import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _reference.phases import (
    close_fraction_ref,
    label_grasp_onset_ref,
    label_gripper_phases_ref,
    label_time_segments_ref,
)
from chunkmask.pcm._phases import (
    NUM_ONSET_PHASES,
    NUM_PHASES,
    OnsetPhase,
    Phase,
    gripper_close_fraction,
    label_grasp_onset,
    label_gripper_phases,
    label_time_segments,
)

A, PRE, ACT, RAMP, TAIL, PAD = (int(p) for p in Phase)
# Values on and around every default threshold.
LEVELS = [0.0, 0.05, 0.1, 0.125, 0.3, 0.49, 0.5, 0.6, 0.74, 0.75, 0.875, 1.0]


def test_phase_enum():
    assert [int(p) for p in Phase] == [0, 1, 2, 3, 4, -1]
    assert NUM_PHASES == 5 == len(Phase) - 1


# ---------------------------------------------------------------- strategies


@st.composite
def traces(draw, max_traj=5, max_chunk=14):
    """Batches of close-fraction traces built from grasp-cycle blocks, with padding."""
    n_traj = draw(st.integers(1, max_traj))
    n_chunk = draw(st.integers(1, max_chunk))
    rows, valids = [], []
    for _ in range(n_traj):
        row = []
        while len(row) < n_chunk:
            level = draw(st.sampled_from(LEVELS) | st.floats(0, 1))
            row += [level] * draw(st.integers(1, 4))
        rows.append(row[:n_chunk])
        kind = draw(st.sampled_from(["full", "prefix", "random"]))
        if kind == "full":
            v = [True] * n_chunk
        elif kind == "prefix":
            length = draw(st.integers(0, n_chunk))
            v = [t < length for t in range(n_chunk)]
        else:
            v = draw(st.lists(st.booleans(), min_size=n_chunk, max_size=n_chunk))
        valids.append(v)
    f = torch.tensor(rows, dtype=torch.float64)
    valid = torch.tensor(valids, dtype=torch.bool)
    return f, valid


thresholds = st.tuples(
    st.sampled_from([0.0, 0.1, 0.3, 0.5]),  # pre_min / tail_max pool
    st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    st.sampled_from([0.5, 0.6, 0.75]),  # active
    st.sampled_from([0.75, 0.875, 1.0]),  # sustained
    st.integers(0, 5),  # window
)


# ---------------------------------------------------------------- close fraction


@pytest.mark.parametrize(
    "close,threshold,values",
    [
        ("positive", None, [-1.0, 1.0]),
        ("negative", None, [1.0, -1.0]),
        ("zero", None, [1.0, 0.0]),
        ("threshold", 0.3, [0.0, 0.3]),
        ("positive", 0.5, [0.5, 0.9]),
    ],
)
def test_close_fraction_conventions(close, threshold, values):
    opened, closed = values
    g = torch.tensor([[[opened] * 4, [closed, opened, closed, closed], [closed] * 4]])
    out = gripper_close_fraction(g, close=close, close_threshold=threshold)
    assert out.tolist() == [[0.0, 0.75, 1.0]]
    assert out.dtype == torch.float32


@settings(deadline=None, max_examples=40)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 9),
    st.sampled_from(["positive", "negative", "zero", "threshold"]),
    st.integers(0, 2**31 - 1),
)
def test_close_fraction_matches_reference(n_traj, n_chunk, n_step, close, seed):
    rng = np.random.default_rng(seed)
    g = rng.choice([-1.0, 0.0, 0.2, 0.5, 1.0], size=(n_traj, n_chunk, n_step))
    valid = rng.random((n_traj, n_chunk)) < 0.7
    threshold = 0.2 if close == "threshold" else None
    g_t = torch.from_numpy(g)
    g_t[~torch.from_numpy(valid)] = float("nan")
    out = gripper_close_fraction(g_t, torch.from_numpy(valid), close=close, close_threshold=threshold)
    ref = close_fraction_ref(g, valid, close, threshold)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.from_numpy(ref))


def test_close_fraction_int_and_bf16():
    g = torch.tensor([[[0, 1, 1, 1]]])
    assert gripper_close_fraction(g).tolist() == [[0.75]]
    low = gripper_close_fraction(g.to(torch.bfloat16))
    assert low.dtype == torch.float32 and low.tolist() == [[0.75]]
    half = torch.tensor([[[-1.0, 0.5, 0.25, 1.0], [0.0, 0.0, 1.0, 1.0]]], dtype=torch.bfloat16)
    for close, threshold in (("positive", None), ("zero", None), ("threshold", 0.25)):
        torch.testing.assert_close(
            gripper_close_fraction(half, close=close, close_threshold=threshold),
            gripper_close_fraction(half.double(), close=close, close_threshold=threshold).float(),
        )


def test_close_fraction_errors():
    g = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="`close`"):
        gripper_close_fraction(g, close="open")
    with pytest.raises(ValueError, match="`close_threshold`.*given"):
        gripper_close_fraction(g, close="threshold")
    with pytest.raises(ValueError, match="`close_threshold`.*finite"):
        gripper_close_fraction(g, close_threshold=float("nan"))
    with pytest.raises(TypeError, match="`close_threshold`"):
        gripper_close_fraction(g, close_threshold="0.5")
    with pytest.raises(TypeError, match="`gripper`"):
        gripper_close_fraction(g.bool())
    with pytest.raises(ValueError, match="`gripper`.*3 dimensions"):
        gripper_close_fraction(g[0])
    with pytest.raises(ValueError, match="`gripper`.*at least one step"):
        gripper_close_fraction(torch.zeros(2, 3, 0))
    with pytest.raises(ValueError, match=r"`valid`.*\(2, 3\)"):
        gripper_close_fraction(g, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="`valid`"):
        gripper_close_fraction(g, torch.ones(2, 3))


# ---------------------------------------------------------------- gripper rule: worked cases


def labels(f, valid=None, **kw):
    f = torch.tensor(f, dtype=torch.float32)
    if f.ndim == 1:
        f = f[None]
    if valid is not None:
        valid = torch.tensor(valid, dtype=torch.bool).reshape(f.shape)
    return label_gripper_phases(f, valid, **kw).tolist()


def test_single_grasp_cycle():
    f = [0.0, 0.0, 0.0, 0.0, 0.125, 0.2, 0.3, 1.0, 1.0, 1.0, 0.2, 0.0, 0.0, 0.0, 0.0]
    assert labels(f) == [[A, A, A, A, PRE, PRE, PRE, ACT, ACT, ACT, RAMP, RAMP, RAMP, TAIL, TAIL]]


def test_pre_grasp_needs_partial_close():
    # f < pre_min inside the pre-grasp window stays approach.
    assert labels([0.0, 0.05, 0.2, 0.9, 0.0]) == [[A, A, PRE, ACT, RAMP]]


def test_multi_grasp_cycle_repeats():
    f = [0.0, 0.2, 0.8, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.9, 0.0, 0.0]
    assert labels(f, window=2) == [[A, PRE, ACT, ACT, RAMP, RAMP, A, A, A, PRE, ACT, RAMP, RAMP]]


def test_overlapping_windows_priority():
    # Chunk 3 is in the ramp of the first grasp and the pre window of the second:
    # pre-grasp wins when 0.1 <= f < 0.5, ramp otherwise.
    assert labels([0.9, 0.0, 0.3, 0.9], window=2) == [[ACT, RAMP, PRE, ACT]]
    assert labels([0.9, 0.0, 0.05, 0.9], window=2) == [[ACT, RAMP, RAMP, ACT]]


def test_no_sustained_close_is_all_approach():
    assert labels([0.0, 0.3, 0.6, 0.7, 0.0, 0.05]) == [[A, A, ACT, ACT, A, A]]


def test_partial_close_after_final_release_is_approach():
    f = [0.9, 0.0, 0.0, 0.0, 0.3, 0.0, 0.6, 0.0]
    assert labels(f, window=1) == [[ACT, RAMP, TAIL, TAIL, A, TAIL, ACT, TAIL]]


def test_active_grip_outranks_windows():
    assert labels([0.0, 0.5, 0.6, 0.8, 0.6, 0.0]) == [[A, ACT, ACT, ACT, ACT, RAMP]]


def test_padding_breaks_sustained_interval():
    # Without the padding slot this would be one interval; with it, two intervals.
    f = [0.9, 0.9, float("nan"), 0.9, 0.2, 0.0]
    valid = [True, True, False, True, True, True]
    assert labels(f, valid, window=1) == [[ACT, ACT, PAD, ACT, RAMP, TAIL]]
    # A padding slot counts in the window: the ramp after chunk 0 reaches only chunk 1.
    assert labels([0.9, 0.0, 0.0], [True, False, True], window=1) == [[ACT, PAD, TAIL]]


def test_final_release_is_per_trajectory():
    f = [[0.0, 0.9, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.9]]
    valid = [[True] * 6, [True] * 5 + [False]]
    assert labels(f, valid, window=1) == [[A, ACT, RAMP, TAIL, TAIL, TAIL], [A] * 5 + [PAD]]


def test_one_chunk_and_empty():
    assert labels([[0.9], [0.0], [0.3]]) == [[ACT], [A], [A]]
    out = label_gripper_phases(torch.zeros(3, 0))
    assert out.shape == (3, 0) and out.dtype == torch.int64


def test_window_zero():
    assert labels([0.2, 0.9, 0.0, 0.3], window=0) == [[A, ACT, TAIL, A]]


# ---------------------------------------------------------------- gripper rule: oracle + props


@settings(deadline=None, max_examples=120)
@given(traces(), thresholds)
def test_labels_match_reference(batch, th):
    f, valid = batch
    low1, low2, active, sustained, window = th
    pre_min, tail_max = min(low1, active), min(low2, active)
    kw = dict(sustained=sustained, active=active, pre_min=pre_min, tail_max=tail_max, window=window)
    out = label_gripper_phases(f, valid, **kw)
    ref = label_gripper_phases_ref(f.numpy(), valid.numpy(), **kw)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), ref)


@settings(deadline=None, max_examples=50)
@given(traces(), st.sampled_from([float("nan"), float("inf"), -3.0, 0.9, 0.0]), st.randoms())
def test_padding_never_labelled_and_never_matters(batch, fill, rnd):
    f, valid = batch
    out = label_gripper_phases(f, valid)
    assert ((out == PAD) == ~valid).all()
    g = torch.where(valid, f, fill)
    torch.testing.assert_close(label_gripper_phases(g, valid), out)
    # Trajectory permutation equivariance.
    perm = list(range(f.shape[0]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    torch.testing.assert_close(label_gripper_phases(f[perm], valid[perm]), out[perm])


@settings(deadline=None, max_examples=30)
@given(traces())
def test_dtypes_agree(batch):
    f, valid = batch
    f = (f * 8).round() / 8  # exactly representable in bfloat16
    out = label_gripper_phases(f, valid)
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(label_gripper_phases(f.to(dtype), valid), out)


def test_trailing_padding_equals_truncation():
    f = torch.tensor([[0.0, 0.2, 0.9, 0.9, 0.0, 0.0, 0.9, 0.9]])
    valid = torch.tensor([[True] * 5 + [False] * 3])
    out = label_gripper_phases(f, valid)
    torch.testing.assert_close(out[:, :5], label_gripper_phases(f[:, :5]))


def test_label_errors():
    f = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="`close_fraction`"):
        label_gripper_phases(f.long())
    with pytest.raises(ValueError, match="`close_fraction`.*2 dimensions"):
        label_gripper_phases(f[0])
    with pytest.raises(ValueError, match=r"`valid`.*\(2, 4\)"):
        label_gripper_phases(f, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`sustained`"):
        label_gripper_phases(f, sustained=1.5)
    with pytest.raises(ValueError, match="`active`.*`sustained`"):
        label_gripper_phases(f, active=0.8, sustained=0.75)
    with pytest.raises(ValueError, match="`pre_min`.*`active`"):
        label_gripper_phases(f, pre_min=0.6)
    with pytest.raises(ValueError, match="`tail_max`.*`active`"):
        label_gripper_phases(f, tail_max=0.6)
    with pytest.raises(ValueError, match="`pre_min`"):
        label_gripper_phases(f, pre_min=-0.1)
    with pytest.raises(ValueError, match="`active`"):
        label_gripper_phases(f, active=float("nan"))
    with pytest.raises(ValueError, match="`window`"):
        label_gripper_phases(f, window=-1)
    with pytest.raises(TypeError, match="`window`"):
        label_gripper_phases(f, window=1.5)
    with pytest.raises(ValueError, match="`close_fraction`.*finite"):
        label_gripper_phases(torch.tensor([[0.0, float("nan")]]), validate_args=True)
    with pytest.raises(ValueError, match=r"`close_fraction`.*\[0, 1\]"):
        label_gripper_phases(torch.tensor([[0.0, 1.5]]), validate_args=True)
    # Bad values at padding are fine, and validation can be switched off.
    label_gripper_phases(torch.tensor([[0.0, 1.5]]), torch.tensor([[True, False]]))
    label_gripper_phases(torch.tensor([[0.0, 1.5]]), validate_args=False)


# ---------------------------------------------------------------- time segments


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 5), st.integers(0, 12), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_time_segments_match_reference(n_traj, n_chunk, num_segments, seed):
    rng = np.random.default_rng(seed)
    valid = rng.random((n_traj, n_chunk)) < 0.7
    out = label_time_segments(torch.from_numpy(valid), num_segments=num_segments)
    np.testing.assert_array_equal(out.numpy(), label_time_segments_ref(valid, num_segments))
    lengths = rng.integers(0, n_chunk + 1, size=n_traj)
    prefix = np.arange(n_chunk)[None] < lengths[:, None]
    out = label_time_segments(
        torch.from_numpy(lengths), num_segments=num_segments, num_chunks=n_chunk
    )
    np.testing.assert_array_equal(out.numpy(), label_time_segments_ref(prefix, num_segments))


def test_time_segments_lengths_default_width():
    out = label_time_segments(torch.tensor([2, 4], dtype=torch.int32), num_segments=2)
    assert out.tolist() == [[0, 1, -1, -1], [0, 0, 1, 1]]


def test_time_segments_errors():
    with pytest.raises(ValueError, match="`num_segments`"):
        label_time_segments(torch.ones(2, 3, dtype=torch.bool), num_segments=0)
    with pytest.raises(TypeError, match="`num_segments`"):
        label_time_segments(torch.ones(2, 3, dtype=torch.bool), num_segments=2.0)
    with pytest.raises(TypeError, match="`valid`"):
        label_time_segments(torch.ones(2, 3), num_segments=2)
    with pytest.raises(ValueError, match="`valid`.*2 dimensions"):
        label_time_segments(torch.ones(3, dtype=torch.bool), num_segments=2)
    with pytest.raises(ValueError, match="`valid`.*1 dimensions"):
        label_time_segments(torch.ones(2, 3, dtype=torch.long), num_segments=2)
    with pytest.raises(ValueError, match=r"`valid` lengths.*\[0, 3\]"):
        label_time_segments(torch.tensor([4, 1]), num_segments=2, num_chunks=3)
    with pytest.raises(ValueError, match="`valid` lengths"):
        label_time_segments(torch.tensor([-1, 1]), num_segments=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    f = torch.tensor([[0.0, 0.2, 0.9, 0.9, 0.3, 0.0, 0.0], [0.0, 0.6, 0.0, 0.2, 1.0, 0.0, 0.5]])
    valid = torch.tensor([[True] * 7, [True] * 6 + [False]])
    out = label_gripper_phases(f.cuda(), valid.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), label_gripper_phases(f, valid))
    g = torch.randn(3, 4, 8)
    torch.testing.assert_close(gripper_close_fraction(g.cuda()).cpu(), gripper_close_fraction(g))
    seg = label_time_segments(valid.cuda(), num_segments=3)
    torch.testing.assert_close(seg.cpu(), label_time_segments(valid, num_segments=3))


# ---------------------------------------------------------------- grasp onset (event-anchored)


def test_onset_enum_and_worked_example():
    assert [int(p) for p in OnsetPhase] == [0, 1, 2, 3, -1]
    assert NUM_ONSET_PHASES == len(OnsetPhase) - 1 == 4
    f = torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.9, 0.9, 0.0, 0.0, 1.0, 0.0]])
    names = [OnsetPhase(p).name for p in label_grasp_onset(f, lead=2)[0].tolist()]
    # The retry at t=8 is a consequence (HOLD), not a second onset.
    assert names == ["APPROACH", "APPROACH", "ONSET", "ONSET", "ONSET", "HOLD", "AFTER", "AFTER",
                     "HOLD", "AFTER"]


def test_onset_without_attempt_is_all_approach_and_lead_clips_at_start():
    f = torch.tensor([[0.0, 0.4, 0.0], [0.7, 0.0, 0.0]])
    out = label_grasp_onset(f, lead=3)
    assert out.tolist() == [[0, 0, 0], [1, 3, 3]]
    assert label_grasp_onset(torch.zeros(2, 0)).shape == (2, 0)


@settings(deadline=None, max_examples=120)
@given(traces(), st.integers(0, 4), st.sampled_from([0.0, 0.3, 0.5, 0.75, 1.0]))
def test_onset_matches_reference(batch, lead, active):
    f, valid = batch
    out = label_grasp_onset(f, valid, lead=lead, active=active)
    ref = label_grasp_onset_ref(f.numpy(), valid.numpy(), lead=lead, active=active)
    assert out.dtype == torch.int64
    np.testing.assert_array_equal(out.numpy(), ref)


@settings(deadline=None, max_examples=50)
@given(traces(), st.sampled_from([float("nan"), float("inf"), -3.0, 0.9]), st.integers(0, 3))
def test_onset_properties(batch, fill, lead):
    f, valid = batch
    out = label_grasp_onset(f, valid, lead=lead)
    assert ((out == -1) == ~valid).all()
    # Padding contents never matter; every trajectory has at most lead + 1 onset chunks, all
    # before any hold/after chunk; bf16 agrees on representable values.
    torch.testing.assert_close(
        label_grasp_onset(torch.where(valid, f, fill), valid, lead=lead), out
    )
    assert bool(((out == 1).sum(1) <= lead + 1).all())
    pos = torch.arange(f.shape[1]).expand_as(out)
    last_onset = torch.where(out == 1, pos, -1).amax(1)
    first_later = torch.where((out == 2) | (out == 3), pos, f.shape[1]).amin(1)
    assert bool((last_onset < first_later).all())
    g = (f * 8).round() / 8
    torch.testing.assert_close(
        label_grasp_onset(g.to(torch.bfloat16), valid, lead=lead), label_grasp_onset(g, valid, lead=lead)
    )


def test_onset_errors():
    f = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="`close_fraction`"):
        label_grasp_onset(f.long())
    with pytest.raises(ValueError, match="`close_fraction`.*2 dimensions"):
        label_grasp_onset(f[0])
    with pytest.raises(ValueError, match=r"`valid`.*\(2, 4\)"):
        label_grasp_onset(f, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`lead` must be >= 0, got -1"):
        label_grasp_onset(f, lead=-1)
    with pytest.raises(TypeError, match="`lead` must be an int, got float"):
        label_grasp_onset(f, lead=1.0)
    with pytest.raises(ValueError, match=r"`active` must lie in \[0.0, 1.0\], got 1.5"):
        label_grasp_onset(f, active=1.5)
    with pytest.raises(ValueError, match="`close_fraction`.*finite"):
        label_grasp_onset(torch.tensor([[0.0, float("nan")]]), validate_args=True)
    with pytest.raises(ValueError, match=r"`close_fraction`.*\[0, 1\]"):
        label_grasp_onset(torch.tensor([[0.0, 1.5]]), validate_args=True)
    label_grasp_onset(torch.tensor([[0.0, 1.5]]), torch.tensor([[True, False]]))
