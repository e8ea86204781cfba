"""The selection every sampler returns and the packed batch it defines: `Selection`, `shrink`, `unshrink`."""

from chunkmask.batch._selection import Selection
from chunkmask.batch._shrinking import shrink, unshrink

__all__ = [
    "Selection",
    "shrink",
    "unshrink",
]
