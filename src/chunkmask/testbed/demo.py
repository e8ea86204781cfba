"""The main job: SFT, then GRPO and PCM from the same checkpoint, a summary table and plots."""

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from chunkmask._checks import check_positive_int, check_range
from chunkmask.pcm import suggest_budget
from chunkmask.testbed.env import PickPlaceConfig, PickPlaceVectorEnv, sample_initial_states
from chunkmask.testbed.expert import collect_demonstrations
from chunkmask.testbed.plots import (
    eval_curve,
    plot_captured_v,
    plot_phase_allocation,
    plot_success,
)
from chunkmask.testbed.policy import TokenChunkPolicy
from chunkmask.testbed.rollout import rollout
from chunkmask.testbed.sft import behaviour_cloning
from chunkmask.testbed.trainer import (
    TrainConfig,
    held_out_states,
    make_masker,
    prompt_pool_states,
    score_phases,
    train,
)

DEFAULT_ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"selector": "full"},
    "pcm": {"selector": "pcm"},  # the paper's masked objective, Eq. 11
    "pcm_ht": {"selector": "pcm", "estimator": "horvitz_thompson"},
}
"""GRPO, the paper's PCM and PCM with the unbiased Horvitz-Thompson estimator."""

STUDY_ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"selector": "full"},
    "pcm": {"selector": "pcm"},
    # The v3 study's best ~19% arm by its pre-registered rule (`evidence_v3.main_job_variant`):
    # PPS (pi proportional to |A| x score norm) with the unbiased Horvitz-Thompson estimator.
    "pps_ht": {"selector": "pps", "estimator": "horvitz_thompson"},
}
"""The arms of the main job in the study's regime (`DemoConfig.study`), all at B = 5."""

STUDY_FINDING = (
    "v3 study (docs/reproduction.md, 20 paired seeds, 80 updates): no masked arm is equivalent "
    "to GRPO (+28.4 pp over SFT); after equal updates PCM (Eq. 11) ends 27.3 pp below GRPO and "
    "the best compute-matched arm, pps_ht, 13.9 pp below [-17.6, -10.2]; against GRPO at the "
    "same training time (exploratory) pps_ht is -1.7 pp [-5.1, +1.6] and PCM -14.8 pp"
)
"""One line: what the project's compute-matched study found (printed by the main job)."""


