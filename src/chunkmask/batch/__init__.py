"""The selection every sampler returns and the batch it defines.

`Selection`; `shrink` / `unshrink` (packed `(M, ...)`); `gather_chunks` / `scatter_chunks`
(fixed-shape `(traj, k, ...)`); `horvitz_thompson_weights` / `fold_into_advantages` (the
Horvitz-Thompson estimator folded into the advantages, for trainers whose loss takes a bool mask).
"""

from chunkmask.batch._fold import fold_into_advantages, horvitz_thompson_weights
from chunkmask.batch._gather import gather_chunks, scatter_chunks
from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import shrink, unshrink

__all__ = [
    "Selection",
    "fold_into_advantages",
    "gather_chunks",
    "horvitz_thompson_weights",
    "scatter_chunks",
    "shrink",
    "unshrink",
]
