"""What each chunk selector costs in gradient signal on the testbed's SFT policy.

    python benchmarks/selector_diagnostics.py --out runs/diag2 --batches 30
    python benchmarks/selector_diagnostics.py --out runs/diag2 --report benchmarks/results/selector_diagnostics.json

For each of `--batches` independent rollout batches (8 prompts x 8 rollouts from the seed-0 SFT
checkpoint of the main job, fresh initial states and sampling seeds per batch) it computes the
full GRPO gradient and each selector's gradient on the same batch, sketches them
(`chunkmask.eval.GradientSketch`) and saves the sketches per batch, so an interrupted run resumes
where it stopped. The report is `chunkmask.eval.selector_statistics` per selector (second-moment
inflation, signal ratio, predicted per-step efficiency, jackknife SEs over batches) and the phase
shares of the PCM gradient (`chunkmask.eval.phase_shares`).

The policy is not updated: every gradient is the on-policy gradient at the SFT checkpoint (ratio 1),
the quantity a first step would follow. Selectors, all at the testbed's `B = 12` unless stated:

- `random`: B chunks uniformly (the paper's RQ4 ablation);
- `pcm`, `pcm_ht`: the masker with Eq. 11 / Horvitz-Thompson;
- `random_aa`, `pcm_aa`, `pcm_aa_ht`: the same with advantage-aware budgets (no chunks where
  A = 0, the same total spread over the other trajectories);
- `top_phase`: the top-V phase's chunks only (RQ4's full masking);
- `entropy_topk`: the B chunks of highest mean token entropy (App. C);
- `pods`: max-variance down-sampling, 2 of each group's 8 rollouts with all their chunks (about
  the chunk count of the others), advantages recomputed on the kept rollouts;
- `pcm_cause_aa`: PCM scored only on the chunks up to the first grasp attempt
  (`label_grasp_onset`, `scored_phases`), robust buffer (`window="weighted"`, `min_groups=4`),
  advantage-aware budgets;
- `pps_ht`: Horvitz-Thompson with probability proportional to |A_i| x `chunk_score_norm`
  (`pps_sample`, B per trajectory on average over the batch).

`efficiency` is scale-free (signal ratio squared over inflation), so selectors whose losses are
normalised differently (PODS) compare on it; `efficiency / chunk_fraction` is the predicted
progress per unit of backward compute relative to full GRPO.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from chunkmask import (
    NUM_PHASES,
    ChunkBudget,
    LossNormalizers,
    PhaseScoring,
    ProbabilisticChunkMasker,
    Selection,
    aggregate_loss,
    clipped_surrogate,
    group_relative_advantages,
    masked_grpo_loss,
    plackett_luce_sample,
    pps_sample,
    shrink,
)
from chunkmask.baselines import max_variance_downsample
from chunkmask.eval import GradientSketch, phase_shares, selector_statistics
from chunkmask.pcm import (
    Phase,
    advantage_aware_budgets,
    chunk_score_norm,
    top_phase_sample,
    topk_sample,
    uniform_sample,
)
from chunkmask.testbed import (
    PickPlaceConfig,
    PickPlaceVectorEnv,
    TrainConfig,
    rollout,
    sample_initial_states,
)
from chunkmask.testbed.demo import DemoConfig, make_policy, sft_checkpoint
from chunkmask.testbed.trainer import make_masker

SELECTORS = (
    "random",
    "pcm",
    "pcm_ht",
    "random_aa",
    "pcm_aa",
    "pcm_aa_ht",
    "top_phase",
    "entropy_topk",
    "pods",
    "pcm_cause_aa",
    "pps_ht",
)
PHASE_SHARES = ("pcm",)
# Selectors whose expectation is the full gradient by construction (signal ratio exactly 1):
# uniform chunks under a per-trajectory token mean with equal-length chunks, and Horvitz-Thompson.
UNBIASED = ("random", "pcm_ht", "random_aa", "pcm_aa_ht", "pps_ht")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the per-batch sketches")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="the SFT checkpoint's seed")
    p.add_argument("--sketch-dim", type=int, default=8192)
    p.add_argument("--budget", type=int, default=12)
    p.add_argument("--pods-keep", type=int, default=2, help="rollouts kept per group by PODS")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a seconds-long run for tests")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    return p.parse_args(argv)


def setup(args):
    cfg = DemoConfig.quick() if args.quick else DemoConfig(seed=args.seed)
    env_cfg = PickPlaceConfig(max_steps=cfg.max_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    state = sft_checkpoint(cfg, env_cfg, args.out / f"sft_seed{cfg.seed}.pt")
    policy = make_policy(cfg, env_cfg)
    policy.load_state_dict(state)
    policy.gradient_checkpointing = False  # no update follows: keep activations, skip recomputing
    return cfg, env_cfg, policy


def loss_of(policy, batch, adv, sel, train: TrainConfig, **kwargs):
    """The masked GRPO loss of the packed selection (ratio 1: the on-policy gradient)."""
    tree = {"obs": batch.obs, "tokens": batch.tokens, "old_logp": batch.logp, "adv": adv}
    inclusion = kwargs.pop("inclusion", None)
    if inclusion is not None:
        sel = sel.with_inclusion(inclusion.float())
    packed = shrink(tree, sel)
    logp, _ = policy.log_prob(packed["obs"], packed["tokens"], temperature=train.temperature)
    out = masked_grpo_loss(
        logp,
        old_logp=packed["old_logp"],
        advantages=packed["adv"],
        selection=sel,
        clip=train.clip,
        **kwargs,
    )
    return out.loss, logp, packed


def phase_parts(policy, logp, packed, sel, phases, train):
    """Per-phase parts of the seq-mean-token-mean loss with the whole selection's normalisers."""
    surrogate = clipped_surrogate(
        logp, old_logp=packed["old_logp"], advantages=packed["adv"], clip=train.clip
    ).loss
    segment = sel.packed_traj_index(size=logp.shape[0])
    tokens = logp.shape[1]
    per_traj = sel.counts * tokens
    g = int((per_traj > 0).sum())
    chunk_phase = shrink({"phase": phases}, sel)["phase"]
    parts = []
    for c in range(NUM_PHASES):
        in_phase = (chunk_phase == c).to(logp.dtype)
        parts.append(
            aggregate_loss(
                surrogate,
                None,
                "seq-mean-token-mean",
                segment=segment,
                num_segments=sel.num_traj,
                weights=in_phase,
                seq_num_tokens=per_traj,
                global_batch_size=max(g, 1),
            )
        )
    return parts