@dataclass
class DemoConfig:
    """Sizes of the main job (the defaults are the full demo; `quick()` is a smoke test).

    Attributes:
        seed: seeds demonstrations, SFT and RL.
        demos: expert episodes for SFT.
        expert_noise: Gaussian noise of the expert's motion commands (action units).
        sft_steps: behaviour-cloning steps.
        sft_smoothing: width in bins of the SFT label smoothing.
        d_model: policy width.
        depth: policy layers.
        train: the GRPO/PCM `TrainConfig` (its `selector` is set per run).
        max_steps: environment time limit (steps).
        threshold_frac: the success threshold is this fraction of GRPO's final success.
        final_window: evaluations averaged into "final success" and into the smoothed curve
            used for the time to threshold.
        budget_probe_prompts: prompts of the rollout batch used for the captured-V curve.
        keep_failed_demos: also clone unsuccessful expert episodes (the quick run's episodes are
            too short for the expert to finish).
        arms: the runs, by name, each a dict of `TrainConfig` fields that override `train`
            (all start from the same SFT checkpoint and share prompts and seeds). `"grpo"` (every
            chunk) must be one of them: it is the reference of the summary. The default is GRPO,
            the paper's PCM (Eq. 11) and PCM with the Horvitz-Thompson estimator.
        num_objects: objects on the table (the task picks one; `PickPlaceConfig.num_objects`).
        distraction: share of the demonstrations in which the expert puts a wrong object in
            the bin (`collect_demonstrations(distraction=...)`).
        speed: time scale of the task: the arm moves, turns, closes and objects fall `speed`
            times as far per step as in `PickPlaceConfig`'s defaults, so an episode takes about
            `1 / speed` as many steps (set `max_steps` to match, e.g. 256 at speed 2).
    """

    seed: int = 0
    demos: int = 100
    expert_noise: float = 0.05
    sft_steps: int = 600
    sft_smoothing: float = 0.5
    d_model: int = 128
    depth: int = 4
    train: TrainConfig = field(default_factory=TrainConfig)
    max_steps: int = 512
    threshold_frac: float = 0.98
    final_window: int = 3
    budget_probe_prompts: int = 8
    keep_failed_demos: bool = False
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ARMS))
    num_objects: int = 1
    distraction: float = 0.0
    speed: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "demos",
            "sft_steps",
            "d_model",
            "depth",
            "max_steps",
            "final_window",
            "budget_probe_prompts",
            "num_objects",
        ):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.seed, "seed", allow_zero=True)
        check_range(self.expert_noise, "expert_noise", low=0.0)
        check_range(self.sft_smoothing, "sft_smoothing", low=0.0)
        check_range(self.distraction, "distraction", low=0.0, high=1.0)
        check_range(self.speed, "speed", low=0.0, low_open=True)
        check_range(self.threshold_frac, "threshold_frac", low=0.0, high=1.0, low_open=True)
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"`train` must be a TrainConfig, got {type(self.train).__name__}.")
        if not isinstance(self.arms, dict) or "grpo" not in self.arms:
            raise ValueError(
                f"`arms` must be a dict of runs that includes 'grpo' (the reference), got "
                f"{self.arms!r}."
            )
        known = set(TrainConfig.__dataclass_fields__)
        for name, overrides in self.arms.items():
            bad = sorted(set(overrides) - known) if isinstance(overrides, dict) else None
            if bad is None or bad:
                raise ValueError(
                    f"`arms[{name!r}]` must be a dict of TrainConfig fields, got {overrides!r}"
                    + (f" (unknown: {bad})" if bad else "")
                )
            replace(self.train, **overrides).validate()

    def env_config(self) -> PickPlaceConfig:
        """The environment of this configuration."""
        base = PickPlaceConfig()
        return PickPlaceConfig(
            max_steps=self.max_steps,
            num_objects=self.num_objects,
            max_move=base.max_move * self.speed,
            max_turn=base.max_turn * self.speed,
            grip_rate=min(1.0, base.grip_rate * self.speed),
            fall_speed=base.fall_speed * self.speed,
        )

    @staticmethod
    def study(steps: int = 40) -> "DemoConfig":
        """The main job in the v3 study's regime (`docs/evidence_v3/PLAN.md`), `steps` long.

        The task at `speed=2` from 50 demonstrations, a fixed pool of 16 initial states, 8 x 16
        rollouts per step with dynamic sampling, one AdamW step per batch at lr 3e-5; the masked
        arms keep B = 5 chunks per trajectory (about 19% of GRPO's, the paper's 12 of 64).
        Evaluation: 256 episodes from the pool every 10 steps. The arms are `STUDY_ARMS`.
        """
        return DemoConfig(
            demos=50,
            speed=2.0,
            max_steps=256,
            train=TrainConfig(
                steps=steps,
                prompts_per_step=8,
                group_size=16,
                mini_batch=128,
                prompt_pool=16,
                lr=3e-5,
                budget=5,
                dynamic_sampling=True,
                eval_episodes=256,
                eval_every=10,
            ),
            arms=dict(STUDY_ARMS),
        )

    @staticmethod
    def quick() -> "DemoConfig":
        """A seconds-long configuration with the same outputs."""
        return DemoConfig(
            demos=2,
            sft_steps=3,
            d_model=16,
            depth=1,
            train=TrainConfig(
                steps=2,
                prompts_per_step=2,
                group_size=3,
                budget=3,
                eval_episodes=3,
                eval_every=1,
                mini_batch=3,
            ),
            max_steps=32,
            budget_probe_prompts=2,
            keep_failed_demos=True,
        )


def make_policy(cfg: DemoConfig, env_cfg: PickPlaceConfig) -> TokenChunkPolicy:
    """The demo's policy architecture."""
    env = PickPlaceVectorEnv(1, env_cfg)
    return TokenChunkPolicy(
        env.layout,
        num_tasks=env_cfg.num_objects,
        d_model=cfg.d_model,
        depth=cfg.depth,
        heads=4 if cfg.d_model % 4 == 0 else 1,
        gradient_checkpointing=True,
    )


def sft_checkpoint(
    cfg: DemoConfig, env_cfg: PickPlaceConfig, path: Path, *, progress: bool = False
) -> dict[str, Any]:
    """Behaviour-clone a policy on expert demonstrations; cached at `path`."""
    if path.exists():
        return torch.load(path)
    torch.manual_seed(cfg.seed)
    demos = collect_demonstrations(
        cfg.demos,
        config=env_cfg,
        seed=cfg.seed + 17,
        noise=cfg.expert_noise,
        successful_only=not cfg.keep_failed_demos,
        distraction=cfg.distraction,
    )
    policy = make_policy(cfg, env_cfg)
    # Supervised batches are small enough to keep every activation: no recomputation here.
    policy.gradient_checkpointing = False
    behaviour_cloning(
        policy,
        demos,
        steps=cfg.sft_steps,
        smoothing=cfg.sft_smoothing,
        generator=torch.Generator().manual_seed(cfg.seed),
        progress=progress,
    )
    state = policy.state_dict()
    torch.save(state, path)
    return state


