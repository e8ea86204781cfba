"""Slow, obviously correct shrink/unshrink: loops over trajectories and chunks."""

import torch


def selected_chunks(chunk_mask):
    """List of (traj, chunk) pairs in packed order for a dense bool mask."""
    pairs = []
    for i in range(chunk_mask.shape[0]):
        for t in range(chunk_mask.shape[1]):
            if bool(chunk_mask[i, t]):
                pairs.append((i, t))
    return pairs


def shrink_reference(x, chunk_mask):
    pairs = selected_chunks(chunk_mask)
    if x.ndim == 1:
        items = [x[i] for i, _ in pairs]
    else:
        items = [x[i, t] for i, t in pairs]
    if not items:
        return x.new_zeros((0, *x.shape[2:])) if x.ndim > 1 else x.new_zeros(0)
    return torch.stack(items)


def unshrink_reference(packed, chunk_mask, fill):
    pairs = selected_chunks(chunk_mask)
    out = packed.new_full((*chunk_mask.shape, *packed.shape[1:]), fill)
    for p, (i, t) in enumerate(pairs):
        out[i, t] = packed[p]
    return out
