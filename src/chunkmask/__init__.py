"""chunkmask: spend RL gradient compute only on the action chunks where outcomes diverge."""

from chunkmask.action_tokenizer import ActionTokenizer
from chunkmask.advantages import (
    ChunkGAEOutput,
    chunk_gae,
    chunk_rewards,
    group_relative_advantages,
    whiten_advantages,
)
from chunkmask.aggregation import (
    AGGREGATION_MODES,
    LossNormalizers,
    aggregate_loss,
    loss_normalizers,
)
from chunkmask.allocation import (
    BudgetSuggestion,
    advantage_aware_budgets,
    keep_probabilities,
    neyman_allocation,
    neyman_allocation_continuous,
    suggest_budget,
)
from chunkmask.bc_weights import (
    BCWeight,
    ConstantBCWeight,
    LossBalanceBCWeight,
    ProductBCWeight,
    SuccessRateBCWeight,
)
from chunkmask.diagnostics import (
    GradientSketch,
    PhaseShares,
    SelectorStatistics,
    gradient_cosine,
    phase_shares,
    selector_statistics,
)
from chunkmask.dynamic_sampling import dynamic_sampling_mask
from chunkmask.inclusion import inclusion_probabilities
from chunkmask.log_probs import chunk_log_prob
from chunkmask.losses import (
    Behaviour,
    Clip,
    PolicyLossOutput,
    Regularizers,
    SurrogateOutput,
    bc_loss,
    chunked_ppo_loss,
    clipped_surrogate,
    decoupled_ppo_loss,
    interpolate_proximal_logp,
    masked_grpo_loss,
    value_loss,
)
from chunkmask.masker import (
    ChunkBudget,
    PhaseLabelling,
    PhaseScoring,
    PhaseUpdate,
    ProbabilisticChunkMasker,
)
from chunkmask.optim_config import OptimConfig
from chunkmask.phases import (
    NUM_ONSET_PHASES,
    NUM_PHASES,
    OnsetPhase,
    Phase,
    gripper_close_fraction,
    label_grasp_onset,
    label_gripper_phases,
    label_time_segments,
)
from chunkmask.pps import chunk_score_norm, pps_inclusion, pps_sample
from chunkmask.profiling import (
    CudaPeakMemory,
    FlopCount,
    SavedTensorCounter,
    Timing,
    count_flops,
    time_function,
)
from chunkmask.rollout_downsampling import max_variance_downsample
from chunkmask.sampling import (
    plackett_luce_sample,
    stratified_sample,
    top_phase_sample,
    topk_sample,
    uniform_sample,
)
from chunkmask.score_buffer import PhaseScoreBuffer
from chunkmask.scores import PhaseVariance, success_failure_variance
from chunkmask.selection import Selection
from chunkmask.selectors import (
    GENERIC_SELECTORS,
    SelectorInputs,
    available_selectors,
    get_selector,
    register_selector,
    unregister_selector,
)
from chunkmask.shrinking import shrink, unshrink
from chunkmask.staleness import StalenessGate, staleness, staleness_filter
from chunkmask.stats import (
    BinomialInterval,
    EquivalenceTest,
    PairedDifference,
    binomial_interval,
    equivalence_test,
    paired_difference,
    pairs_for_halfwidth,
)
from chunkmask.success_buffer import (
    AdmitSuccessful,
    EntryInfo,
    EvictOldest,
    EvictSlowest,
    SuccessBuffer,
)
from chunkmask.token_selection import high_entropy_token_mask

__version__ = "0.1.0"

__all__ = [
    "AGGREGATION_MODES",
    "ActionTokenizer",
    "AdmitSuccessful",
    "BCWeight",
    "Behaviour",
    "BinomialInterval",
    "BudgetSuggestion",
    "ChunkBudget",
    "ChunkGAEOutput",
    "Clip",
    "ConstantBCWeight",
    "CudaPeakMemory",
    "EntryInfo",
    "EquivalenceTest",
    "EvictOldest",
    "EvictSlowest",
    "FlopCount",
    "GENERIC_SELECTORS",
    "GradientSketch",
    "LossBalanceBCWeight",
    "LossNormalizers",
    "NUM_ONSET_PHASES",
    "NUM_PHASES",
    "OnsetPhase",
    "OptimConfig",
    "PairedDifference",
    "Phase",
    "PhaseLabelling",
    "PhaseScoreBuffer",
    "PhaseScoring",
    "PhaseShares",
    "PhaseUpdate",
    "PhaseVariance",
    "PolicyLossOutput",
    "ProbabilisticChunkMasker",
    "ProductBCWeight",
    "Regularizers",
    "SavedTensorCounter",
    "Selection",
    "SelectorInputs",
    "SelectorStatistics",
    "StalenessGate",
    "SuccessBuffer",
    "SuccessRateBCWeight",
    "SurrogateOutput",
    "Timing",
    "__version__",
    "advantage_aware_budgets",
    "aggregate_loss",
    "available_selectors",
    "bc_loss",
    "binomial_interval",
    "chunk_gae",
    "chunk_log_prob",
    "chunk_rewards",
    "chunk_score_norm",
    "chunked_ppo_loss",
    "clipped_surrogate",
    "count_flops",
    "decoupled_ppo_loss",
    "dynamic_sampling_mask",
    "equivalence_test",
    "get_selector",
    "gradient_cosine",
    "gripper_close_fraction",
    "group_relative_advantages",
    "high_entropy_token_mask",
    "inclusion_probabilities",
    "interpolate_proximal_logp",
    "keep_probabilities",
    "label_grasp_onset",
    "label_gripper_phases",
    "label_time_segments",
    "loss_normalizers",
    "masked_grpo_loss",
    "max_variance_downsample",
    "neyman_allocation",
    "neyman_allocation_continuous",
    "paired_difference",
    "pairs_for_halfwidth",
    "phase_shares",
    "plackett_luce_sample",
    "pps_inclusion",
    "pps_sample",
    "register_selector",
    "selector_statistics",
    "shrink",
    "staleness",
    "staleness_filter",
    "stratified_sample",
    "success_failure_variance",
    "suggest_budget",
    "time_function",
    "top_phase_sample",
    "topk_sample",
    "uniform_sample",
    "unregister_selector",
    "unshrink",
    "value_loss",
    "whiten_advantages",
]