def one_batch(b, args, cfg, env_cfg, policy, maskers, sketch):
    train = cfg.train
    prompts, group_size = train.prompts_per_step, train.group_size
    env = PickPlaceVectorEnv(prompts * group_size, env_cfg)
    states = sample_initial_states(
        prompts, config=env_cfg, generator=torch.Generator().manual_seed(10_000 + b)
    )
    batch = rollout(
        policy,
        env,
        states.repeat_interleave(group_size),
        temperature=train.temperature,
        generator=torch.Generator().manual_seed(20_000 + b),
        with_entropy=True,
    )
    group = torch.arange(prompts).repeat_interleave(group_size)
    success = batch.success
    adv = group_relative_advantages(success.float(), group)
    valid = batch.valid
    num_traj, n = valid.shape
    params = [p for p in policy.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(30_000 + b)

    def grad_sketch(loss, retain=False):
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return sketch(grads)

    record = {"chunks_valid": int(valid.sum()), "success": float(success.float().mean()),
              "informative": float((adv != 0).float().mean())}
    info = maskers["pcm"].update(actions=batch.actions, success=success, group=group, valid=valid)
    sel_pcm = maskers["pcm"].draw(info.phases, valid=valid)
    sel_aa = maskers["pcm_aa"].select(
        actions=batch.actions, success=success, group=group, valid=valid, advantages=adv
    )
    sel_cause = maskers["pcm_cause_aa"].select(
        actions=batch.actions, success=success, group=group, valid=valid, advantages=adv
    )
    sel_pps = pps_sample(
        adv.abs()[:, None] * chunk_score_norm(batch.logp), args.budget, valid=valid,
        generator=gen,
    )
    phases = info.phases
    full = Selection.from_mask(valid)
    loss, _, _ = loss_of(policy, batch, adv, full, train)
    record["full"] = grad_sketch(loss)
    record["chunks"] = {"full": int(valid.sum())}
    keep = max_variance_downsample(success.float(), group, args.pods_keep)
    adv_pods = group_relative_advantages(success.float(), group, valid=keep)
    reaching = (adv != 0) & valid.any(1)  # B per trajectory that reaches the update
    budgets = advantage_aware_budgets(
        adv, valid.sum(1), args.budget, max_budget=n, total_budget=args.budget * reaching.sum()
    )
    uniform = valid.to(torch.float32)
    selections = {
        "random": (uniform_sample(valid, args.budget, generator=gen), {}),
        "pcm": (sel_pcm, {}),
        "pcm_ht": (sel_pcm, {"estimator": "horvitz_thompson"}),
        "random_aa": (
            plackett_luce_sample(uniform, budgets, valid=valid, generator=gen),
            {"norms": LossNormalizers(global_batch_size=num_traj)},
        ),
        "pcm_aa": (sel_aa, {"norms": LossNormalizers(global_batch_size=num_traj)}),
        "pcm_aa_ht": (sel_aa, {"estimator": "horvitz_thompson"}),
        "top_phase": (
            top_phase_sample(info.phases, info.scores, args.budget, valid=valid, generator=gen),
            {},
        ),
        "entropy_topk": (topk_sample(batch.entropy, args.budget, valid=valid), {}),
        "pods": (Selection.from_mask(valid & keep[:, None]), {"_adv": adv_pods}),
        "pcm_cause_aa": (sel_cause, {"norms": LossNormalizers(global_batch_size=num_traj)}),
        "pps_ht": (sel_pps, {"estimator": "horvitz_thompson"}),
    }
    for name, (sel, kwargs) in selections.items():
        kwargs = dict(kwargs)
        selector_adv = kwargs.pop("_adv", adv)
        loss, logp, packed = loss_of(policy, batch, selector_adv, sel, train, **kwargs)
        record["chunks"][name] = int(logp.shape[0])
        if name in PHASE_SHARES:
            parts = phase_parts(policy, logp, packed, sel, phases, train)
            record[name] = grad_sketch(loss, retain=True)
            record[f"{name}_parts"] = torch.stack(
                [grad_sketch(p, retain=i < NUM_PHASES - 1) for i, p in enumerate(parts)]
            )
        else:
            record[name] = grad_sketch(loss)
    record["phase_chunks"] = torch.stack(
        [((phases == c) & valid).sum() for c in range(NUM_PHASES)]
    ).tolist()
    return record


def run(args):
    torch.set_num_threads(args.threads)
    cfg, env_cfg, policy = setup(args)
    train = cfg.train
    sketch = GradientSketch(dim=args.sketch_dim, seed=0)
    scoring = PhaseScoring(refresh_every=train.refresh_every, p_min=train.p_min)
    maskers = {
        "pcm": ProbabilisticChunkMasker(
            budget=args.budget, scoring=scoring, inclusion=True, seed=0,
        ),
        "pcm_aa": ProbabilisticChunkMasker(
            budget=ChunkBudget(args.budget, advantage_aware=True), scoring=scoring,
            inclusion=True, seed=0,
        ),
        "pcm_cause_aa": make_masker(TrainConfig(
            selector="pcm", budget=args.budget, refresh_every=train.refresh_every,
            p_min=train.p_min, seed=0, advantage_aware=True, phase_rule="onset",
            score_until_onset=True, score_window="weighted", min_groups=4.0,
        )),
    }
    state_path = args.out / "maskers.pt"
    batches = 3 if args.quick else args.batches
    for b in range(batches):
        path = args.out / f"batch{b:03d}.pt"
        if path.exists():
            continue
        if state_path.exists():  # resume: the maskers' buffers as they were after batch b - 1
            saved = torch.load(state_path)
            if saved["after"] == b - 1:
                for name, m in maskers.items():
                    m.load_state_dict(saved[name])
        start = time.perf_counter()
        record = one_batch(b, args, cfg, env_cfg, policy, maskers, sketch)
        record["seconds"] = time.perf_counter() - start
        torch.save(record, path)
        torch.save({"after": b, **{k: m.state_dict() for k, m in maskers.items()}}, state_path)
        print(f"batch {b}: {record['seconds']:.1f} s, success {record['success']:.2f}", flush=True)
    return report(args)


def finite(x):
    """A float, or None for NaN/Inf (no gradient at all, e.g. a batch where every group agrees)."""
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def report(args):
    records = [torch.load(p) for p in sorted(args.out.glob("batch*.pt"))]
    if len(records) < 3:
        raise SystemExit(f"need at least 3 batches for statistics, found {len(records)}")
    full = torch.stack([r["full"] for r in records])
    out = {
        "batches": len(records),
        "success_mean": sum(r["success"] for r in records) / len(records),
        "informative_fraction": sum(r["informative"] for r in records) / len(records),
        "selectors": {},
        "phase_shares": {},
    }
    chunks_full = sum(r["chunks"]["full"] for r in records)
    base = selector_statistics(full, full)
    out["full_signal_fraction"] = finite(base.full_signal_fraction)
    out["full_signal_fraction_se"] = finite(base.full_signal_fraction_se)
    for name in SELECTORS:
        stats = selector_statistics(full, torch.stack([r[name] for r in records]))
        fraction = sum(r["chunks"][name] for r in records) / chunks_full
        row = {k: finite(v) for k, v in stats._asdict().items() if k != "num_batches"}
        row["chunk_fraction"] = fraction
        eff = row["efficiency"]
        row["efficiency_per_compute"] = eff / fraction if eff is not None and fraction > 0 else None
        row["unbiased"] = name in UNBIASED
        if name in UNBIASED and row["second_moment_ratio"]:
            # signal ratio 1 exactly, so efficiency = 1 / inflation (delta-method SE)
            infl, infl_se = row["second_moment_ratio"], row["second_moment_ratio_se"]
            row["efficiency_unbiased"] = 1.0 / infl
            row["efficiency_unbiased_se"] = infl_se / infl**2
            row["efficiency_unbiased_per_compute"] = 1.0 / (infl * fraction) if fraction else None
        out["selectors"][name] = row
    for name in PHASE_SHARES:
        parts = torch.stack([r[f"{name}_parts"] for r in records])
        shares = phase_shares(full, parts)
        out["phase_shares"][name] = {
            Phase(c).name.lower(): {
                "signal": finite(shares.signal[c]),
                "signal_se": finite(shares.signal_se[c]),
                "second_moment": finite(shares.second_moment[c]),
                "second_moment_se": finite(shares.second_moment_se[c]),
            }
            for c in range(NUM_PHASES)
        }
    phase_chunks = torch.tensor([r["phase_chunks"] for r in records]).sum(0)
    out["phase_chunk_fraction"] = {
        Phase(c).name.lower(): int(phase_chunks[c]) / int(phase_chunks.sum())
        for c in range(NUM_PHASES)
    }
    out["seconds_per_batch"] = sum(r["seconds"] for r in records) / len(records)
    print(table(out))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(out):
    lines = [
        f"{out['batches']} batches; full-gradient signal fraction "
        f"{fmt(out['full_signal_fraction'], '.4f')} ± {fmt(out['full_signal_fraction_se'], '.4f')}; "
        f"informative trajectories {out['informative_fraction']:.2f}",
        "",
        "| selector | chunks | inflation | signal ratio (measured) | efficiency if unbiased | "
        "per unit compute |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in out["selectors"].items():
        unbiased = r.get("efficiency_unbiased")
        lines.append(
            f"| {name} | {r['chunk_fraction']:.3f} | {fmt(r['second_moment_ratio'])} ± "
            f"{fmt(r['second_moment_ratio_se'])} | {fmt(r['signal_ratio'])} ± "
            f"{fmt(r['signal_ratio_se'])} | "
            + (f"{unbiased:.3f} ± {r['efficiency_unbiased_se']:.3f} | "
               f"{fmt(r['efficiency_unbiased_per_compute'])} |" if unbiased else "biased | – |")
        )
    lines += ["", "| phase | chunks | pcm: signal share | pcm: second-moment share |",
              "|---|---|---|---|"]
    for phase, frac in out["phase_chunk_fraction"].items():
        p = out["phase_shares"]["pcm"][phase]
        lines.append(
            f"| {phase} | {frac:.2f} | {fmt(p['signal'])} ± {fmt(p['signal_se'])} | "
            f"{fmt(p['second_moment'])} ± {fmt(p['second_moment_se'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    if args.report is not None and not args.quick and any(args.out.glob("batch*.pt")) and (
        len(list(args.out.glob("batch*.pt"))) >= args.batches
    ):
        report(args)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
