"""Slow, obviously correct float64 loop versions of `chunkmask.pcm` (test oracles)."""

import numpy as np


def success_failure_variance_ref(
    features, phases, success, group, num_phases, valid=None, weighting="uniform"
):
    """Eq. 5 one group and one phase at a time.

    Returns (scores[C], defined[C], group_scores[G, C], group_defined[G, C]) with groups in
    ascending label order.
    """
    x = np.asarray(features, dtype=np.float64)
    n_traj, n_chunk = x.shape[:2]
    x = x.reshape(n_traj, n_chunk, -1)
    phases = np.asarray(phases)
    success = np.asarray(success, bool)
    group = np.asarray(group)
    valid = np.ones((n_traj, n_chunk), bool) if valid is None else np.asarray(valid, bool)
    labels = sorted(set(group.tolist()))
    gs = np.zeros((len(labels), num_phases))
    gd = np.zeros((len(labels), num_phases), bool)
    weights = np.zeros(len(labels))
    for gi, label in enumerate(labels):
        members = [i for i in range(n_traj) if group[i] == label]
        p = sum(success[i] for i in members) / len(members)
        weights[gi] = 1.0 if weighting == "uniform" else p * (1 - p)
        for c in range(num_phases):
            pos, neg = [], []
            for i in members:
                for t in range(n_chunk):
                    if valid[i, t] and phases[i, t] == c:
                        (pos if success[i] else neg).append(x[i, t])
            if pos and neg:
                diff = np.mean(pos, axis=0) - np.mean(neg, axis=0)
                gs[gi, c] = float(np.mean(diff**2))
                gd[gi, c] = True
    scores = np.zeros(num_phases)
    defined = np.zeros(num_phases, bool)
    for c in range(num_phases):
        num = den = 0.0
        for gi in range(len(labels)):
            if gd[gi, c]:
                num += weights[gi] * gs[gi, c]
                den += weights[gi]
                defined[c] = True
        if defined[c]:
            scores[c] = num / den
    return scores, defined, gs, gd


def keep_probabilities_ref(scores, defined, p_min, power):
    """Eq. 8-9 by loops; no information (nothing defined or all zero) -> all ones."""
    c = len(scores)
    total = sum(scores[j] for j in range(c) if defined[j])
    if total <= 0:
        return np.ones(c)
    share = [scores[j] / total if defined[j] else 0.0 for j in range(c)]
    top = max(share[j] for j in range(c) if defined[j])
    out = np.empty(c)
    for j in range(c):
        out[j] = max(p_min, (share[j] / top) ** power) if defined[j] else p_min
    return out


class PhaseScoreBufferRef:
    """The buffer as a list of per-step scores. `update` takes one (scores, defined, weight) per
    rank and combines them as the weighted mean over ranks where defined. `window="weighted"`
    averages a phase's steps by their summed weight; a phase with less summed weight than
    `min_groups` is undefined."""

    def __init__(self, num_phases, refresh_every=5, p_min=0.1, power=1.0, window="steps",
                 min_groups=0.0):
        self.c, self.k, self.p_min, self.power = num_phases, refresh_every, p_min, power
        self.window, self.min_groups = window, min_groups
        self.steps = []  # list of (score list, defined list, weight list)
        self.keep = np.ones(num_phases)
        self.n = 0

    def update(self, per_rank):
        step_scores, step_defined, step_weight = [], [], []
        for j in range(self.c):
            num = den = 0.0
            for scores, defined, weight in per_rank:
                w = 1.0 if weight is None else float(weight[j])
                if defined[j] and w > 0:
                    num += w * float(scores[j])
                    den += w
            step_defined.append(den > 0)
            step_scores.append(num / den if den > 0 else 0.0)
            step_weight.append(den)
        self.n += 1
        self.steps.append((step_scores, step_defined, step_weight))
        if self.n == 1:
            dfn = [d and w >= self.min_groups for d, w in zip(step_defined, step_weight, strict=True)]
            if any(dfn):
                self.keep = keep_probabilities_ref(step_scores, dfn, self.p_min, self.power)
        if len(self.steps) == self.k:
            mean, dfn = [], []
            for j in range(self.c):
                rows = [(s[j], w[j]) for s, d, w in self.steps if d[j]]
                support = sum(w for _, w in rows)
                dfn.append(bool(rows) and support >= self.min_groups)
                if not dfn[-1]:
                    mean.append(0.0)
                elif self.window == "weighted":
                    mean.append(sum(v * w for v, w in rows) / support)
                else:
                    mean.append(sum(v for v, _ in rows) / len(rows))
            if any(dfn):
                self.keep = keep_probabilities_ref(mean, dfn, self.p_min, self.power)
            self.steps = []
        return self.keep.copy()
