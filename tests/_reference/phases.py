"""Slow, obviously correct float64 loop versions of `chunkmask.pcm` (test oracles)."""

import math

import numpy as np

APPROACH, PRE_GRASP, ACTIVE_GRIP, RELEASE_RAMP, TAIL, PAD = 0, 1, 2, 3, 4, -1


def close_fraction_ref(gripper, valid=None, close="positive", close_threshold=None):
    g = np.asarray(gripper, dtype=np.float64)
    n_traj, n_chunk, n_step = g.shape
    valid = np.ones((n_traj, n_chunk), bool) if valid is None else np.asarray(valid, bool)
    threshold = close_threshold
    if threshold is None:
        threshold = {"positive": 0.0, "zero": 0.5, "negative": 0.0}[close]
    out = np.zeros((n_traj, n_chunk))
    for i in range(n_traj):
        for t in range(n_chunk):
            if not valid[i, t]:
                continue
            closed = 0
            for h in range(n_step):
                v = g[i, t, h]
                if close == "positive":
                    closed += v > threshold
                elif close == "threshold":
                    closed += v >= threshold
                else:
                    closed += v < threshold
            out[i, t] = closed / n_step
    return out


def _sustained_intervals(f, valid, sustained):
    """Maximal runs [start, end] of consecutive valid chunks with f >= sustained."""
    runs = []
    t = 0
    n = len(f)
    while t < n:
        if valid[t] and f[t] >= sustained:
            start = t
            while t + 1 < n and valid[t + 1] and f[t + 1] >= sustained:
                t += 1
            runs.append((start, t))
        t += 1
    return runs


def label_gripper_phases_ref(
    close_fraction, valid=None, sustained=0.75, active=0.5, pre_min=0.1, tail_max=0.1, window=3
):
    """The App. E.2 rule, one trajectory and one chunk at a time, checked in priority order."""
    f_all = np.asarray(close_fraction, dtype=np.float64)
    n_traj, n_chunk = f_all.shape
    valid = np.ones((n_traj, n_chunk), bool) if valid is None else np.asarray(valid, bool)
    out = np.full((n_traj, n_chunk), PAD, dtype=np.int64)
    for i in range(n_traj):
        f, v = f_all[i], valid[i]
        runs = _sustained_intervals(f, v, sustained)
        final_release = runs[-1][1] if runs else None
        for t in range(n_chunk):
            if not v[t]:
                continue
            x = f[t]
            before_some_grasp = any(s - window <= t <= s - 1 for s, _ in runs)
            after_some_grasp = any(e + 1 <= t <= e + window for _, e in runs)
            if x >= active:
                out[i, t] = ACTIVE_GRIP
            elif before_some_grasp and x >= pre_min:
                out[i, t] = PRE_GRASP
            elif after_some_grasp:
                out[i, t] = RELEASE_RAMP
            elif final_release is not None and t > final_release and x < tail_max:
                out[i, t] = TAIL
            else:
                out[i, t] = APPROACH
    return out


def label_time_segments_ref(valid, num_segments):
    valid = np.asarray(valid, bool)
    out = np.full(valid.shape, PAD, dtype=np.int64)
    for i in range(valid.shape[0]):
        length = int(valid[i].sum())
        rank = 0
        for t in range(valid.shape[1]):
            if valid[i, t]:
                out[i, t] = math.floor(rank * num_segments / length)
                rank += 1
    return out


def label_grasp_onset_ref(f, valid, *, lead=2, active=0.5):
    """Loop restatement of `label_grasp_onset`: 0 approach, 1 onset, 2 hold, 3 after, -1 pad."""
    n_traj, n_chunk = f.shape
    out = np.full((n_traj, n_chunk), -1, dtype=np.int64)
    for i in range(n_traj):
        first = None
        for t in range(n_chunk):
            if valid[i, t] and f[i, t] >= active:
                first = t
                break
        for t in range(n_chunk):
            if not valid[i, t]:
                continue
            if first is None or t < first - lead:
                out[i, t] = 0
            elif t <= first:
                out[i, t] = 1
            elif f[i, t] >= active:
                out[i, t] = 2
            else:
                out[i, t] = 3
    return out
