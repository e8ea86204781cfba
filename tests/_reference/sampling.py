"""Slow, obviously correct float64 oracles for `chunkmask.pcm` (Python loops, enumeration)."""

import itertools
from collections import defaultdict


def ordered_outcome_probabilities(weights, k):
    """Exact probability of every ordered Plackett-Luce draw of `min(k, #positive)` items.

    `weights` is a sequence of non-negative numbers; zero weights are never drawn.
    Returns a dict mapping a tuple of indices (in draw order) to its probability (Eq. 10).
    """
    items = [i for i, w in enumerate(weights) if w > 0]
    size = min(k, len(items))
    out = {}
    for seq in itertools.permutations(items, size):
        prob = 1.0
        remaining = sum(float(weights[i]) for i in items)
        for i in seq:
            prob *= float(weights[i]) / remaining
            remaining -= float(weights[i])
        out[seq] = prob
    return out


def set_probabilities(weights, k):
    """Exact probability of every unordered selected set, as a dict sorted-tuple -> probability."""
    out = defaultdict(float)
    for seq, prob in ordered_outcome_probabilities(weights, k).items():
        out[tuple(sorted(seq))] += prob
    return dict(out)


def inclusion_probabilities_enum(weights, k):
    """Exact inclusion probabilities P(t in S) by enumeration of ordered outcomes."""
    pi = [0.0] * len(weights)
    for seq, prob in ordered_outcome_probabilities(weights, k).items():
        for i in seq:
            pi[i] += prob
    return pi


def topk_reference(scores, valid, k):
    """Indices of the `k` highest valid scores (ties to the lower index), ascending."""
    candidates = [i for i in range(len(scores)) if valid[i]]
    candidates.sort(key=lambda i: (-float(scores[i]), i))
    return sorted(candidates[:k])