def captured_v_curve(
    policy: TokenChunkPolicy, cfg: DemoConfig, env_cfg: PickPlaceConfig
) -> dict[str, Any]:
    """Rollout groups from `policy`, their phase scores `V_c`, and the budget knee (App. D)."""
    group_size = cfg.train.group_size
    prompts = sample_initial_states(
        cfg.budget_probe_prompts,
        config=env_cfg,
        generator=torch.Generator().manual_seed(cfg.seed + 555),
    )
    env = PickPlaceVectorEnv(cfg.budget_probe_prompts * group_size, env_cfg)
    batch = rollout(
        policy,
        env,
        prompts.repeat_interleave(group_size),
        temperature=cfg.train.temperature,
        generator=torch.Generator().manual_seed(cfg.seed + 556),
    )
    group = torch.arange(cfg.budget_probe_prompts).repeat_interleave(group_size)
    # The masker labels the phases and scores them (V_c, Eq. 5) on this batch; its draw is unused.
    _, info = score_phases(make_masker(cfg.train), batch, group)
    chunk_scores = torch.where(batch.valid, info.scores[info.phases.clamp_min(0)], 0.0)
    result: dict[str, Any] = {
        "V_c": info.scores.tolist(),
        "V_defined": info.defined.tolist(),
        "success_rate": float(batch.success.float().mean()),
    }
    if float(chunk_scores.sum()) > 0:
        s = suggest_budget(chunk_scores, batch.valid)
        result.update(
            budget=s.budget,
            fraction=s.fraction,
            curve_x=s.curve_x.tolist(),
            curve_y=s.curve_y.tolist(),
        )
    else:  # no group with mixed outcomes: no ranking, keep everything
        n = batch.valid.shape[1]
        grid = [m / n for m in range(n + 1)]
        result.update(budget=n, fraction=1.0, curve_x=grid, curve_y=grid)
    return result


def summarize(
    runs: dict[str, list[dict[str, Any]]], *, threshold_frac: float, window: int
) -> dict[str, Any]:
    """Final success, time to threshold, speedups and update share of GRPO and PCM runs."""

    def final(records: list[dict[str, Any]]) -> float:
        _, _, success = eval_curve(records)
        tail = success[-window:]
        return sum(tail) / len(tail)

    grpo_final = final(runs["grpo"])
    threshold = threshold_frac * grpo_final
    out: dict[str, Any] = {"threshold": threshold, "threshold_frac": threshold_frac}
    for name, records in runs.items():
        steps, wall, success = eval_curve(records)
        smooth = [
            sum(success[max(0, i - window + 1) : i + 1])
            / len(success[max(0, i - window + 1) : i + 1])
            for i in range(len(success))
        ]
        hit = next((i for i, s in enumerate(smooth) if i > 0 and s >= threshold), None)
        rollout_s = sum(r["rollout_s"] for r in records)
        update_s = sum(r["update_s"] for r in records)
        executed = sum(r["chunks_executed"] for r in records)
        updated = sum(r["chunks_updated"] for r in records)
        out[name] = {
            "final_success": final(records),
            "initial_success": success[0],
            "time_to_threshold_s": None if hit is None else wall[hit],
            "steps_to_threshold": None if hit is None else steps[hit],
            "train_time_s": rollout_s + update_s,
            "rollout_s": rollout_s,
            "update_s": update_s,
            "update_share": update_s / max(rollout_s + update_s, 1e-9),
            "step_time_s": (rollout_s + update_s) / len(records),
            "update_time_per_step_s": update_s / len(records),
            "fraction_backpropagated": updated / max(executed, 1),
            "chunks_per_trajectory": executed / sum(r["num_traj"] for r in records),
        }
    g = out["grpo"]
    for name in runs:
        if name == "grpo":
            continue
        p = out[name]
        tg, tp = g["time_to_threshold_s"], p["time_to_threshold_s"]
        p["speedup_to_threshold"] = None if not tg or not tp else tg / tp
        p["step_speedup"] = g["step_time_s"] / p["step_time_s"]
        p["update_speedup"] = g["update_time_per_step_s"] / p["update_time_per_step_s"]
        p["final_success_gap_pp"] = 100 * (p["final_success"] - g["final_success"])
    if "pcm" in out:  # the headline comparison, also at the top level
        for key in ("speedup_to_threshold", "step_speedup", "update_speedup"):
            out[key] = out["pcm"][key]
        out["final_success_gap_pp"] = out["pcm"]["final_success_gap_pp"]
    return out


