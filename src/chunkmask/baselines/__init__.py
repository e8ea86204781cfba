"""The competing selection rules the studies compare PCM against: dynamic sampling, PODS, high-entropy tokens."""

from chunkmask.baselines._dynamic_sampling import dynamic_sampling_mask
from chunkmask.baselines._rollout_downsampling import max_variance_downsample
from chunkmask.baselines._token_selection import high_entropy_token_mask

__all__ = [
    "dynamic_sampling_mask",
    "high_entropy_token_mask",
    "max_variance_downsample",
]
