"""chunkmask: spend RL gradient compute only on the action chunks where outcomes diverge."""

from chunkmask.selection import Selection
from chunkmask.shrinking import shrink, unshrink

__version__ = "0.1.0"

__all__ = [
    "Selection",
    "__version__",
    "shrink",
    "unshrink",
]
