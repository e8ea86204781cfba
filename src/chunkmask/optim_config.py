"""`OptimConfig`: the optimisation fields that every trainer's configuration shares.

The testbed's `TrainConfig` and the asynchronous pipeline's `PipelineConfig` both derive from
it, so the learning rate, the gradient clip, the sampling temperature and the surrogate clip
have one definition, one set of defaults and one validation.
"""

from dataclasses import dataclass

from chunkmask._checks import check_range
from chunkmask.losses import Clip


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and surrogate-clip settings of a GRPO/PPO actor update (keyword-only fields).

    Attributes:
        temperature: sampling temperature of rollouts and of the learner's log-probabilities.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        clip_low: surrogate clip `eps_low`, in `[0, 1)`.
        clip_high: surrogate clip `eps_high`. The default 0.4 is the CPU testbed's tuned value
            (chosen with its other defaults in short exploratory GRPO runs, see the testbed
            docs), wider than the library's `Clip` default of 0.28 (DAPO's clip-higher, as in
            RLinf and SimpleVLA-RL). `clip` builds the loss's `Clip` from both fields.

    Example:
        >>> OptimConfig(lr=1e-4).clip
        Clip(low=0.2, high=0.4, dual=None, log_ratio_clamp=20.0)
    """

    temperature: float = 1.0
    lr: float = 3e-5
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    clip_low: float = 0.2
    clip_high: float = 0.4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError`/`TypeError` naming the first field that is out of range."""
        for name in ("temperature", "lr", "grad_clip", "clip_high"):
            check_range(getattr(self, name), name, low=0.0, low_open=True)
        check_range(self.weight_decay, "weight_decay", low=0.0)
        check_range(self.clip_low, "clip_low", low=0.0, high=1.0, high_open=True)

    @property
    def clip(self) -> Clip:
        """The loss's `Clip` from `clip_low` and `clip_high`."""
        return Clip(low=self.clip_low, high=self.clip_high)
