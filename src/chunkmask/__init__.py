"""chunkmask: spend RL gradient compute only on the action chunks where outcomes diverge.

The top level holds the names of the training loop; the rest lives in sub-packages named by
the data flow: `pcm` (phases -> scores -> allocation -> sampling, the masker), `batch`
(`Selection`, `shrink`), `losses`, `offpolicy`, `selfbc`, `baselines` and `eval`.
"""

from chunkmask import baselines, batch, eval, losses, offpolicy, pcm, selfbc  # noqa: F401
from chunkmask.action_tokenizer import ActionTokenizer
from chunkmask.advantages import (
    chunk_gae,
    group_relative_advantages,
)
from chunkmask.aggregation import (
    LossNormalizers,
    aggregate_loss,
    loss_normalizers,
)
from chunkmask.batch import Selection, shrink, unshrink
from chunkmask.log_probs import chunk_log_prob
from chunkmask.losses import (
    Behaviour,
    Clip,
    PolicyLossOutput,
    Regularizers,
    bc_loss,
    chunked_ppo_loss,
    clipped_surrogate,
    decoupled_ppo_loss,
    masked_grpo_loss,
    value_loss,
)
from chunkmask.pcm import (
    NUM_PHASES,
    ChunkBudget,
    PhaseLabelling,
    PhaseScoring,
    PhaseUpdate,
    ProbabilisticChunkMasker,
    gripper_close_fraction,
    keep_probabilities,
    label_gripper_phases,
    plackett_luce_sample,
    pps_sample,
    success_failure_variance,
)
from chunkmask.selectors import (
    SelectorInputs,
    available_selectors,
    get_selector,
    register_selector,
)

__version__ = "0.1.0"

__all__ = [
    "ActionTokenizer",
    "Behaviour",
    "ChunkBudget",
    "Clip",
    "LossNormalizers",
    "NUM_PHASES",
    "PhaseLabelling",
    "PhaseScoring",
    "PhaseUpdate",
    "PolicyLossOutput",
    "ProbabilisticChunkMasker",
    "Regularizers",
    "Selection",
    "SelectorInputs",
    "__version__",
    "aggregate_loss",
    "available_selectors",
    "bc_loss",
    "chunk_gae",
    "chunk_log_prob",
    "chunked_ppo_loss",
    "clipped_surrogate",
    "decoupled_ppo_loss",
    "get_selector",
    "gripper_close_fraction",
    "group_relative_advantages",
    "keep_probabilities",
    "label_gripper_phases",
    "loss_normalizers",
    "masked_grpo_loss",
    "plackett_luce_sample",
    "pps_sample",
    "register_selector",
    "shrink",
    "success_failure_variance",
    "unshrink",
    "value_loss",
]
