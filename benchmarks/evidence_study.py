"""Paired, powered study of chunk masking on the testbed: does a masked update learn as GRPO does?

    python benchmarks/evidence_study.py --out runs/evidence --results docs/evidence --seeds 0-19
    python benchmarks/evidence_study.py --results docs/evidence --report docs/evidence.md

Design (fixed before any result was seen):

- every arm runs with dynamic sampling (groups with success rate outside [0.1, 0.9] dropped, as in
  SimpleVLA-RL), so the compute baseline is fair;
- per seed, every arm starts from the same SFT checkpoint and uses the same prompts and rollout
  seeds per step (`TrainConfig.seed`);
- final success is measured on `--eval-episodes` (default 1000) fresh initial states drawn per
  seed and shared by all arms of that seed, and the SFT start is measured on the same states;
- arms: `grpo` (full), `pcm` (the paper's Eq. 11, B = 12), `random_aa` and `pcm_aa` (advantage-
  aware budgets: no chunks where A = 0, the same total spread over the others; the arms the
  gradient diagnostics predict to do best);
- the claim tested is equivalence per step at the pre-registered margin of ±5 success points
  (TOST, alpha = 0.05 each side), from paired per-seed differences; 20 seeds at least.

Each finished seed writes `RESULTS/seed{s}.json` (small, committed); each finished arm of a seed
is cached under `OUT`, so an interrupted study resumes mid-seed. `--report` aggregates whatever
seeds exist with `chunkmask.paired_difference` and `chunkmask.equivalence_test`.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from chunkmask import equivalence_test, paired_difference, pairs_for_halfwidth
from chunkmask.testbed import PickPlaceConfig, TrainConfig, sample_initial_states, train
from chunkmask.testbed.demo import DemoConfig, make_policy, sft_checkpoint
from chunkmask.testbed.trainer import evaluate

ARMS = {
    "grpo": dict(selector="full"),
    "pcm": dict(selector="pcm"),
    "random_aa": dict(selector="random", advantage_aware=True),
    "pcm_aa": dict(selector="pcm", advantage_aware=True),
}
MARGIN_PP = 5.0


def seeds_of(text):
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/evidence"), help="checkpoints, caches")
    p.add_argument("--results", type=Path, default=Path("docs/evidence"), help="per-seed JSON")
    p.add_argument("--seeds", type=seeds_of, default=seeds_of("0-19"))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-episodes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a seconds-long run for tests")
    p.add_argument("--report", type=Path, default=None, help="write the report (md + json)")
    return p.parse_args(argv)


def run_seed(seed, args):
    """Train every arm from seed `seed`'s SFT checkpoint; return the seed's record."""
    cfg = DemoConfig.quick() if args.quick else DemoConfig(seed=seed)
    cfg.seed = seed
    env_cfg = PickPlaceConfig(max_steps=cfg.max_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    state = sft_checkpoint(cfg, env_cfg, args.out / f"sft_seed{seed}.pt")
    episodes = 4 if args.quick else args.eval_episodes
    states = sample_initial_states(
        episodes, config=env_cfg, generator=torch.Generator().manual_seed(90_000 + seed)
    )

    def fresh_success(policy):
        return evaluate(policy, states, seed=80_000 + seed, config=env_cfg)

    policy = make_policy(cfg, env_cfg)
    policy.load_state_dict(state)
    record = {"seed": seed, "eval_episodes": episodes, "arms": {}}
    record["sft_success"] = fresh_success(policy)
    base = cfg.train
    for arm in args.arms:
        cache = args.out / f"seed{seed}_{arm}.json"
        if cache.exists():
            record["arms"][arm] = json.loads(cache.read_text())
            continue
        policy = make_policy(cfg, env_cfg)
        policy.load_state_dict(state)
        tc = TrainConfig(
            **{
                **{f: getattr(base, f) for f in base.__dataclass_fields__},
                "steps": 2 if args.quick else args.steps,
                "eval_every": 10_000,  # only the final, fresh evaluation below counts
                "eval_episodes": 2 if args.quick else 16,
                "seed": seed,
                "dynamic_sampling": True,
                "advantage_aware": False,
                "estimator": "masked",
                **ARMS[arm],
            }
        )
        start = time.perf_counter()
        result = train(policy, tc, env_config=env_cfg)
        recs = result.records
        row = {
            "final_success": fresh_success(policy),
            "update_s": sum(r["update_s"] for r in recs),
            "rollout_s": sum(r["rollout_s"] for r in recs),
            "chunks_updated": sum(r["chunks_updated"] for r in recs),
            "chunks_executed": sum(r["chunks_executed"] for r in recs),
            "train_success": [r["train_success"] for r in recs],
            "wall_s": time.perf_counter() - start,
        }
        cache.write_text(json.dumps(row))
        record["arms"][arm] = row
        print(f"seed {seed} {arm}: success {row['final_success']:.3f}, "
              f"update {row['update_s']:.0f} s", flush=True)
    return record


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def report(results: Path, out: Path):
    seeds = [json.loads(p.read_text()) for p in sorted(results.glob("seed*.json"))]
    if len(seeds) < 2:
        raise SystemExit(f"need at least 2 finished seeds in {results}, found {len(seeds)}")
    grpo = [s["arms"]["grpo"]["final_success"] * 100 for s in seeds]
    grpo_update = sum(s["arms"]["grpo"]["update_s"] for s in seeds)
    sft = [s["sft_success"] * 100 for s in seeds]
    gain = paired_difference(grpo, sft)
    rq1 = {}
    for arm in ARMS:
        if arm == "grpo" or any(arm not in s["arms"] for s in seeds):
            continue
        values = [s["arms"][arm]["final_success"] * 100 for s in seeds]
        diff = paired_difference(values, grpo)
        tost = equivalence_test(values, grpo, margin=MARGIN_PP)
        update = sum(s["arms"][arm]["update_s"] for s in seeds)
        grpo_chunks = sum(s["arms"]["grpo"]["chunks_updated"] for s in seeds)
        rq1[arm] = {
            "final_success": sum(values) / len(values),
            "diff_vs_grpo_pp": diff.mean,
            "diff_ci95_pp": [diff.low, diff.high],
            "per_seed_diff_pp": [v - g for v, g in zip(values, grpo, strict=True)],
            "tost_equivalent": tost.equivalent,
            "tost_p": tost.p_value,
            "seeds": len(values),
            "update_speedup": grpo_update / update if update else None,
            "chunks_fraction": sum(s["arms"][arm]["chunks_updated"] for s in seeds) / grpo_chunks
            if grpo_chunks
            else None,
            "pairs_for_5pp_halfwidth": pairs_for_halfwidth(diff.sd, MARGIN_PP),
        }
    data = {
        "design": {"margin_pp": MARGIN_PP, "eval_episodes": seeds[0]["eval_episodes"],
                   "dynamic_sampling": True, "seeds": [s["seed"] for s in seeds]},
        "sft_success": sum(sft) / len(sft),
        "grpo": {"final_success": sum(grpo) / len(grpo), "gain_vs_sft_pp": gain.mean,
                 "gain_ci95_pp": [gain.low, gain.high]},
        "rq1": {"arms": rq1},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        f"{len(seeds)} paired seeds, {data['design']['eval_episodes']} fresh evaluation episodes "
        f"each; SFT {data['sft_success']:.1f}%, GRPO {data['grpo']['final_success']:.1f}% "
        f"(gain {gain.mean:+.1f} pp, 95% CI [{gain.low:+.1f}, {gain.high:+.1f}])",
        "",
        "| arm | final success | vs GRPO (pp) | 95% CI | TOST ±5 pp | update speedup | chunks |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in rq1.items():
        lines.append(
            f"| {arm} | {r['final_success']:.1f}% | {r['diff_vs_grpo_pp']:+.1f} | "
            f"[{r['diff_ci95_pp'][0]:+.1f}, {r['diff_ci95_pp'][1]:+.1f}] | "
            f"{'equivalent' if r['tost_equivalent'] else 'not shown'} (p {r['tost_p']:.2f}) | "
            f"{fmt(r['update_speedup'], '.2f')}x | {fmt(r['chunks_fraction'], '.1%')} |"
        )
    text = "\n".join(lines)
    print(text)
    out.with_suffix(".md").write_text(
        "# Evidence study: paired seeds, fresh evaluation episodes\n\n"
        "Generated by `python benchmarks/evidence_study.py --results docs/evidence --report "
        "docs/evidence.md` from the per-seed files in `docs/evidence/`; the design is in the "
        "script's docstring.\n\n" + text + "\n"
    )
    return data, text


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.report is None or args.quick:  # run (or resume) the seeds; --report alone only reports
        args.results.mkdir(parents=True, exist_ok=True)
        for seed in (args.seeds[:2] if args.quick else args.seeds):
            path = args.results / f"seed{seed}.json"
            if path.exists():
                continue
            record = run_seed(seed, args)
            path.write_text(json.dumps(record, indent=1) + "\n")
    if args.report is not None:
        report(args.results, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
