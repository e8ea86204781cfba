"""`ProbabilisticChunkMasker`: the thin stateful drop-in that composes the PCM primitives.

It adds no math of its own. Per training step it runs, in order: phase labelling
(`gripper_close_fraction`, `label_gripper_phases`), the success-failure action variance
(`success_failure_variance`, Eq. 5), the online phase-score buffer (`PhaseScoreBuffer`, Eq. 7-9),
the chunk weights `w_{i,t} = p_{phi(i,t)}`, and Plackett-Luce sampling of a fixed budget
(`plackett_luce_sample`, Eq. 10). Its only state is the score buffer and the random generator.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int64, Real
from torch import Tensor

from chunkmask._checks import (
    check_option,
    check_positive_int,
    check_tensor,
    resolve_valid,
)
from chunkmask.phases import NUM_PHASES, gripper_close_fraction, label_gripper_phases
from chunkmask.sampling import inclusion_probabilities, plackett_luce_sample
from chunkmask.scores import PhaseScoreBuffer, success_failure_variance
from chunkmask.selection import Selection


class MaskerInfo(NamedTuple):
    """Diagnostics of one `ProbabilisticChunkMasker.select` call (all tensors, no host syncs).

    Attributes:
        phases: `(traj, N)` int64 phase id of every chunk (`Phase.PAD` = -1 at padding).
        keep_probabilities: `(phase,)` keep probabilities `p_c` used for this draw (Eq. 9).
        scores: `(phase,)` this batch's success-failure variance `V_c` (Eq. 5), 0 where undefined.
        defined: `(phase,)` bool, whether `V_c` was defined in this batch.
        weights: `(traj, N)` chunk weights `w_{i,t} = p_{phi(i,t)}`, 0 at padding.
        selected_per_phase: `(phase,)` number of selected chunks of each phase over the batch
            (the realised allocation, Fig. 6 of the paper).
        available_per_phase: `(phase,)` number of valid chunks of each phase over the batch.
        inclusion: `(traj, N)` float64 exact inclusion probabilities `pi_{i,t}`, or None unless
            the masker was built with `inclusion=True`.
    """

    phases: Int64[Tensor, "traj chunk"]
    keep_probabilities: Float[Tensor, " phase"]
    scores: Float[Tensor, " phase"]
    defined: Bool[Tensor, " phase"]
    weights: Float[Tensor, "traj chunk"]
    selected_per_phase: Int64[Tensor, " phase"]
    available_per_phase: Int64[Tensor, " phase"]
    inclusion: Float[Tensor, "traj chunk"] | None


class ProbabilisticChunkMasker:
    r"""Select a fixed budget of chunks per trajectory, weighted by online phase scores (PCM).

    One call of `select` implements Sec. 4.3-4.5 of Anonymous et al. (2026), Probabilistic Chunk
    Masking, arXiv 2605.16154:

    $$
    V_c \;(\text{Eq. 5}) \;\to\; p_c = \max\Big(p_{\min}, \frac{s_c}{\max_{c'} s_{c'}}\Big),\;
    s_c = \frac{\bar V_c}{\sum_{c'} \bar V_{c'}} \;(\text{Eq. 7-9}) \;\to\;
    w_{i,t} = p_{\phi(i,t)} \;\to\; S_i \sim \mathrm{PL}(w_{i,\cdot}, B) \;(\text{Eq. 10}).
    $$

    Phases come from, in order of precedence: the `phases` argument of `select`; the masker's
    `labeler` applied to the gripper commands; or the App. E.2 gripper rule
    (`label_gripper_phases`) on `gripper_close_fraction(gripper, close=close)`. When `gripper` is
    not given, the last action dimension is taken as the gripper command (LIBERO and MetaWorld
    put it last).

    Args:
        budget: chunks to keep per trajectory, `B` (the paper uses 12 of 64).
        num_phases: number of phases; `NUM_PHASES` (5) for the gripper rule.
        refresh_every: `K`, steps between keep-probability refreshes (Eq. 7).
        p_min: the keep-probability floor of Eq. 9.
        power: exponent on the normalised score (0.5 gives exact Neyman when `V` is proportional
            to `sigma^2`).
        weighting: `"uniform"` averages `V_{c,g}` over groups as in Eq. 5; `"balance"` weights each
            group by `p(1-p)`.
        close: the gripper convention passed to `gripper_close_fraction`.
        close_threshold: the threshold passed to `gripper_close_fraction`.
        labeler: optional callable `labeler(gripper, valid) -> phases (traj, N) int64` replacing
            the gripper rule.
        inclusion: also return the exact inclusion probabilities `pi` (for the Horvitz-Thompson
            estimator of `masked_grpo_loss`); costs a few hundred ms at 80 x 64 on one CPU core.
        seed: seed of the masker's own CPU generator (ignored when `generator` is given).
        generator: a `torch.Generator` to draw with.
        process_group: a `torch.distributed` group; the score buffer all-reduces its statistics
            over it so that every rank holds identical keep probabilities. Each rank's `V_c` is
            weighted by its number of defined groups, so that the reduced score equals the score
            of the union batch when every group's rollouts sit on one rank.
        validate_args: run the value checks of the primitives on the user's inputs (finite
            actions, phase ids in range); they synchronise with the device once per call.

    Raises:
        ValueError: if `budget`, `num_phases` or `refresh_every` is not a positive int, `p_min`
            lies outside (0, 1], `power` is not positive, or `weighting` is unknown.
        TypeError: if `labeler` is not callable or `generator` is not a `torch.Generator`.

    Examples:
        >>> import torch
        >>> from chunkmask import ProbabilisticChunkMasker
        >>> g = torch.Generator().manual_seed(0)
        >>> actions = torch.randn(4, 6, 2, 3, generator=g)  # (traj, chunk, step, dim)
        >>> actions[..., -1] = torch.tensor([-1.0, -1, 1, 1, 1, -1]).view(1, 6, 1)  # gripper
        >>> masker = ProbabilisticChunkMasker(budget=2, seed=0)
        >>> sel, info = masker.select(actions=actions, success=torch.tensor([True, False, True, False]),
        ...                           group=torch.tensor([0, 0, 1, 1]))
        >>> sel.indices.shape, sel.counts.tolist()
        (torch.Size([4, 2]), [2, 2, 2, 2])
    """

    def __init__(
        self,
        budget: int,
        num_phases: int = NUM_PHASES,
        *,
        refresh_every: int = 5,
        p_min: float = 0.1,
        power: float = 1.0,
        weighting: Literal["uniform", "balance"] = "uniform",
        close: Literal["positive", "zero", "negative", "threshold"] = "positive",
        close_threshold: float | None = None,
        labeler: Callable[[Tensor, Tensor], Tensor] | None = None,
        inclusion: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        process_group: Any = None,
        validate_args: bool = True,
    ) -> None:
        self.budget = check_positive_int(budget, "budget")
        self.num_phases = check_positive_int(num_phases, "num_phases")
        self.weighting = check_option(weighting, "weighting", ("uniform", "balance"))
        if labeler is not None and not callable(labeler):
            raise TypeError(f"`labeler` must be callable, got {type(labeler).__name__}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}."
            )
        self.close = close
        self.close_threshold = close_threshold
        # Fail on a nonsensical gripper convention now rather than at the first step.
        gripper_close_fraction(torch.zeros(1, 1, 1), close=close, threshold=close_threshold)
        self.labeler = labeler
        self.inclusion = bool(inclusion)
        self.validate_args = bool(validate_args)
        self.distributed = process_group is not None
        self.buffer = PhaseScoreBuffer(
            self.num_phases,
            refresh_every=refresh_every,
            p_min=p_min,
            power=power,
            process_group=process_group,
        )
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        self.generator = generator

    @property
    def keep_probabilities(self) -> Tensor:
        """The current per-phase keep probabilities `p_c` (all ones before the first `select`)."""
        return self.buffer.keep_probabilities

    def label(
        self,
        actions: Real[Tensor, "traj chunk *rest"] | None = None,
        gripper: Real[Tensor, "traj chunk step"] | None = None,
        valid: Bool[Tensor, "traj chunk"] | None = None,
    ) -> Int64[Tensor, "traj chunk"]:
        """Phase ids of every chunk from the gripper commands (or the last action dim).

        Args:
            actions: `(traj, N, H, D)` actions whose last dim is the gripper, used if `gripper`
                is None.
            gripper: `(traj, N, H)` gripper commands.
            valid: `(traj, N)` bool mask of real chunks.

        Returns:
            `(traj, N)` int64 phase ids, `Phase.PAD` (-1) at padding.

        Raises:
            ValueError: if neither `actions` nor `gripper` is given, or `actions` is not 4-D
                when `gripper` is None.
        """
        if gripper is None:
            if actions is None:
                raise ValueError(
                    "`gripper` or `actions` must be given to label phases, got neither."
                )
            check_tensor(actions, "actions", ndim=4, dtypes="float")
            gripper = actions[..., -1]
        if self.labeler is not None:
            valid = resolve_valid(valid, gripper, ref_name="gripper")
            return self.labeler(gripper, valid)
        fraction = gripper_close_fraction(
            gripper, valid, close=self.close, threshold=self.close_threshold
        )
        return label_gripper_phases(fraction, valid, validate_args=self.validate_args)

    def select(
        self,
        *,
        actions: Real[Tensor, "traj chunk *rest"],
        success: Bool[Tensor, " traj"],
        group: Int64[Tensor, " traj"],
        valid: Bool[Tensor, "traj chunk"] | None = None,
        gripper: Real[Tensor, "traj chunk step"] | None = None,
        phases: Int64[Tensor, "traj chunk"] | None = None,
    ) -> tuple[Selection, MaskerInfo]:
        """Score phases on this batch, update the keep probabilities and draw `B` chunks each.

        Args:
            actions: `(traj, N, ...)` per-chunk action features whose success-failure variance
                scores the phases (Eq. 5); typically the continuous actions `(traj, N, H, D)`.
            success: `(traj,)` bool outcome of each rollout.
            group: `(traj,)` int group id (rollouts of the same prompt share one).
            valid: `(traj, N)` bool mask of real chunks; all True when None.
            gripper: `(traj, N, H)` gripper commands; defaults to `actions[..., -1]`.
            phases: `(traj, N)` precomputed phase ids; skips labelling when given.

        Returns:
            The `Selection` (at most `B` chunks per trajectory, all of them when a trajectory
            has fewer than `B`) and a `MaskerInfo` of diagnostics.

        Raises:
            ValueError, TypeError: from the primitives, naming the offending argument.
        """
        check_tensor(actions, "actions", dtypes="float")
        valid = resolve_valid(valid, actions, ref_name="actions")
        if phases is None:
            phases = self.label(actions, gripper, valid)
        variance = success_failure_variance(
            actions,
            phases,
            success,
            group,
            num_phases=self.num_phases,
            valid=valid,
            weighting=self.weighting,
            validate_args=self.validate_args,
        )
        weight = variance.group_defined.sum(0).to(variance.scores.dtype) if self.distributed else None
        keep = self.buffer.update(variance.scores, variance.defined, weight=weight, validate_args=False)
        keep = keep.to(actions.device)
        phase_index = torch.where(valid, phases, 0).clamp(0, self.num_phases - 1)
        weights = torch.where(valid, keep[phase_index], 0.0)
        selection = plackett_luce_sample(
            weights, self.budget, valid=valid, generator=self.generator, validate_args=False
        )
        chosen = selection.chunk_mask()
        one_hot = torch.nn.functional.one_hot(phase_index, self.num_phases)
        selected_per_phase = torch.where(chosen[..., None], one_hot, 0).sum(dim=(0, 1))
        available_per_phase = torch.where(valid[..., None], one_hot, 0).sum(dim=(0, 1))
        pi = None
        if self.inclusion:
            pi = inclusion_probabilities(weights, self.budget, valid=valid)
        info = MaskerInfo(
            phases=phases,
            keep_probabilities=keep,
            scores=variance.scores,
            defined=variance.defined,
            weights=weights,
            selected_per_phase=selected_per_phase,
            available_per_phase=available_per_phase,
            inclusion=pi,
        )
        return selection, info

    def state_dict(self) -> dict[str, Any]:
        """The masker's state: the score buffer and the generator state."""
        return {
            "budget": self.budget,
            "num_phases": self.num_phases,
            "buffer": self.buffer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by `state_dict`.

        Raises:
            ValueError: if the state is missing keys or was saved with another `num_phases`.
        """
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        missing = {"budget", "num_phases", "buffer", "generator"} - set(state)
        if missing:
            raise ValueError(f"`state` is missing keys {sorted(missing)}.")
        if int(state["num_phases"]) != self.num_phases:
            raise ValueError(
                f"`state['num_phases']` must equal this masker's num_phases {self.num_phases}, "
                f"got {state['num_phases']}."
            )
        self.budget = check_positive_int(int(state["budget"]), "state['budget']")
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
