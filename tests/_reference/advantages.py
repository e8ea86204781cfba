"""Slow loop oracle for group-relative advantages (float64, one group at a time)."""

import math


def group_relative_advantages(rewards, group, *, eps=1e-6, scale_by_std=True, valid=None):
    """Eq. (1) with chunkmask's conventions, as plain Python; returns a list of floats."""
    n = len(rewards)
    valid = [True] * n if valid is None else [bool(v) for v in valid]
    out = [0.0] * n
    for label in set(int(g) for g in group):
        members = [i for i in range(n) if int(group[i]) == label and valid[i]]
        values = [float(rewards[i]) for i in members]
        if len(values) < 2 or max(values) == min(values):
            continue
        mean = math.fsum(values) / len(values)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for i, v in zip(members, values, strict=True):
            out[i] = (v - mean) / (std + eps) if scale_by_std else v - mean
    return out
