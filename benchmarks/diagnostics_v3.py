"""The diagnostics' prediction for the v3 study's arms, at the study's own SFT checkpoints.

    python benchmarks/diagnostics_v3.py --seeds 0-2 --batches 40      # resumable, one thread
    python benchmarks/diagnostics_v3.py --seeds 0-2 --batches 40 \\
        --report benchmarks/results/evidence_v3/diagnostics_prediction.json

The secondary analysis of `docs/evidence_v3/PLAN.md`: before the study's results are known, what
does `chunkmask.eval.selector_statistics` predict for each of its arms? For each seed, the
study's regime (`evidence_v3.study_config`) and SFT checkpoint (the one the study trains from,
cached in `--study-out`), and `--batches` independent rollout batches of 8 prompts x 16 rollouts
from the seed's pool of initial states (prompt and sampling seeds no training step uses). On each
batch, every arm's gradient is the gradient of the testbed's own `update()` with the arm's exact
`TrainConfig` (dynamic sampling, the selector, the estimator, the budget, each arm's masker carried
from batch to batch as in training) at the SFT policy (ratio 1), caught before the optimiser
step and sketched (`GradientSketch`); GRPO's is the reference. Nothing is updated.

Per arm and seed: the second-moment inflation, the signal ratio, the predicted per-step efficiency
(the signal ratio, clipped at 0, squared over inflation; for the Horvitz-Thompson arms, whose
signal ratio is 1 by construction, also 1 / inflation), the chunk fraction and the efficiency per
unit of backward compute, each with its jackknife SE over batches; and the mean over seeds.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import evidence_v3
import torch
from evidence_study import seeds_of

from chunkmask.eval import GradientSketch, selector_statistics
from chunkmask.testbed import rollout
from chunkmask.testbed.demo import make_policy, sft_checkpoint
from chunkmask.testbed.env import PickPlaceVectorEnv
from chunkmask.testbed.trainer import make_masker, prompt_pool_states, update

HT_ARMS = tuple(a for a, c in evidence_v3.ARMS.items() if c.get("estimator") == "horvitz_thompson")


class GradientCatcher(torch.optim.Optimizer):
    """An optimiser whose `step` records the current gradients instead of applying them."""

    def __init__(self, params):
        super().__init__(params, {})
        self.caught = None

    def step(self, closure=None):  # noqa: D102 (records; never updates)
        self.caught = [p.grad for group in self.param_groups for p in group["params"]]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/diagnostics_v3"), help="sketches")
    p.add_argument("--study-out", type=Path, default=Path("runs/evidence_v3"),
                   help="where the study caches its SFT checkpoints")
    p.add_argument("--seeds", type=seeds_of, default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--sketch-dim", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a seconds-long run for tests")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    return p.parse_args(argv)


def run_seed(seed, args):
    """Sketch every arm's gradient on `args.batches` batches of `seed` (resumable per batch)."""
    cfg = evidence_v3.study_config(seed, args.quick)
    env_cfg = cfg.env_config()
    args.study_out.mkdir(parents=True, exist_ok=True)
    state = sft_checkpoint(cfg, env_cfg, args.study_out / f"sft_seed{seed}.pt")
    policy = make_policy(cfg, env_cfg)
    policy.load_state_dict(state)
    policy.gradient_checkpointing = False  # no optimiser step follows: keep the activations
    policy.train()
    catcher = GradientCatcher(policy.parameters())
    sketch = GradientSketch(dim=args.sketch_dim, seed=0)
    # no clipping: the sketch sees the raw gradient of each arm
    configs = {name: replace(cfg.train, **arm, grad_clip=1e12) for name, arm in
               evidence_v3.ARMS.items()}
    maskers = {name: make_masker(tc) for name, tc in configs.items()}
    folder = args.out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    pool = prompt_pool_states(cfg.train, env_cfg)
    tc = cfg.train
    group = torch.arange(tc.prompts_per_step).repeat_interleave(tc.group_size)
    env = PickPlaceVectorEnv(tc.prompts_per_step * tc.group_size, env_cfg)
    batches = 3 if args.quick else args.batches
    for b in range(batches):
        path = folder / f"batch{b:03d}.pt"
        masker_path = folder / "maskers.pt"
        if path.exists():
            continue
        if masker_path.exists():  # resume: the maskers' buffers as they were after batch b - 1
            saved = torch.load(masker_path, weights_only=False)
            if saved["after"] == b - 1:
                for name, m in maskers.items():
                    m.load_state_dict(saved["maskers"][name])
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(900_000 + 1_000 * seed + b)
        prompts = pool.take(torch.randperm(pool.num, generator=gen)[: tc.prompts_per_step])
        with torch.no_grad():
            batch = rollout(policy, env, prompts.repeat_interleave(tc.group_size),
                            temperature=tc.temperature, generator=gen)
        record = {"sketch": {}, "chunks": {}, "success": float(batch.success.float().mean())}
        for name, arm_cfg in configs.items():
            catcher.caught = None
            out = update(policy, catcher, batch, group, arm_cfg, masker=maskers[name],
                         generator=torch.Generator().manual_seed(910_000 + 1_000 * seed + b))
            record["chunks"][name] = out["chunks"]
            record["sketch"][name] = None if catcher.caught is None else sketch(catcher.caught)
        record["seconds"] = time.perf_counter() - t0
        torch.save(record, path)
        torch.save({"after": b, "maskers": {k: m.state_dict() for k, m in maskers.items()}},
                   masker_path)
        print(f"seed {seed} batch {b}: {record['seconds']:.1f} s", flush=True)


