"""`ProbabilisticChunkMasker`: the thin stateful drop-in that composes the PCM primitives.

It adds no math of its own. Per training step it runs, in order: phase labelling
(`gripper_close_fraction`, `label_gripper_phases`), the success-failure action variance
(`success_failure_variance`, Eq. 5), the online phase-score buffer (`PhaseScoreBuffer`, Eq. 7-9),
the chunk weights `w_{i,t} = p_{phi(i,t)}`, and Plackett-Luce sampling of a fixed budget
(`plackett_luce_sample`, Eq. 10). Its only state is the score buffer and the random generator.
"""

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
from chunkmask.allocation import advantage_aware_budgets
from chunkmask.inclusion import inclusion_probabilities
from chunkmask.phases import NUM_PHASES, Phase, gripper_close_fraction, label_gripper_phases
from chunkmask.sampling import plackett_luce_sample
from chunkmask.score_buffer import PhaseScoreBuffer
from chunkmask.scores import _success_failure_variance
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
        seed: a non-negative int seeding the masker's own CPU generator (ignored when
            `generator` is given; a float or bool is rejected, not truncated).
        generator: a `torch.Generator` to draw with.
        global_rng: draw from torch's global RNG (seed it with `torch.manual_seed`) instead of a
            generator of the masker's own. Needed under `torch.compile(fullgraph=True)`: see
            the note on compiling below.
        process_group: a `torch.distributed` group; the score buffer all-reduces its statistics
            over it so that every rank holds identical keep probabilities. Each rank's `V_c` is
            weighted by its number of defined groups, so that the reduced score equals the score
            of the union batch when every group's rollouts sit on one rank.
        validate_args: run the value checks of the primitives on the user's inputs (finite
            actions, phase ids and group ids in range); they synchronise with the device.
        advantage_aware: spend no chunks on trajectories with advantage 0 and give their budget
            to the others (`advantage_aware_budgets`); `select` then needs `advantages=`. The
            total number of chunks is what a fixed budget would spend, so the update costs the
            same. With the `seq-mean-token-mean` loss, pass `global_batch_size` = the number of
            trajectories (or `loss_normalizers` of the full batch) so that the loss keeps full
            GRPO's scale; the dropped trajectories' gradient is exactly zero.
        max_budget: the Selection's slot count with `advantage_aware` (one trajectory's largest
            budget); None uses the padded chunk count `N` of each batch.
        window: the score buffer's window mean, `"steps"` (Eq. 7) or `"weighted"` by the number
            of groups behind each step's score (`PhaseScoreBuffer`).
        min_groups: the fewest groups (summed over the refresh window) that must define a
            phase's score before it counts; thinner phases get `p_min`. 0 is the paper's rule.
        scored_phases: the phase ids whose `V_c` is measured; every other phase is treated as
            undefined (keep probability `p_min`). With `label_grasp_onset` as the `labeler`,
            `scored_phases=(OnsetPhase.APPROACH, OnsetPhase.ONSET)` scores only the chunks up
            to the first grasp attempt: the cause of the outcome rather than its consequences.
            None scores every phase.

    Notes:
        - Host synchronisation. With `validate_args=False`, `inclusion=False`, no
          `process_group` and `select(..., num_groups=G)` (dense group ids in `[0, G)`, which
          replaces the `torch.unique` of `success_failure_variance`), `select` makes no host
          sync: no `.item()`, `int(tensor)`, `bool(tensor)`, `torch.unique`, `nonzero` or
          boolean-mask indexing. The one op that still blocks
          `torch.compile(fullgraph=True)` is the random draw from a `torch.Generator`
          (`torch.rand(..., generator=g)`, which TorchDynamo in torch 2.13 cannot trace); build
          the masker with `global_rng=True` to compile `select` whole. The score buffer's
          Python step counters are guarded by the compiler: the first few steps recompile
          (about `refresh_every + 1` graphs), later steps reuse them.
        - `MaskerInfo.phases` is `Phase.PAD` (-1) at every padded chunk, also when `phases` is
          passed to `select` (whatever the caller put there).

    Raises:
        ValueError: if `budget`, `num_phases` or `refresh_every` is not a positive int, `p_min`
            lies outside (0, 1], `power` is not positive, `weighting` or `close` is unknown, or
            `seed` is negative.
        TypeError: if `labeler` is not callable, `generator` is not a `torch.Generator`, `seed`
            is not an int, or `inclusion`, `global_rng` or `validate_args` is not a bool.

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
        global_rng: bool = False,
        process_group: Any = None,
        validate_args: bool = True,
        advantage_aware: bool = False,
        max_budget: int | None = None,
        window: Literal["steps", "weighted"] = "steps",
        min_groups: int | float = 0.0,
        scored_phases: Sequence[int] | None = None,
    ) -> None:
        self.budget = check_positive_int(budget, "budget")
        self.advantage_aware = check_bool(advantage_aware, "advantage_aware")
        self.max_budget = None if max_budget is None else check_positive_int(max_budget, "max_budget")
        if self.max_budget is not None and self.max_budget < self.budget:
            raise ValueError(
                f"`max_budget` must be >= `budget` ({self.budget}), got {self.max_budget}."
            )
        self.num_phases = check_positive_int(num_phases, "num_phases")
        self.scored = None
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
        gripper_close_fraction(torch.zeros(1, 1, 1), close=close, close_threshold=close_threshold)
        self.labeler = labeler
        self.inclusion = check_bool(inclusion, "inclusion")
        self.validate_args = check_bool(validate_args, "validate_args")
        self.global_rng = check_bool(global_rng, "global_rng")
        if seed is not None:
            seed = check_positive_int(seed, "seed", allow_zero=True)
        self.distributed = process_group is not None
        self.buffer = PhaseScoreBuffer(
            self.num_phases,
            refresh_every=refresh_every,
            p_min=p_min,
            power=power,
            process_group=process_group,
            window=window,
            min_groups=min_groups,
        )
        if self.global_rng:
            if generator is not None:
                raise ValueError("`generator` must be None when `global_rng=True`, got one.")
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
            num_groups: the number of groups `G` when `group` holds dense ids in `[0, G)`;
                avoids the host sync of `torch.unique` (see the class notes).
            advantages: `(traj,)` advantages; required with `advantage_aware` (ignored
                otherwise).

        Returns:
            The `Selection` (at most `B` chunks per trajectory, all of them when a trajectory
            has fewer than `B`) and a `MaskerInfo` of diagnostics.

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
        keep = keep.to(actions.device)
        phases = torch.where(valid, phases.to(torch.int64), int(Phase.PAD))
        phase_index = phases.clamp(0, self.num_phases - 1)
        weights = torch.where(valid, keep[phase_index], 0.0)
        slots, budgets = self.budget, None
        if self.advantage_aware:
            if advantages is None:
                raise ValueError(
                    "`advantages` is required when the masker is `advantage_aware`, got None."
                )
            check_tensor(advantages, "advantages", ndim=1, dtypes=("float", "int"))
            if advantages.shape[0] != valid.shape[0]:
                raise ValueError(
                    f"`advantages` must have shape ({valid.shape[0]},) (one per trajectory of "
                    f"`actions`), got {tuple(advantages.shape)}."
                )
            slots = max(valid.shape[1], 1) if self.max_budget is None else self.max_budget
            budgets = advantage_aware_budgets(
                advantages.to(valid.device), valid.sum(1), self.budget, max_budget=slots
            )
        selection = plackett_luce_sample(
            weights,
            slots,
            valid=valid,
            generator=self.generator,
            budgets=budgets,
            validate_args=False,
        )
        chosen = selection.chunk_mask()
        # One-hot by comparison: `one_hot` checks its input range on the host.
        one_hot = phase_index[..., None] == torch.arange(self.num_phases, device=actions.device)
        per_phase_chosen = (one_hot & chosen[..., None]).sum(dim=(0, 1))
        per_phase_valid = (one_hot & valid[..., None]).sum(dim=(0, 1))
        pi = None
        if self.inclusion:
            pi = inclusion_probabilities(
                weights, self.budget if budgets is None else budgets, valid=valid
            )
        info = MaskerInfo(
            phases=phases,
            keep_probabilities=keep,
            scores=variance.scores,
            defined=variance.defined,
            weights=weights,
            selected_per_phase=per_phase_chosen,
            available_per_phase=per_phase_valid,
            inclusion=pi,
        )
        return selection, info

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
