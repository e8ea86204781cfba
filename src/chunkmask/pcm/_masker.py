"""`ProbabilisticChunkMasker`: the thin stateful drop-in that composes the PCM primitives.

It adds no math of its own. Once per training step, `update` runs phase labelling
(`gripper_close_fraction`, `label_gripper_phases`), the success-failure action variance
(`success_failure_variance`, Eq. 5) and the online phase-score buffer (`PhaseScoreBuffer`,
Eq. 7-9); `draw`, as often as needed, turns the current keep probabilities into chunk weights
`w_{i,t} = p_{phi(i,t)}` and draws a fixed budget by Plackett-Luce sampling
(`plackett_luce_sample`, Eq. 10). Its only state is the score buffer and the random generator.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int64, Real
from torch import Tensor

from chunkmask._checks import (
    check_bool,
    check_min_ndim,
    check_option,
    check_positive_int,
    check_shape,
    check_tensor,
    resolve_valid,
)
from chunkmask.batch._selection import Selection
from chunkmask.pcm._allocation import advantage_aware_budgets
from chunkmask.pcm._phases import NUM_PHASES, Phase, gripper_close_fraction, label_gripper_phases
from chunkmask.pcm._sampling import plackett_luce_sample
from chunkmask.pcm._score_buffer import PhaseScoreBuffer
from chunkmask.pcm._scores import _success_failure_variance


@dataclasses.dataclass(frozen=True)
class PhaseLabelling:
    """How `ProbabilisticChunkMasker` labels chunks into phases (App. E.2 of the paper).

    Attributes:
        close: the gripper convention passed to `gripper_close_fraction`.
        close_threshold: the threshold passed to `gripper_close_fraction`.
        labeler: optional callable `labeler(gripper, valid) -> phases (traj, N) int64` replacing
            the gripper rule (e.g. one built on `label_grasp_onset`).
    """

    close: Literal["positive", "zero", "negative", "threshold"] = "positive"
    close_threshold: float | None = None
    labeler: Callable[[Tensor, Tensor], Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class PhaseScoring:
    """How `ProbabilisticChunkMasker` scores phases and refreshes keep probabilities (Eq. 5-9).

    Attributes:
        refresh_every: `K`, steps between keep-probability refreshes (Eq. 7).
        p_min: the keep-probability floor of Eq. 9.
        power: exponent on the normalised score (0.5 gives exact Neyman when `V` is proportional
            to `sigma^2`).
        window: the score buffer's window mean, `"steps"` (Eq. 7) or `"weighted"` by the number
            of groups behind each step's score (`PhaseScoreBuffer`).
        min_groups: the fewest groups (summed over the refresh window) that must define a
            phase's score before it counts; thinner phases get `p_min`. 0 is the paper's rule.
        scored_phases: the phase ids whose `V_c` is measured; every other phase is treated as
            undefined (keep probability `p_min`). With `label_grasp_onset` as the `labeler`,
            `scored_phases=(OnsetPhase.APPROACH, OnsetPhase.ONSET)` scores only the chunks up
            to the first grasp attempt: the cause of the outcome rather than its consequences.
            None scores every phase.
        weighting: `"uniform"` averages `V_{c,g}` over groups as in Eq. 5; `"balance"` weights
            each group by `p(1-p)`.
        process_group: a `torch.distributed` group; the score buffer all-reduces its statistics
            over it so that every rank holds identical keep probabilities. Each rank's `V_c` is
            weighted by its number of defined groups, so that the reduced score equals the score
            of the union batch when every group's rollouts sit on one rank.
    """

    refresh_every: int = 5
    p_min: float = 0.1
    power: float = 1.0
    window: Literal["steps", "weighted"] = "steps"
    min_groups: int | float = 0.0
    scored_phases: Sequence[int] | None = None
    weighting: Literal["uniform", "balance"] = "uniform"
    process_group: Any = None


@dataclasses.dataclass(frozen=True)
class ChunkBudget:
    """How many chunks `ProbabilisticChunkMasker.draw` keeps per trajectory.

    Attributes:
        budget: chunks to keep per trajectory, `B` (the paper uses 12 of 64).
        advantage_aware: spend no chunks on trajectories with advantage 0
            (`advantage_aware_budgets`); `draw` then needs `advantages=`. The total is `B` times
            the trajectories that reach the update (non-zero advantage and at least one valid
            chunk), never the rolled-out ones, so a batch that dynamic sampling would shrink
            costs what the shrunk batch costs at `B` each; a trajectory shorter than `B` passes
            its unused chunks to the others. With the `seq-mean-token-mean` loss, pass
            `global_batch_size` (or `loss_normalizers`) of the trajectories that reach the
            update.
        max_budget: the Selection's slot count with `advantage_aware` (one trajectory's largest
            budget); None uses the padded chunk count `N` of each batch.
    """

    budget: int
    advantage_aware: bool = False
    max_budget: int | None = None


class PhaseUpdate(NamedTuple):
    """What one `ProbabilisticChunkMasker.update` measured (all tensors, no host syncs).

    Attributes:
        phases: `(traj, N)` int64 phase id of every chunk (`Phase.PAD` = -1 at padding); pass it
            to `draw`.
        keep_probabilities: `(phase,)` keep probabilities `p_c` after this update (Eq. 9): the
            ones `draw` uses until the next `update`.
        scores: `(phase,)` this batch's success-failure variance `V_c` (Eq. 5), 0 where undefined.
        defined: `(phase,)` bool, whether `V_c` was defined in this batch.
        available_per_phase: `(phase,)` number of valid chunks of each phase over the batch.
    """

    phases: Int64[Tensor, "traj chunk"]
    keep_probabilities: Float[Tensor, " phase"]
    scores: Float[Tensor, " phase"]
    defined: Bool[Tensor, " phase"]
    available_per_phase: Int64[Tensor, " phase"]

    def selected_per_phase(self, selection: Selection) -> Int64[Tensor, " phase"]:
        """Number of selected chunks of each phase over the batch (the realised allocation, Fig. 6).

        Args:
            selection: a `Selection` of this batch (e.g. from `draw`).

        Returns:
            `(phase,)` int64 counts.

        Raises:
            TypeError: if `selection` is not a `Selection`.
            ValueError: if its shape is not the batch's `(traj, N)`.
        """
        if not isinstance(selection, Selection):
            raise TypeError(
                f"`selection` must be a chunkmask.Selection, got {type(selection).__name__}."
            )
        shape = (selection.num_traj, selection.chunks_total)
        if shape != tuple(self.phases.shape):
            raise ValueError(
                f"`selection` must cover the batch of `phases` {tuple(self.phases.shape)} "
                f"(traj, N), got {shape}."
            )
        num_phases = self.keep_probabilities.shape[0]
        chosen = selection.chunk_mask().to(self.phases.device) & (self.phases >= 0)
        ids = torch.arange(num_phases, device=self.phases.device)
        return ((self.phases[..., None] == ids) & chosen[..., None]).sum(dim=(0, 1))


class ProbabilisticChunkMasker:
    r"""Select a fixed budget of chunks per trajectory, weighted by online phase scores (PCM).

    Sec. 4.3-4.5 of Anonymous et al. (2026), Probabilistic Chunk Masking, arXiv 2605.16154, as
    two calls: `update` (once per training step, state-changing) and `draw` (pure with respect
    to the scores; only the random generator advances):

    $$
    \underbrace{V_c \;(\text{Eq. 5}) \;\to\; p_c = \max\Big(p_{\min},
    \frac{s_c}{\max_{c'} s_{c'}}\Big),\; s_c = \frac{\bar V_c}{\sum_{c'} \bar V_{c'}}
    \;(\text{Eq. 7-9})}_{\texttt{update}} \;\to\;
    \underbrace{w_{i,t} = p_{\phi(i,t)} \;\to\; S_i \sim \mathrm{PL}(w_{i,\cdot}, B)
    \;(\text{Eq. 10})}_{\texttt{draw}}.
    $$

    ```python
    phases = masker.update(actions=actions, success=success, group=group, valid=valid).phases
    sel = masker.draw(phases, valid=valid)  # a Selection; draw again for another sample
    ```

    Phases come from, in order of precedence: the `phases` argument of `update`; the
    `labelling.labeler` applied to the gripper commands; or the App. E.2 gripper rule
    (`label_gripper_phases`) on `gripper_close_fraction(gripper, close=labelling.close)`. When
    `gripper` is not given, the last action dimension is taken as the gripper command (LIBERO
    and MetaWorld put it last).

    Args:
        budget: chunks to keep per trajectory, `B` (an int), or a `ChunkBudget` (advantage-aware
            budgets, the slot count).
        num_phases: number of phases; `NUM_PHASES` (5) for the gripper rule.
        labelling: the phase rule, a `PhaseLabelling`.
        scoring: the phase scores and their buffer, a `PhaseScoring`.
        inclusion: fill `Selection.inclusion` with the exact inclusion probabilities `pi` (for
            the Horvitz-Thompson estimator, which reads `selection.packed_inclusion()`); costs a
            few hundred ms at 80 x 64 on one CPU core and a host sync.
        seed: a non-negative int seeding the masker's own CPU generator, or a `torch.Generator`
            to draw with (a float or bool is rejected, not truncated); None seeds from entropy.
        global_rng: draw from torch's global RNG (seed it with `torch.manual_seed`) instead of a
            generator of the masker's own. Needed under `torch.compile(fullgraph=True)`: see
            the note on compiling below.
        validate_args: run the value checks of the primitives on the user's inputs (finite
            actions, phase ids and group ids in range); they synchronise with the device.

    Notes:
        - State. `update` advances the score buffer by one step each call: call it exactly once
          per training step, with the rollout batch. `draw` reads the current keep
          probabilities and changes nothing but the generator, so drawing several times (per
          mini-batch, or a second sample for a diagnostic) leaves the scores alone. `select` is
          `update` then `draw` and so advances the state too.
        - Host synchronisation. With `validate_args=False`, `inclusion=False`, no
          `scoring.process_group` and `update(..., num_groups=G)` (dense group ids in `[0, G)`,
          which replaces the `torch.unique` of `success_failure_variance`), `update` and `draw`
          make no host sync: no `.item()`, `int(tensor)`, `bool(tensor)`, `torch.unique`,
          `nonzero` or boolean-mask indexing. The one op that still blocks
          `torch.compile(fullgraph=True)` is the random draw from a `torch.Generator`
          (`torch.rand(..., generator=g)`, which TorchDynamo in torch 2.13 cannot trace); build
          the masker with `global_rng=True` to compile `draw` whole. The score buffer's step
          counters are tensors, so a compiled `update` does not recompile per step.
        - `PhaseUpdate.phases` is `Phase.PAD` (-1) at every padded chunk, also when `phases` is
          passed to `update` (whatever the caller put there).

    Raises:
        ValueError: if `budget`, `num_phases` or `scoring.refresh_every` is not a positive int,
            `p_min` lies outside (0, 1], `power` is not positive, `weighting` or `close` is
            unknown, or `seed` is negative.
        TypeError: if `labeler` is not callable, `seed` is neither an int nor a
            `torch.Generator`, `labelling`/`scoring` have the wrong type, or `inclusion`,
            `global_rng` or `validate_args` is not a bool.

    Examples:
        >>> import torch
        >>> from chunkmask import ProbabilisticChunkMasker
        >>> g = torch.Generator().manual_seed(0)
        >>> actions = torch.randn(4, 6, 2, 3, generator=g)  # (traj, chunk, step, dim)
        >>> actions[..., -1] = torch.tensor([-1.0, -1, 1, 1, 1, -1]).view(1, 6, 1)  # gripper
        >>> masker = ProbabilisticChunkMasker(budget=2, seed=0)
        >>> info = masker.update(actions=actions, success=torch.tensor([True, False, True, False]),
        ...                      group=torch.tensor([0, 0, 1, 1]))
        >>> sel = masker.draw(info.phases)
        >>> sel.indices.shape, sel.counts.tolist()
        (torch.Size([4, 2]), [2, 2, 2, 2])
        >>> int(masker.buffer.num_updates)  # draw leaves the scores alone
        1
    """

    def __init__(
        self,
        budget: int | ChunkBudget,
        num_phases: int = NUM_PHASES,
        *,
        labelling: PhaseLabelling = PhaseLabelling(),
        scoring: PhaseScoring = PhaseScoring(),
        inclusion: bool = False,
        seed: int | torch.Generator | None = None,
        global_rng: bool = False,
        validate_args: bool = False,
    ) -> None:
        if not isinstance(budget, ChunkBudget):
            budget = ChunkBudget(budget)
        if not isinstance(labelling, PhaseLabelling):
            raise TypeError(
                f"`labelling` must be a chunkmask.PhaseLabelling, got {type(labelling).__name__}."
            )
        if not isinstance(scoring, PhaseScoring):
            raise TypeError(
                f"`scoring` must be a chunkmask.PhaseScoring, got {type(scoring).__name__}."
            )
        self.budget = check_positive_int(budget.budget, "budget")
        self.advantage_aware = check_bool(budget.advantage_aware, "advantage_aware")
        max_budget = budget.max_budget
        self.max_budget = None if max_budget is None else check_positive_int(max_budget, "max_budget")
        if self.max_budget is not None and self.max_budget < self.budget:
            raise ValueError(
                f"`max_budget` must be >= `budget` ({self.budget}), got {self.max_budget}."
            )
        self.num_phases = check_positive_int(num_phases, "num_phases")
        self.scored = None
        scored_phases = scoring.scored_phases
        if scored_phases is not None:
            if isinstance(scored_phases, (str, bytes)) or not isinstance(scored_phases, Sequence):
                raise TypeError(
                    "`scored_phases` must be a sequence of phase ids, got "
                    f"{type(scored_phases).__name__}."
                )
            ids = [check_positive_int(c, "scored_phases", allow_zero=True) for c in scored_phases]
            if not ids or max(ids) >= self.num_phases:
                raise ValueError(
                    f"`scored_phases` must hold at least one id in [0, {self.num_phases}) "
                    f"(`num_phases`), got {list(scored_phases)}."
                )
            self.scored = torch.zeros(self.num_phases, dtype=torch.bool)
            self.scored[ids] = True
        self.weighting = check_option(scoring.weighting, "weighting", ("uniform", "balance"))
        labeler = labelling.labeler
        if labeler is not None and not callable(labeler):
            raise TypeError(f"`labeler` must be callable, got {type(labeler).__name__}.")
        self.close = labelling.close
        self.close_threshold = labelling.close_threshold
        # Fail on a nonsensical gripper convention now rather than at the first step.
        gripper_close_fraction(
            torch.zeros(1, 1, 1), close=self.close, close_threshold=self.close_threshold
        )
        self.labeler = labeler
        self.inclusion = check_bool(inclusion, "inclusion")
        self.validate_args = check_bool(validate_args, "validate_args")
        self.global_rng = check_bool(global_rng, "global_rng")
        generator = None
        if isinstance(seed, torch.Generator):
            generator, seed = seed, None
        elif seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(
                    f"`seed` must be a non-negative int or a torch.Generator, got "
                    f"{type(seed).__name__} {seed!r}."
                )
            seed = check_positive_int(seed, "seed", allow_zero=True)
        self.distributed = scoring.process_group is not None
        self.buffer = PhaseScoreBuffer(
            self.num_phases,
            refresh_every=scoring.refresh_every,
            p_min=scoring.p_min,
            power=scoring.power,
            process_group=scoring.process_group,
            window=scoring.window,
            min_groups=scoring.min_groups,
        )
        if self.global_rng:
            if generator is not None or seed is not None:
                raise ValueError("`seed` must be None when `global_rng=True`, got one.")
        elif generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
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
            if actions.shape[-1] == 0:
                raise ValueError(
                    f"`actions` must have at least one action dimension (the gripper is the "
                    f"last), got shape {tuple(actions.shape)}."
                )
            gripper = actions[..., -1]
        if self.labeler is not None:
            valid = resolve_valid(valid, gripper, ref_name="gripper")
            phases = self.labeler(gripper, valid)
            check_tensor(phases, "labeler(gripper, valid)", ndim=2, dtypes="int")
            check_shape(phases, "labeler(gripper, valid)", tuple(valid.shape))
            return phases
        fraction = gripper_close_fraction(
            gripper, valid, close=self.close, close_threshold=self.close_threshold
        )
        return label_gripper_phases(fraction, valid, validate_args=self.validate_args)

    def update(
        self,
        *,
        actions: Real[Tensor, "traj chunk *rest"],
        success: Bool[Tensor, " traj"],
        group: Int64[Tensor, " traj"],
        valid: Bool[Tensor, "traj chunk"] | None = None,
        gripper: Real[Tensor, "traj chunk step"] | None = None,
        phases: Int64[Tensor, "traj chunk"] | None = None,
        num_groups: int | None = None,
    ) -> PhaseUpdate:
        """Label and score this step's rollouts and advance the score buffer by one step.

        The state-changing half of PCM (Eq. 5-9): call it once per training step with the
        rollout batch (every rollout, also those dynamic sampling drops: a group whose rollouts
        all agree defines no `V_c` and so changes no score). Then `draw` as often as needed.

        Args:
            actions: `(traj, N, ...)` per-chunk action features whose success-failure variance
                scores the phases (Eq. 5); typically the continuous actions `(traj, N, H, D)`.
            success: `(traj,)` bool outcome of each rollout.
            group: `(traj,)` int group id (rollouts of the same prompt share one).
            valid: `(traj, N)` bool mask of real chunks; all True when None.
            gripper: `(traj, N, H)` gripper commands; defaults to `actions[..., -1]`.
            phases: `(traj, N)` precomputed phase ids; skips labelling when given.
            num_groups: the number of groups `G` when `group` holds dense ids in `[0, G)`;
                avoids the host sync of `torch.unique` (see the class notes).

        Returns:
            A `PhaseUpdate`: the phase of every chunk (for `draw`), this batch's `V_c`, and the
            keep probabilities now in force.

        Raises:
            ValueError, TypeError: from the primitives, naming the offending argument.
        """
        check_tensor(actions, "actions", dtypes="float")
        check_min_ndim(actions, "actions", 2)
        valid = resolve_valid(valid, actions, ref_name="actions")
        if phases is None:
            phases = self.label(actions, gripper, valid)
        else:
            check_tensor(phases, "phases", ndim=2, dtypes="int")
        variance = _success_failure_variance(
            actions,
            phases,
            success,
            group,
            num_phases=self.num_phases,
            valid=valid,
            weighting=self.weighting,
            num_groups=num_groups,
            validate_args=self.validate_args,
            features_name="actions",
        )
        defined = variance.defined
        if self.scored is not None:
            defined = defined & self.scored.to(defined.device)
        weight = None
        if self.distributed or self.buffer.window == "weighted" or self.buffer.min_groups > 0:
            weight = variance.group_defined.sum(0).to(variance.scores.dtype)
        keep = self.buffer.update(variance.scores, defined, weight=weight, validate_args=False)
        phases = torch.where(valid, phases.to(torch.int64), int(Phase.PAD))
        ids = torch.arange(self.num_phases, device=phases.device)
        available = ((phases[..., None] == ids) & valid[..., None]).sum(dim=(0, 1))
        return PhaseUpdate(
            phases=phases,
            keep_probabilities=keep.to(actions.device),
            scores=variance.scores,
            defined=variance.defined,
            available_per_phase=available,
        )

    def weights(
        self,
        phases: Int64[Tensor, "traj chunk"],
        valid: Bool[Tensor, "traj chunk"] | None = None,
    ) -> Float[Tensor, "traj chunk"]:
        """The chunk weights `w_{i,t} = p_{phi(i,t)}` of the current keep probabilities (Eq. 10).

        Args:
            phases: `(traj, N)` phase ids (`PhaseUpdate.phases`); negative ids mark padding.
            valid: `(traj, N)` bool mask of real chunks; defaults to `phases >= 0`.

        Returns:
            `(traj, N)` float32 weights, 0 at padding.

        Raises:
            TypeError: if `phases` is not integer or `valid` not bool.
            ValueError: if `phases` is not 2-D or `valid` has another shape or device.
        """
        check_tensor(phases, "phases", ndim=2, dtypes="int")
        valid = (phases >= 0) if valid is None else resolve_valid(valid, phases, ref_name="phases")
        keep = self.buffer.keep_probabilities.to(phases.device)
        phase_index = phases.to(torch.int64).clamp(0, self.num_phases - 1)
        return torch.where(valid & (phases >= 0), keep[phase_index], 0.0)

    def draw(
        self,
        phases: Int64[Tensor, "traj chunk"],
        *,
        valid: Bool[Tensor, "traj chunk"] | None = None,
        advantages: Real[Tensor, " traj"] | None = None,
    ) -> Selection:
        """Draw `B` chunks per trajectory from the current keep probabilities (Eq. 10).

        Pure with respect to the score state: only the random generator advances, so calling
        it several times (for example with another `valid`, after dynamic sampling) leaves the
        keep probabilities alone.

        Args:
            phases: `(traj, N)` phase ids, `PhaseUpdate.phases` of this step's `update`
                (negative ids mark padding).
            valid: `(traj, N)` bool mask of the chunks that may be drawn; defaults to
                `phases >= 0`.
            advantages: `(traj,)` advantages; required with `ChunkBudget(advantage_aware=True)`
                (ignored otherwise). Trajectories with advantage 0 get no chunks, and the total
                is `B` times the trajectories with a non-zero advantage and a valid chunk.

        Returns:
            A `Selection` (at most `B` chunks per trajectory, all of them when a trajectory has
            fewer than `B`), carrying `inclusion` when the masker was built with
            `inclusion=True`.

        Raises:
            ValueError, TypeError: on a malformed `phases`, `valid` or `advantages`, naming it.
        """
        check_tensor(phases, "phases", ndim=2, dtypes="int")
        valid = (phases >= 0) if valid is None else resolve_valid(valid, phases, ref_name="phases")
        valid = valid & (phases >= 0)
        weights = self.weights(phases, valid)
        budget: int | Tensor = self.budget
        slots = self.budget
        if self.advantage_aware:
            if advantages is None:
                raise ValueError(
                    "`advantages` is required when the masker is `advantage_aware`, got None."
                )
            check_tensor(advantages, "advantages", ndim=1, dtypes=("float", "int"))
            if advantages.shape[0] != valid.shape[0]:
                raise ValueError(
                    f"`advantages` must have shape ({valid.shape[0]},) (one per trajectory of "
                    f"`phases`), got {tuple(advantages.shape)}."
                )
            advantages = advantages.to(valid.device)
            slots = max(valid.shape[1], 1) if self.max_budget is None else self.max_budget
            # B per trajectory that reaches the update, never per rolled-out trajectory.
            reaching = (advantages != 0) & valid.any(1)
            budget = advantage_aware_budgets(
                advantages,
                valid.sum(1),
                self.budget,
                max_budget=slots,
                total_budget=self.budget * reaching.sum(),
            )
        return plackett_luce_sample(
            weights,
            budget,
            slots=slots,
            valid=valid,
            generator=self.generator,
            inclusion=self.inclusion,
            validate_args=False,
        )

    def select(
        self,
        *,
        actions: Real[Tensor, "traj chunk *rest"],
        success: Bool[Tensor, " traj"],
        group: Int64[Tensor, " traj"],
        valid: Bool[Tensor, "traj chunk"] | None = None,
        gripper: Real[Tensor, "traj chunk step"] | None = None,
        phases: Int64[Tensor, "traj chunk"] | None = None,
        num_groups: int | None = None,
        advantages: Real[Tensor, " traj"] | None = None,
    ) -> Selection:
        """`update` then `draw`: advances the score state one step, then draws one Selection.

        Exactly `self.draw(self.update(...).phases, valid=valid, advantages=advantages)`. It is
        state-changing: call it once per training step (two calls on one batch advance the
        score buffer twice); use `update` and `draw` to draw more than once or to keep the
        `PhaseUpdate` diagnostics.

        Args:
            actions: as for `update`.
            success: as for `update`.
            group: as for `update`.
            valid: as for `update` (and `draw`).
            gripper: as for `update`.
            phases: as for `update`.
            num_groups: as for `update`.
            advantages: as for `draw`.

        Returns:
            The `Selection` of `draw`.
        """
        info = self.update(
            actions=actions,
            success=success,
            group=group,
            valid=valid,
            gripper=gripper,
            phases=phases,
            num_groups=num_groups,
        )
        return self.draw(info.phases, valid=valid, advantages=advantages)

    def state_dict(self) -> dict[str, Any]:
        """The masker's state: the score buffer and the generator state (None with `global_rng`)."""
        return {
            "budget": self.budget,
            "num_phases": self.num_phases,
            "buffer": self.buffer.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by `state_dict`.

        Raises:
            TypeError: if `state` is not a dict, a counter not an int, or the generator state
                not a uint8 tensor.
            ValueError: if the state is missing keys, was saved with another `num_phases`, holds
                an invalid buffer state (see `PhaseScoreBuffer.load_state_dict`) or a generator
                state the generator rejects.
        """
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}.")
        missing = {"budget", "num_phases", "buffer", "generator"} - set(state)
        if missing:
            raise ValueError(f"`state` is missing keys {sorted(missing)}.")
        num_phases = check_positive_int(state["num_phases"], "state['num_phases']")
        if num_phases != self.num_phases:
            raise ValueError(
                f"`state['num_phases']` must equal this masker's num_phases {self.num_phases}, "
                f"got {num_phases}."
            )
        budget = check_positive_int(state["budget"], "state['budget']")
        gen_state = state["generator"]
        if self.generator is not None:
            check_tensor(gen_state, "state['generator']", ndim=1, dtypes=(torch.uint8,))
        elif gen_state is not None:
            raise ValueError(
                "`state['generator']` must be None for a masker with `global_rng=True`, got a "
                f"{type(gen_state).__name__}."
            )
        if self.generator is not None:
            try:  # on a scratch generator first, so that a bad state changes nothing
                torch.Generator(device=self.generator.device).set_state(gen_state)
            except RuntimeError as exc:
                raise ValueError(
                    f"`state['generator']` must be a state of this masker's generator, got one "
                    f"it rejects ({exc})."
                ) from None
        self.buffer.load_state_dict(state["buffer"])
        if self.generator is not None:
            self.generator.set_state(gen_state)
        self.budget = budget
