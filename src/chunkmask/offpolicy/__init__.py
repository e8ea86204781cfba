"""Policy versions and staleness for asynchronous training (the decoupled loss lives in `chunkmask.losses`)."""

from chunkmask.offpolicy._staleness import StalenessGate, staleness, staleness_filter

__all__ = [
    "StalenessGate",
    "staleness",
    "staleness_filter",
]
