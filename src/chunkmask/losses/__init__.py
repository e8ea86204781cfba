"""The losses, one family per module, all reduced by `chunkmask.aggregation.aggregate_loss`.

- `surrogate`: the per-token clipped surrogate of Eq. (2) and the KL estimators;
- `policy`: the masked GRPO objective (Eq. 11) and chunk-level PPO, one computation;
- `decoupled`: the decoupled PPO loss for stale samples (asynchronous training);
- `value`: the chunk-level value loss;
- `bc`: the self behaviour-cloning loss.

Every loss takes `(tensors..., selection=None, mask=None, *, ...)`: with a `Selection` the inputs
are packed and trajectories are the sequences; without one each row is a sequence. Every loss
takes verl's data-parallel normalisers (`dp_size`, `batch_num_tokens`, `global_batch_size`,
`loss_scale_factor`).
"""

from chunkmask.losses.bc import bc_loss
from chunkmask.losses.decoupled import (
    DecoupledPPOLossOutput,
    decoupled_ppo_loss,
    interpolate_proximal_logp,
)
from chunkmask.losses.policy import ESTIMATORS, PolicyLossOutput, chunked_ppo_loss, masked_grpo_loss
from chunkmask.losses.surrogate import KL_TYPES, SurrogateOutput, clipped_surrogate
from chunkmask.losses.value import value_loss

__all__ = [
    "DecoupledPPOLossOutput",
    "ESTIMATORS",
    "KL_TYPES",
    "PolicyLossOutput",
    "SurrogateOutput",
    "bc_loss",
    "chunked_ppo_loss",
    "clipped_surrogate",
    "decoupled_ppo_loss",
    "interpolate_proximal_logp",
    "masked_grpo_loss",
    "value_loss",
]
