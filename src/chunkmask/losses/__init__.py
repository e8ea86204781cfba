"""The losses, one family per module, all reduced by `chunkmask.aggregation.aggregate_loss`.

- `options`: the option groups every clipped loss shares (`Clip`, `Regularizers`, `Behaviour`);
- `surrogate`: the per-token clipped surrogate of Eq. (2) and the KL estimators;
- `policy`: the masked GRPO objective (Eq. 11) and chunk-level PPO, one computation;
- `decoupled`: the decoupled PPO loss for stale samples (the same computation, behaviour-weighted);
- `value`: the chunk-level value loss;
- `bc`: the self behaviour-cloning loss.

Every loss takes `logp` (or `values`) positionally and every other tensor by keyword, then
`selection=None, mask=None`: with a `Selection` the inputs are packed and trajectories are the
sequences; without one each row is a sequence. Every loss takes verl's data-parallel normalisers
as one `norms: LossNormalizers | None` keyword.
"""

from chunkmask.losses.bc import bc_loss
from chunkmask.losses.decoupled import decoupled_ppo_loss, interpolate_proximal_logp
from chunkmask.losses.options import KL_TYPES, Behaviour, Clip, Regularizers
from chunkmask.losses.policy import ESTIMATORS, PolicyLossOutput, chunked_ppo_loss, masked_grpo_loss
from chunkmask.losses.surrogate import SurrogateOutput, clipped_surrogate
from chunkmask.losses.value import value_loss

__all__ = [
    "Behaviour",
    "Clip",
    "ESTIMATORS",
    "KL_TYPES",
    "PolicyLossOutput",
    "Regularizers",
    "SurrogateOutput",
    "bc_loss",
    "chunked_ppo_loss",
    "clipped_surrogate",
    "decoupled_ppo_loss",
    "interpolate_proximal_logp",
    "masked_grpo_loss",
    "value_loss",
]
