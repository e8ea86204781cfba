"""GRPO on the pick-and-place testbed, with a switch for how chunks are selected for the update.

The loop is the ordinary chunk-level GRPO loop of SimpleVLA-RL: sample `G` rollouts from each of a
few initial states, score each rollout 1/0, turn the scores into group-relative advantages, and
take one clipped-surrogate AdamW step on the rollouts' action tokens. The only thing the
`selector` changes is which chunks enter the actor's forward and backward pass:

- `"full"`: every executed chunk (vanilla GRPO);
- `"pcm"`: `ProbabilisticChunkMasker`, `B` chunks per trajectory drawn by phase score (PCM);
- `"random"`: `B` chunks uniformly at random;
- `"top_phase"`: `B` chunks from the single highest-`V_c` phase ("full masking");
- `"entropy_topk"`: the `B` chunks of highest policy entropy;
- `"pods"`: max-variance down-sampling of rollouts (PODS, arXiv 2504.13818): the `pods_keep`
  rollouts of each group whose rewards vary most, with all their chunks, and advantages
  recomputed on the kept rollouts;
- `"token_entropy"`: every chunk enters the forward, but the loss keeps only the
  `token_fraction` of action tokens with the highest entropy (arXiv 2506.01939). It saves no
  update compute in this architecture: one forward yields all of a chunk's tokens;
- `"pps"`: `B` chunks per trajectory on average over the batch, drawn with probability
  proportional to `|A_i|` times `chunk_score_norm` (`pps_sample`); with
  `estimator="horvitz_thompson"` an unbiased update with a Neyman allocation.
- `"neyman"`: `B` chunks per trajectory split over its phases by the Neyman allocation of
  Eq. 6 with `sigma_c = sqrt(V_c)` from the masker's scores, uniform inside each phase
  (`stratified_sample`); with `estimator="horvitz_thompson"` the stratified estimator of
  Theorem 1.

Every arm is looked up by name in the core's selector registry (`chunkmask.get_selector`, one
`SelectorInputs -> Selection` signature); the testbed registers its own `"pods"` and
`"token_entropy"` there. With PCM the whole change to the loop is the masker's `update`, its
draw and the `shrink` of the batch to the selected chunks (`update` below). Two options apply to every selector:
`dynamic_sampling` drops the groups whose success rate lies outside `[0.1, 0.9]` before the update
(SimpleVLA-RL's filter: such groups have advantage 0), and `advantage_aware` (`"pcm"` and
`"random"`) spends no chunks on zero-advantage trajectories and `B` on each trajectory that
reaches the update (`advantage_aware_budgets`; a trajectory shorter than `B` passes its unused
chunks to the others), so the update costs what `B` per surviving trajectory costs.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
from jaxtyping import Int64
from torch import Tensor

from chunkmask import (
    NUM_PHASES,
    ChunkBudget,
    PhaseLabelling,
    PhaseScoring,
    PhaseUpdate,
    ProbabilisticChunkMasker,
    Regularizers,
    Selection,
    SelectorInputs,
    available_selectors,
    get_selector,
    gripper_close_fraction,
    group_relative_advantages,
    masked_grpo_loss,
    register_selector,
    shrink,
)
from chunkmask._checks import check_bool, check_option, check_positive_int, check_range
from chunkmask.aggregation import AGGREGATION_MODES, AggregationMode
from chunkmask.baselines import (
    dynamic_sampling_mask,
    high_entropy_token_mask,
    max_variance_downsample,
)
from chunkmask.eval import gradient_cosine
from chunkmask.optim_config import OptimConfig
from chunkmask.pcm import (
    NUM_ONSET_PHASES,
    OnsetPhase,
    advantage_aware_budgets,
    chunk_score_norm,
    label_grasp_onset,
)
from chunkmask.testbed.env import InitialState, PickPlaceConfig, PickPlaceVectorEnv
from chunkmask.testbed.env import sample_initial_states as _sample_states
from chunkmask.testbed.policy import TokenChunkPolicy
from chunkmask.testbed.rollout import RolloutBatch, rollout

Selector = Literal[
    "full", "pcm", "random", "top_phase", "entropy_topk", "pods", "token_entropy", "pps",
    "neyman",
]
SELECTORS: tuple[str, ...] = get_args(Selector)
"""The testbed's arms: the core's generic selectors (`chunkmask.available_selectors`) and the
testbed-level `"pods"` and `"token_entropy"`, registered below."""


@dataclass
class TrainConfig(OptimConfig):
    """Hyper-parameters of a GRPO run on the testbed (defaults follow App. E where they apply).

    The optimisation fields (`temperature`, `lr`, `weight_decay`, `grad_clip`, `clip_low`,
    `clip_high`; keyword-only) and the `clip` property come from `chunkmask.optim_config.OptimConfig`, shared
    with the pipeline's `PipelineConfig`.

    Attributes:
        selector: which chunks enter the update (see the module docstring).
        budget: chunks per trajectory `B` for `"pcm"`, `"random"`, `"top_phase"` and
            `"entropy_topk"`.
        steps: training steps.
        prompts_per_step: initial states per step.
        group_size: rollouts per initial state, `G`.
        temperature: sampling temperature of rollouts (and of the log-probabilities).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip.
        clip_low: surrogate clip `eps_low`.
        clip_high: surrogate clip `eps_high`. The default 0.4 is this testbed's tuned value (see
            docs/testbed.md), wider than the library's `Clip` default of 0.28; `clip` builds the
            loss's `Clip` from `clip_low` and `clip_high`.
        entropy_coef: entropy bonus coefficient.
        mini_batch: trajectories per PPO mini-batch (one AdamW step each). The default takes
            one step on the whole batch: with 64 trajectories of ~50 chunks x 40 tokens and a
            binary reward, smaller mini-batches (or learning rates of 1e-4 and above) let
            Adam's normalised steps follow noise; the SFT policy degraded within a few steps
            in our exploratory runs (see docs/testbed.md).
        refresh_every: PCM keep-probability refresh period `K`.
        p_min: PCM keep-probability floor.
        estimator: `"masked"` (Eq. 11) or `"horvitz_thompson"` (each selected chunk weighted by
            its exact inclusion probability; `"pcm"` and `"full"` only).
        eval_episodes: held-out initial states evaluated after every `eval_every` steps.
        eval_every: evaluation period in steps.
        eval_greedy: evaluate with the most likely action tokens instead of sampling.
        seed: seeds the prompts, the rollout sampling and the selectors.
        dynamic_sampling: drop, before the update, the groups whose success rate lies outside
            `[0.1, 0.9]` (`dynamic_sampling_mask`): their advantage is 0.
        advantage_aware: (`"pcm"` and `"random"`) no chunks for zero-advantage trajectories, the
            total `B` per trajectory that reaches the update (`advantage_aware_budgets`).
        pods_keep: (`"pods"`) rollouts kept per group, `m`.
        token_fraction: (`"token_entropy"`) share of the update's action tokens kept, by entropy.
        phase_rule: the masker's phases, `"gripper"` (App. E.2, `label_gripper_phases`) or
            `"onset"` (`label_grasp_onset`: approach, onset of the first grasp attempt, hold,
            after).
        score_until_onset: (`"onset"` only) score `V_c` on the approach and onset chunks alone;
            hold and after get `p_min` (a score of cause rather than consequence).
        score_window: the score buffer's window mean, `"steps"` (Eq. 7) or `"weighted"` by
            groups.
        min_groups: the fewest groups in a refresh window that must define a phase's score.
        probe_every: every this many steps (0: never), the online probe of `chunkmask.eval`:
            one extra full backward on the first mini-batch gives the cosine between the masked
            and the full GRPO gradient at the same parameters (`probe_cosine` in the log; its
            time is excluded from `update_s`).
        loss_agg_mode: the loss aggregation (`chunkmask.AGGREGATION_MODES`): `"token-mean"`
            weights every back-propagated token alike, `"seq-mean-token-mean"` every trajectory
            alike (long failed episodes then weigh no more than short successful ones).
        prompt_pool: 0 draws fresh initial states every step; `N > 0` fixes the task as a set
            of `N` initial states (`prompt_pool_states`, seeded by `seed`), as LIBERO fixes 50
            per task: every step takes `prompts_per_step` distinct states of the pool, and
            the default evaluation runs on the pool.
    """

    selector: Selector = "full"
    budget: int = 12
    steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    entropy_coef: float = 0.0
    mini_batch: int = 64
    refresh_every: int = 5
    p_min: float = 0.1
    estimator: Literal["masked", "horvitz_thompson"] = "masked"
    eval_episodes: int = 64
    eval_every: int = 2
    eval_greedy: bool = False
    seed: int = 0
    dynamic_sampling: bool = False
    advantage_aware: bool = False
    pods_keep: int = 2
    token_fraction: float = 0.2
    phase_rule: Literal["gripper", "onset"] = "gripper"
    score_until_onset: bool = False
    score_window: Literal["steps", "weighted"] = "steps"
    min_groups: float = 0.0
    probe_every: int = 0
    loss_agg_mode: AggregationMode = "token-mean"
    prompt_pool: int = 0

    def validate(self) -> None:
        """Raise `ValueError`/`TypeError` naming the first field that is out of range."""
        super().validate()
        check_option(self.selector, "selector", SELECTORS)
        check_option(self.estimator, "estimator", ("masked", "horvitz_thompson"))
        check_option(self.loss_agg_mode, "loss_agg_mode", AGGREGATION_MODES)
        if self.estimator == "horvitz_thompson" and self.selector not in (
            "full", "pcm", "pps", "neyman"
        ):
            raise ValueError(
                "`estimator='horvitz_thompson'` needs inclusion probabilities: selector must be "
                f"'full', 'pcm', 'pps' or 'neyman', got {self.selector!r}."
            )
        for name in (
            "budget",
            "steps",
            "prompts_per_step",
            "group_size",
            "mini_batch",
            "refresh_every",
            "eval_episodes",
            "eval_every",
            "pods_keep",
        ):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.seed, "seed", allow_zero=True)
        check_positive_int(self.probe_every, "probe_every", allow_zero=True)
        check_positive_int(self.prompt_pool, "prompt_pool", allow_zero=True)
        if 0 < self.prompt_pool < self.prompts_per_step:
            raise ValueError(
                f"`prompt_pool` must be 0 or at least `prompts_per_step`={self.prompts_per_step}, "
                f"got {self.prompt_pool}."
            )
        check_range(self.entropy_coef, "entropy_coef", low=0.0)
        check_range(self.p_min, "p_min", low=0.0, high=1.0)
        check_range(self.token_fraction, "token_fraction", low=0.0, high=1.0, low_open=True)
        check_option(self.phase_rule, "phase_rule", ("gripper", "onset"))
        check_option(self.score_window, "score_window", ("steps", "weighted"))
        check_range(self.min_groups, "min_groups", low=0.0)
        check_bool(self.score_until_onset, "score_until_onset")
        if self.score_until_onset and self.phase_rule != "onset":
            raise ValueError(
                "`score_until_onset` needs `phase_rule='onset'`, got "
                f"phase_rule={self.phase_rule!r}."
            )
        check_bool(self.dynamic_sampling, "dynamic_sampling")
        check_bool(self.advantage_aware, "advantage_aware")
        if self.advantage_aware and self.selector not in ("pcm", "random"):
            raise ValueError(
                "`advantage_aware` applies to selector 'pcm' or 'random', got "
                f"{self.selector!r}."
            )


class TrainResult(NamedTuple):
    """What `train` returns.

    Attributes:
        records: one dict per step (the JSON-lines records).
        optimizer_state: the AdamW state after the last step.
        masker_state: the `ProbabilisticChunkMasker` state: its phase scores select the chunks
            of `"pcm"`, `"top_phase"` and `"neyman"` and are logged for every selector, so a
            resumed run of any selector continues them.
    """

    records: list[dict[str, Any]]
    optimizer_state: dict[str, Any]
    masker_state: dict[str, Any] | None


def held_out_states(num: int, config: PickPlaceConfig | None = None) -> InitialState:
    """The fixed held-out initial states used for evaluation (a seed no training step uses)."""
    return _sample_states(num, config=config, generator=torch.Generator().manual_seed(10_000_019))


def prompt_pool_states(cfg: TrainConfig, config: PickPlaceConfig | None = None) -> InitialState:
    """The fixed task states of a run with `cfg.prompt_pool > 0` (seeded by `cfg.seed`)."""
    check_positive_int(cfg.prompt_pool, "prompt_pool")
    generator = torch.Generator().manual_seed(cfg.seed * 7_777 + 424_242)
    return _sample_states(cfg.prompt_pool, config=config, generator=generator)


def _step_prompts(cfg: TrainConfig, step: int, env_cfg: PickPlaceConfig, pool: InitialState | None):
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if pool is None:
        return _sample_states(cfg.prompts_per_step, config=env_cfg, generator=generator)
    return pool.take(torch.randperm(pool.num, generator=generator)[: cfg.prompts_per_step])


def evaluate(
    policy: TokenChunkPolicy,
    states: InitialState,
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    config: PickPlaceConfig | None = None,
) -> float:
    """Success rate of `policy` from `states` (one episode each, common random numbers)."""
    env = PickPlaceVectorEnv(states.num, config)
    batch = rollout(
        policy,
        env,
        states,
        temperature=temperature,
        greedy=greedy,
        generator=torch.Generator().manual_seed(seed),
    )
    return float(batch.success.float().mean())


def make_masker(cfg: TrainConfig) -> ProbabilisticChunkMasker:
    """The run's `ProbabilisticChunkMasker`.

    For `selector="pcm"` it selects the chunks. For the other selectors it only labels and
    scores the phases (`PhaseUpdate.phases`, `.scores`): `"top_phase"` selects from them, and
    every selector logs them; its draws are discarded.
    """
    onset = cfg.phase_rule == "onset"
    return ProbabilisticChunkMasker(
        budget=ChunkBudget(cfg.budget, advantage_aware=cfg.selector == "pcm" and cfg.advantage_aware),
        num_phases=NUM_ONSET_PHASES if onset else NUM_PHASES,
        labelling=PhaseLabelling(labeler=_onset_labeler if onset else None),
        scoring=PhaseScoring(
            scored_phases=(OnsetPhase.APPROACH, OnsetPhase.ONSET) if cfg.score_until_onset else None,
            window=cfg.score_window,
            min_groups=cfg.min_groups,
            refresh_every=cfg.refresh_every,
            p_min=cfg.p_min,
        ),
        inclusion=cfg.selector == "pcm" and cfg.estimator == "horvitz_thompson",
        seed=cfg.seed,
    )


def _onset_labeler(gripper: Tensor, valid: Tensor) -> Tensor:
    """`label_grasp_onset` on the testbed's gripper commands (+1 closes)."""
    return label_grasp_onset(gripper_close_fraction(gripper, valid, close="positive"), valid)


