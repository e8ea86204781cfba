"""Measuring a method: paired statistics, selector diagnostics from gradients, and profiling helpers."""

from chunkmask.eval._diagnostics import (
    GradientSketch,
    PhaseShares,
    SelectorStatistics,
    gradient_cosine,
    phase_shares,
    selector_statistics,
)
from chunkmask.eval._profiling import (
    CudaPeakMemory,
    FlopCount,
    SavedTensorCounter,
    Timing,
    count_flops,
    time_function,
)
from chunkmask.eval._stats import (
    BinomialInterval,
    EquivalenceTest,
    PairedDifference,
    binomial_interval,
    equivalence_test,
    holm_adjust,
    paired_difference,
    pairs_for_halfwidth,
)

__all__ = [
    "BinomialInterval",
    "CudaPeakMemory",
    "EquivalenceTest",
    "FlopCount",
    "GradientSketch",
    "PairedDifference",
    "PhaseShares",
    "SavedTensorCounter",
    "SelectorStatistics",
    "Timing",
    "binomial_interval",
    "count_flops",
    "equivalence_test",
    "gradient_cosine",
    "holm_adjust",
    "paired_difference",
    "pairs_for_halfwidth",
    "phase_shares",
    "selector_statistics",
    "time_function",
]