def format_table(summary: dict[str, Any], names: list[str]) -> str:
    """The summary as a Markdown table (one row per run, speedups against GRPO)."""

    def fmt(v: Any, pct: bool = False, unit: str = "") -> str:
        if v is None:
            return "not reached"
        return f"{100 * v:.1f}%" if pct else f"{v:.2f}{unit}"

    lines = [
        "| run | start success | final success | time to threshold | steps to threshold "
        "| speedup to threshold | step time | step speedup | update share "
        "| chunks back-propagated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        s = summary[name]
        speed = "-" if name == "grpo" else fmt(s["speedup_to_threshold"], unit="x")
        step_speed = "-" if name == "grpo" else fmt(s["step_speedup"], unit="x")
        lines.append(
            f"| {name} | {fmt(s['initial_success'], True)} | {fmt(s['final_success'], True)} "
            f"| {fmt(s['time_to_threshold_s'], unit=' s')} | {s['steps_to_threshold'] or '-'} "
            f"| {speed} | {s['step_time_s']:.2f} s | {step_speed} "
            f"| {fmt(s['update_share'], True)} | {fmt(s['fraction_backpropagated'], True)} |"
        )
    lines.append("")
    lines.append(
        f"threshold = {100 * summary['threshold']:.1f}% "
        f"({100 * summary['threshold_frac']:.0f}% of GRPO's final success)"
    )
    for name in names:
        if name == "grpo":
            continue
        s = summary[name]
        lines.append(
            f"{name}: update speedup {s['update_speedup']:.2f}x, "
            f"final-success gap ({name} - GRPO) {s['final_success_gap_pp']:+.1f} pp"
        )
    if "study_finding" in summary:
        lines += ["", f"What the project's compute-matched study found: {summary['study_finding']}."]
    return "\n".join(lines)


def run_demo(
    out: str | Path, cfg: DemoConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Run the main job into `out`; returns (and writes) `out/summary.json`.

    Writes `sft.pt`, one `NAME.jsonl` per arm of `cfg.arms`, `summary.json`, `summary.md` and
    the PNG plots `testbed_success_vs_step.png`, `testbed_success_vs_wallclock.png`,
    `testbed_captured_v.png` and, when a `pcm` arm ran, `testbed_phase_allocation.png`.
    """
    cfg = cfg or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env_cfg = cfg.env_config()
    t0 = time.perf_counter()
    sft_state = sft_checkpoint(cfg, env_cfg, out / "sft.pt", progress=progress)
    sft_s = time.perf_counter() - t0
    if cfg.train.prompt_pool > 0:  # the task is the pool: evaluate on episodes from it
        pool = prompt_pool_states(replace(cfg.train, seed=cfg.seed), env_cfg)
        eval_states = pool.take(torch.arange(cfg.train.eval_episodes) % pool.num)
    else:
        eval_states = held_out_states(cfg.train.eval_episodes, env_cfg)

    probe_policy = make_policy(cfg, env_cfg)
    probe_policy.load_state_dict(sft_state)
    probe = captured_v_curve(probe_policy, cfg, env_cfg)

    runs: dict[str, list[dict[str, Any]]] = {}
    for name, overrides in cfg.arms.items():
        log_path = out / f"{name}.jsonl"
        log_path.unlink(missing_ok=True)
        policy = make_policy(cfg, env_cfg)
        policy.load_state_dict(sft_state)
        train_cfg = replace(cfg.train, **overrides, seed=cfg.seed)
        result = train(
            policy,
            train_cfg,
            env_config=env_cfg,
            log_path=log_path,
            progress=progress,
            desc=name.upper(),
            eval_states=eval_states,
        )
        runs[name] = result.records

    summary = summarize(runs, threshold_frac=cfg.threshold_frac, window=cfg.final_window)
    summary["runs"] = list(runs)
    summary["sft_s"] = sft_s
    summary["total_s"] = time.perf_counter() - t0
    summary["budget"] = cfg.train.budget
    summary["chunks_total"] = -(-cfg.max_steps // 8)
    summary["captured_v"] = probe
    summary["config"] = asdict(cfg)
    summary["threads"] = torch.get_num_threads()
    summary["study_finding"] = STUDY_FINDING

    plot_success(
        runs, out / "testbed_success_vs_step.png", x="step", threshold=summary["threshold"]
    )
    plot_success(
        runs, out / "testbed_success_vs_wallclock.png", x="wall", threshold=summary["threshold"]
    )
    if "pcm" in runs:
        plot_phase_allocation(runs["pcm"], out / "testbed_phase_allocation.png", title="PCM")
    plot_captured_v(
        probe["curve_x"],
        probe["curve_y"],
        out / "testbed_captured_v.png",
        suggested=probe["fraction"],
        budget_fraction=cfg.train.budget / summary["chunks_total"],
    )
    table = format_table(summary, summary["runs"])
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