def score_phases(
    masker: ProbabilisticChunkMasker,
    batch: RolloutBatch,
    group: Int64[Tensor, " traj"],
    *,
    valid: Tensor | None = None,
    advantages: Tensor | None = None,
) -> tuple[Selection, PhaseUpdate]:
    """One masker step on a rollout batch: `update` (phases, `V_c`, ...) then one `draw`.

    `valid` replaces the batch's own (after dynamic sampling); `advantages` feed an
    advantage-aware masker. Advances the masker's scores once: call it once per step.
    """
    valid = batch.valid if valid is None else valid
    info = masker.update(actions=batch.actions, success=batch.success, group=group, valid=valid)
    advantages = advantages if masker.advantage_aware else None
    return masker.draw(info.phases, valid=valid, advantages=advantages), info


@register_selector("pods")
@register_selector("token_entropy")
def _every_valid_chunk(inputs: SelectorInputs) -> Selection:
    """The testbed's `"pods"` and `"token_entropy"`: every chunk of `inputs.valid`.

    `update` has already restricted `valid` to PODS's rollouts, and the entropy rule selects
    tokens inside the loss.
    """
    return Selection.from_mask(inputs.valid)


_unregistered = [name for name in SELECTORS if name not in available_selectors()]
if _unregistered:  # every testbed arm dispatches through the registry
    raise RuntimeError(f"testbed selectors without a registration: {_unregistered}")


