"""Probabilistic Chunk Masking, in the order the data flows: phases -> scores -> allocation -> sampling, and the masker that composes them."""

from chunkmask.pcm._allocation import (
    BudgetSuggestion,
    advantage_aware_budgets,
    keep_probabilities,
    neyman_allocation,
    neyman_allocation_continuous,
    suggest_budget,
)
from chunkmask.pcm._inclusion import inclusion_probabilities
from chunkmask.pcm._masker import (
    ChunkBudget,
    PhaseLabelling,
    PhaseScoring,
    PhaseUpdate,
    ProbabilisticChunkMasker,
)
from chunkmask.pcm._phases import (
    NUM_ONSET_PHASES,
    NUM_PHASES,
    OnsetPhase,
    Phase,
    gripper_close_fraction,
    label_grasp_onset,
    label_gripper_phases,
    label_time_segments,
)
from chunkmask.pcm._pps import chunk_score_norm, pps_inclusion, pps_sample
from chunkmask.pcm._sampling import (
    plackett_luce_sample,
    stratified_sample,
    top_phase_sample,
    topk_sample,
    uniform_sample,
)
from chunkmask.pcm._score_buffer import PhaseScoreBuffer
from chunkmask.pcm._scores import PhaseVariance, success_failure_variance

__all__ = [
    "BudgetSuggestion",
    "ChunkBudget",
    "NUM_ONSET_PHASES",
    "NUM_PHASES",
    "OnsetPhase",
    "Phase",
    "PhaseLabelling",
    "PhaseScoreBuffer",
    "PhaseScoring",
    "PhaseUpdate",
    "PhaseVariance",
    "ProbabilisticChunkMasker",
    "advantage_aware_budgets",
    "chunk_score_norm",
    "gripper_close_fraction",
    "inclusion_probabilities",
    "keep_probabilities",
    "label_grasp_onset",
    "label_gripper_phases",
    "label_time_segments",
    "neyman_allocation",
    "neyman_allocation_continuous",
    "plackett_luce_sample",
    "pps_inclusion",
    "pps_sample",
    "stratified_sample",
    "success_failure_variance",
    "suggest_budget",
    "top_phase_sample",
    "topk_sample",
    "uniform_sample",
]