def _finite(x):
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def seed_statistics(folder):
    """Per-arm statistics of one seed's sketched batches (batches where GRPO had a gradient)."""
    records = [torch.load(p, weights_only=False) for p in sorted(folder.glob("batch*.pt"))]
    records = [r for r in records if r["sketch"]["grpo"] is not None]
    if len(records) < 3:
        raise SystemExit(f"{folder}: {len(records)} batches with a gradient; need at least 3")
    zero = torch.zeros_like(records[0]["sketch"]["grpo"])
    full = torch.stack([r["sketch"]["grpo"] for r in records])
    chunks_full = sum(r["chunks"]["grpo"] for r in records)
    base = selector_statistics(full, full)
    out = {"batches": len(records), "full_signal_fraction": _finite(base.full_signal_fraction),
           "full_signal_fraction_se": _finite(base.full_signal_fraction_se), "arms": {}}
    for name in evidence_v3.MASKED:
        est = torch.stack([zero if r["sketch"][name] is None else r["sketch"][name]
                           for r in records])
        stats = selector_statistics(full, est)
        row = {k: _finite(v) for k, v in stats._asdict().items() if k != "num_batches"}
        fraction = sum(r["chunks"][name] for r in records) / chunks_full
        row["chunk_fraction"] = fraction
        eff = row["efficiency"]
        row["efficiency_per_compute"] = None if eff is None else eff / fraction
        if name in HT_ARMS and row["second_moment_ratio"]:
            row["efficiency_unbiased"] = 1.0 / row["second_moment_ratio"]
            row["efficiency_unbiased_per_compute"] = row["efficiency_unbiased"] / fraction
        out["arms"][name] = row
    return out


def report(args):
    per_seed = {s: seed_statistics(args.out / f"seed{s}") for s in args.seeds}
    keys = ("second_moment_ratio", "signal_ratio", "efficiency", "chunk_fraction",
            "efficiency_per_compute")
    mean = {}
    for name in evidence_v3.MASKED:
        mean[name] = {}
        for k in keys:
            vals = [p["arms"][name][k] for p in per_seed.values()]
            mean[name][k] = None if None in vals else sum(vals) / len(vals)
    out = {"seeds": list(args.seeds), "per_seed": per_seed, "mean_over_seeds": mean,
           "full_signal_fraction_mean": sum(p["full_signal_fraction"] or 0.0
                                            for p in per_seed.values()) / len(per_seed)}
    lines = ["| arm | chunk fraction | inflation | signal ratio | efficiency | per unit compute |",
             "|---|---|---|---|---|---|"]
    for name, r in mean.items():
        cells = [("n/a" if r[k] is None else f"{r[k]:.3f}") for k in keys]
        lines.append(f"| {name} | {cells[3]} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[4]} |")
    print("\n".join(lines))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.report is not None:
        return report(args)
    for seed in args.seeds:
        run_seed(seed, args)
    return None


if __name__ == "__main__":
    main()