def update(
    policy: TokenChunkPolicy,
    optimizer: torch.optim.Optimizer,
    batch: RolloutBatch,
    group: Int64[Tensor, " traj"],
    cfg: TrainConfig,
    *,
    masker: ProbabilisticChunkMasker,
    generator: torch.Generator,
    probe: bool = False,
) -> dict[str, Any]:
    """One GRPO actor update on a batch of rollouts; returns the step's diagnostics.

    The result holds the mean `loss`, `clip_frac`, `grad_norm` and `entropy` over the
    mini-batches, the number of `chunks` back-propagated, the `selection` and the masker's
    `info` (`PhaseUpdate`; None for the selectors that do not need the phases to select). With
    `probe`, also `probe_cosine` (masked vs full gradient on the first mini-batch, before the
    optimiser step) and `probe_s`, the probe's time.
    """
    rewards = batch.success.float()
    advantages = group_relative_advantages(rewards, group)  # Eq. 1, on the full batch
    grpo_advantages = advantages
    valid = batch.valid
    if cfg.dynamic_sampling:  # drop the groups whose rollouts all agree (advantage 0)
        valid = valid & dynamic_sampling_mask(batch.success, group)[:, None]
    if cfg.selector == "pods":  # the most reward-diverse rollouts per group, re-normalised
        keep = max_variance_downsample(rewards, group, cfg.pods_keep)
        advantages = group_relative_advantages(rewards, group, valid=keep)
        valid = valid & keep[:, None]

    info = None
    scored = valid
    if cfg.selector in ("pcm", "top_phase", "neyman"):  # phases and V_c of this batch (Eq. 5-9)
        # An advantage-aware PCM masker sees every trajectory: it gives the zero-advantage ones
        # (the groups dynamic sampling drops) no chunks, B for each trajectory that reaches the
        # update.
        if cfg.selector == "pcm" and cfg.advantage_aware:
            scored = batch.valid
        info = masker.update(
            actions=batch.actions, success=batch.success, group=group, valid=scored
        )
    budgets = None
    if cfg.advantage_aware and cfg.selector != "pcm":  # B per trajectory reaching the update
        reaching = (advantages != 0) & valid.any(1)
        budgets = advantage_aware_budgets(
            advantages, batch.valid.sum(1), cfg.budget, max_budget=valid.shape[1],
            total_budget=cfg.budget * reaching.sum(),
        ) * valid.any(1)
    selection = get_selector(cfg.selector)(
        SelectorInputs(
            valid=scored,
            budget=cfg.budget,
            generator=generator,
            phases=None if info is None else info.phases,
            scores=None if info is None else info.scores,
            advantages=advantages,
            entropy=batch.entropy,
            score_norms=chunk_score_norm(batch.logp) if cfg.selector == "pps" else None,
            budgets=budgets,
            masker=masker,
        )
    )

    # PPO mini-batches of whole trajectories (one AdamW step each), in a shuffled order.
    num_traj = batch.success.shape[0]
    order = torch.randperm(num_traj, generator=generator)
    totals = {"loss": 0.0, "clip_frac": 0.0, "chunks": 0, "grad_norm": 0.0, "entropy": 0.0}
    num_minibatches = -(-num_traj // cfg.mini_batch)
    for start in range(0, num_traj, cfg.mini_batch):
        rows = order[start : start + cfg.mini_batch].sort().values
        part = selection.rows(rows, validate_args=False)
        # Only the selected chunks are gathered: the forward below sees M = sum_i |S_i| chunks.
        tree = {
            "obs": batch.obs[rows],
            "tokens": batch.tokens[rows],
            "old_logp": batch.logp[rows],
            "adv": advantages[rows],
        }
        if cfg.estimator == "horvitz_thompson" and part.inclusion is None:  # "full": pi = 1
            part = part.with_inclusion(torch.ones(part.num_traj, part.chunks_total))
        packed = shrink(tree, part)
        logp, entropy = policy.log_prob(
            packed["obs"], packed["tokens"], temperature=cfg.temperature
        )
        token_mask = None
        if cfg.selector == "token_entropy":  # the batch's highest-entropy tokens (a threshold)
            token_mask = high_entropy_token_mask(entropy.detach(), fraction=cfg.token_fraction)
        out = masked_grpo_loss(
            logp,
            old_logp=packed["old_logp"],
            advantages=packed["adv"],
            selection=part,
            mask=token_mask,
            clip=cfg.clip,
            loss_agg_mode=cfg.loss_agg_mode,
            estimator=cfg.estimator,
            regularizers=Regularizers(entropy=entropy, entropy_coef=cfg.entropy_coef),
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if probe and start == 0:
            t0 = time.perf_counter()
            totals["probe_cosine"] = _probe_cosine(policy, batch, rows, grpo_advantages, valid, cfg)
            totals["probe_s"] = time.perf_counter() - t0
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        totals["loss"] += float(out.loss.detach()) / num_minibatches
        totals["clip_frac"] += float(out.clip_frac_high + out.clip_frac_low) / num_minibatches
        totals["grad_norm"] += float(grad_norm) / num_minibatches
        totals["entropy"] += float(out.entropy_loss.detach()) / num_minibatches
        totals["chunks"] += int(packed["tokens"].shape[0])
    totals["info"] = info
    totals["selection"] = selection
    return totals


def _probe_cosine(
    policy: TokenChunkPolicy,
    batch: RolloutBatch,
    rows: Tensor,
    advantages: Tensor,
    valid: Tensor,
    cfg: TrainConfig,
) -> float:
    """Cosine between the masked gradient in `.grad` and full GRPO's on the same rows."""
    params = [p for p in policy.parameters() if p.requires_grad]
    masked = [p.grad for p in params]
    full_sel = Selection.from_mask(valid[rows])
    packed = shrink(
        {"obs": batch.obs[rows], "tokens": batch.tokens[rows], "old_logp": batch.logp[rows],
         "adv": advantages[rows]},
        full_sel,
    )
    logp, _ = policy.log_prob(packed["obs"], packed["tokens"], temperature=cfg.temperature)
    loss = masked_grpo_loss(
        logp, old_logp=packed["old_logp"], advantages=packed["adv"], selection=full_sel,
        clip=cfg.clip,
    ).loss
    full = torch.autograd.grad(loss, params, allow_unused=True)
    return float(gradient_cosine(masked, full))


def phase_stats(
    selection: Selection, info: PhaseUpdate, *, selected_by_masker: bool
) -> dict[str, Any]:
    """The step's per-phase log: realised allocation, `V_c` and keep probabilities.

    Everything comes from the masker's `PhaseUpdate`. Only when another selector chose the chunks
    (`selected_by_masker=False`) are that selection's chunks counted per phase; the keep
    probabilities are then None, since they played no part.

    Returns:
        A dict with `selected_per_phase` and `available_per_phase` (mean chunks per trajectory),
        `V_c`, `V_defined` and `keep_probabilities` (plain lists, for JSON).
    """
    num_traj = selection.num_traj
    if selected_by_masker:
        selected = info.selected_per_phase(selection)
    else:
        in_phase = torch.nn.functional.one_hot(
            info.phases.clamp_min(0), info.available_per_phase.shape[0]
        )
        selected = torch.where(selection.chunk_mask()[..., None], in_phase, 0).sum(dim=(0, 1))
    return {
        "selected_per_phase": (selected / num_traj).tolist(),
        "available_per_phase": (info.available_per_phase / num_traj).tolist(),
        "V_c": info.scores.tolist(),
        "V_defined": info.defined.tolist(),
        "keep_probabilities": info.keep_probabilities.tolist() if selected_by_masker else None,
    }


def train(
    policy: TokenChunkPolicy,
    cfg: TrainConfig,
    *,
    env_config: PickPlaceConfig | None = None,
    log_path: str | Path | None = None,
    progress: bool = False,
    desc: str | None = None,
    eval_states: InitialState | None = None,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    masker_state: dict | None = None,
) -> "TrainResult":
    """Train `policy` in place with GRPO and the configured selector; log one JSON line per step.

    Each record holds the step, the held-out success rate (`eval_success`, measured after the
    step's update; step 0 also records the starting policy as `eval_success_init`), the training
    batch's success rate, `rollout_s` and `update_s` (the timed training work; `wall_s`
    accumulates them, evaluation excluded), the number of chunks executed and back-propagated,
    the per-phase realised allocation (mean chunks per trajectory), `V_c` and keep probabilities.

    Args:
        policy: the policy (an SFT checkpoint), trained in place.
        cfg: the run's `TrainConfig`.
        env_config: environment configuration.
        log_path: JSON-lines file to append records to.
        progress: show a tqdm bar.
        desc: the bar's label.
        eval_states: held-out initial states (default `held_out_states(cfg.eval_episodes)`).
        start_step: first step index (to resume).
        optimizer_state: AdamW state to resume from.
        masker_state: `ProbabilisticChunkMasker.state_dict()` to resume from.

    Returns:
        A `TrainResult`: the per-step records and the optimiser and masker states (to resume).
    """
    env_cfg = env_config or PickPlaceConfig()
    cfg.validate()  # again: the dataclass is mutable
    pool = prompt_pool_states(cfg, env_cfg) if cfg.prompt_pool > 0 else None
    if eval_states is None:
        eval_states = (
            held_out_states(cfg.eval_episodes, env_cfg) if pool is None
            else pool.take(torch.arange(cfg.eval_episodes) % pool.num)
        )
    n_traj = cfg.prompts_per_step * cfg.group_size
    env = PickPlaceVectorEnv(n_traj, env_cfg)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    masker = make_masker(cfg)
    if masker_state is not None:
        masker.load_state_dict(masker_state)
    group = torch.arange(cfg.prompts_per_step).repeat_interleave(cfg.group_size)
    log = None if log_path is None else open(log_path, "a")  # noqa: SIM115
    records: list[dict[str, Any]] = []
    steps = range(start_step, cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc or cfg.selector, initial=start_step, total=cfg.steps)

    def _eval() -> float:
        return evaluate(
            policy,
            eval_states,
            temperature=cfg.temperature,
            greedy=cfg.eval_greedy,
            seed=cfg.seed + 1,
            config=env_cfg,
        )

    init_success = _eval() if start_step == 0 else None
    try:
        for step in steps:
            prompts = _step_prompts(cfg, step, env_cfg, pool)
            t0 = time.perf_counter()
            batch = rollout(
                policy,
                env,
                prompts.repeat_interleave(cfg.group_size),
                temperature=cfg.temperature,
                generator=torch.Generator().manual_seed(cfg.seed * 7_919 + step),
                with_entropy=cfg.selector == "entropy_topk",
            )
            t1 = time.perf_counter()
            policy.train()
            out = update(
                policy,
                optimizer,
                batch,
                group,
                cfg,
                masker=masker,
                generator=torch.Generator().manual_seed(cfg.seed * 104_729 + step),
                probe=cfg.probe_every > 0 and step % cfg.probe_every == 0,
            )
            t2 = time.perf_counter() - out.get("probe_s", 0.0)
            record: dict[str, Any] = {
                "step": step,
                "selector": cfg.selector,
                "budget": cfg.budget,
                "seed": cfg.seed,
                "num_traj": n_traj,
                "train_success": float(batch.success.float().mean()),
                "rollout_s": t1 - t0,
                "update_s": t2 - t1,
                "chunks_executed": int(batch.valid.sum()),
                "chunks_updated": out["chunks"],
                "loss": out["loss"],
                "clip_frac": out["clip_frac"],
                "grad_norm": out["grad_norm"],
                "entropy": out["entropy"],
            }
            if "probe_cosine" in out:
                record["probe_cosine"] = out["probe_cosine"]
            info = out["info"]
            if info is None:  # logging only, outside the timed update
                _, info = score_phases(masker, batch, group)
            record.update(
                phase_stats(out["selection"], info, selected_by_masker=cfg.selector == "pcm")
            )
            if init_success is not None and step == start_step:
                record["eval_success_init"] = init_success
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                t3 = time.perf_counter()
                record["eval_success"] = _eval()
                record["eval_s"] = time.perf_counter() - t3
            records.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if progress and "eval_success" in record:
                steps.set_postfix(success=record["eval_success"], chunks=record["chunks_updated"])
    finally:
        if log is not None:
            log.close()
    return TrainResult(
        records=records,
        optimizer_state=optimizer.state_dict(),
        masker_state=masker.state_dict(),
    )
