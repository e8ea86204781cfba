"""Results driver for `examples/metaworld_chunked_ppo.py`: tasks x seeds x variants, then a summary.

Superseded by `benchmarks/chunked_ppo_study.py` (resumable per variant, confidence intervals,
paired differences); kept for the runs behind the earlier `docs/chunked_ppo.md`.

Each (task, seed) runs the example as its own process, `python examples/metaworld_chunked_ppo.py
--task T --seed S --out OUT ...`: the example is the single runner and this script only schedules
it and aggregates the files it writes (nothing here imports the example). Runs are resumable: the
example keeps each (task, seed)'s SFT checkpoint and one JSON per finished variant under
``OUT/<task>/seed<k>/`` (default ``--out runs/chunked_ppo``, git-ignored) and skips finished
pieces. ``--shard i/n`` runs every n-th (task, seed) pair so that several processes can share the
work. ``--aggregate`` reads whatever has finished and writes ``docs/chunked_ppo.json`` and
``docs/img/chunked_ppo_<task>.png`` and prints the Markdown table of ``docs/chunked_ppo.md``.

    python benchmarks/run_chunked_ppo.py --tasks pick-place-v3 drawer-close-v3 window-open-v3 \
        --seeds 0 1 2
    python benchmarks/run_chunked_ppo.py --aggregate
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "metaworld_chunked_ppo.py"
TASKS = ("pick-place-v3", "drawer-close-v3", "window-open-v3")
# What the summary keeps per method and seed.
FIELDS = (
    "seeds",
    "success",
    "steps_to_success",
    "steps_all",
    "wall_clock_s",
    "update_s",
    "rollout_s",
)


def example_command(task: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The example's command line for one (task, seed); `--set key=value` becomes `--key value`."""
    cmd = [
        sys.executable,
        str(EXAMPLE),
        "--task",
        task,
        "--seed",
        str(seed),
        "--out",
        str(args.out),
    ]
    if args.variants:
        cmd += ["--variants", *args.variants]
    if args.quick:
        cmd.append("--quick")
    if args.no_progress:
        cmd.append("--no-progress")
    for kv in args.set:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes key=value, got {kv!r}")
        cmd += ["--" + key.replace("_", "-"), value]
    return cmd


def run(args: argparse.Namespace) -> None:
    pairs = [(t, s) for t in args.tasks for s in args.seeds]
    i, n = (int(x) for x in args.shard.split("/"))
    for task, seed in pairs[i::n]:
        print(f"== {task} seed {seed}", flush=True)
        subprocess.run(example_command(task, seed, args), check=True)


def variants_in(seed_dir: Path) -> list[str]:
    """The variants that finished in a run directory (one `<variant>.json` each), in order."""
    return sorted(p.stem for p in seed_dir.glob("*.json") if p.stem != "sft")


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def ablation(args: argparse.Namespace) -> dict:
    """PPO + SBC final success per BC weight rule, on the (task, seed) pairs every rule ran.

    The "balance" rule is the default of the main runs; the other rules live under
    ``--ablation-out/<rule>/<task>/seed<k>/ppo_sbc.json`` (same command with ``--bc-weight``).
    """
    found: dict = {}
    if not args.ablation_out.exists():
        return found
    for rule_dir in sorted(p for p in args.ablation_out.iterdir() if p.is_dir()):
        for path in sorted(rule_dir.glob("*/seed*/ppo_sbc.json")):
            task, seed = path.parts[-3], int(path.parts[-2][4:])
            main = args.out / task / f"seed{seed}" / "ppo_sbc.json"
            if not main.exists():
                continue
            sft = torch.load(main.parent / "sft.pt", weights_only=False)["eval"]
            row = found.setdefault(f"{task}/seed{seed}", {"sft": sft["success"]})
            row["balance"] = json.loads(main.read_text())["final"]["success"]
            row[rule_dir.name] = json.loads(path.read_text())["final"]["success"]
    rules = sorted({k for row in found.values() for k in row} - {"sft"})
    complete = {k: v for k, v in found.items() if all(r in v for r in rules)}
    if complete:
        print("| run | sft | " + " | ".join(rules) + " |")
        print("|---|---|" + "---|" * len(rules))
        for k, v in complete.items():
            print(f"| {k} | {v['sft']:.2f} | " + " | ".join(f"{v[r]:.2f}" for r in rules) + " |")
        means = {r: _mean([v[r] for v in complete.values()]) for r in ["sft", *rules]}
        print("| mean | " + " | ".join(f"{means[r]:.3f}" for r in ["sft", *rules]) + " |\n")
        return {"runs": complete, "mean": means}
    return {}


def aggregate(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict = {"command": args.command, "tasks": {}}
    rows = []
    for task_dir in sorted(p for p in args.out.iterdir() if p.is_dir()):
        task = task_dir.name
        per: dict = {"sft": {f: [] for f in FIELDS}}
        curves: dict = {}
        for seed_dir in sorted(task_dir.glob("seed*")):
            seed = int(seed_dir.name[4:])
            sft_path = seed_dir / "sft.pt"
            if not sft_path.exists():
                continue
            saved = torch.load(sft_path, weights_only=False)
            ev, info = saved["eval"], saved["info"]
            p = per["sft"]
            p["seeds"].append(seed)
            p["success"].append(ev["success"])
            p["steps_to_success"].append(ev["steps_to_success"])
            p["steps_all"].append(ev["steps_all"])
            p["wall_clock_s"].append(info.get("sft_s"))
            for v in variants_in(seed_dir):
                r = json.loads((seed_dir / f"{v}.json").read_text())
                p = per.setdefault(v, {f: [] for f in FIELDS})
                p["seeds"].append(seed)
                p["success"].append(r["final"]["success"])
                p["steps_to_success"].append(r["final"]["steps_to_success"])
                p["steps_all"].append(r["final"]["steps_all"])
                p["wall_clock_s"].append(r["wall_clock_s"])
                p["update_s"].append(r["update_s"])
                p["rollout_s"].append(r["rollout_s"])
                curves.setdefault(v, []).append(r["curve"])
        task_out = {}
        for k in ["sft", *sorted(per.keys() - {"sft"})]:
            p = per[k]
            if not p["seeds"]:
                continue
            task_out[k] = {
                "success": _mean(p["success"]),
                "steps_to_success": _mean(p["steps_to_success"]),
                "steps_all": _mean(p["steps_all"]),
                "wall_clock_s": _mean(p["wall_clock_s"]),
                "update_s": _mean(p["update_s"]),
                "rollout_s": _mean(p["rollout_s"]),
                "per_seed": {key: p[key] for key in p},
            }
            rows.append((task, k, task_out[k]))
        out["tasks"][task] = task_out
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for v in sorted(curves):
            its = [pt["iteration"] for pt in curves[v][0]]
            for ax, key in zip(axes, ("success", "steps_all"), strict=True):
                ys = [_mean([c[j][key] for c in curves[v] if j < len(c)]) for j in range(len(its))]
                ax.plot(its, ys, marker="o", label=f"{v} ({len(curves[v])} seeds)")
        axes[0].set_title(f"{task}: eval success (mean action)")
        axes[1].set_title(f"{task}: eval steps (failures = cap)")
        for ax in axes:
            ax.set_xlabel("PPO iteration (0 = SFT)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        img = args.docs / "img" / f"chunked_ppo_{task}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(img, dpi=80)
        plt.close(fig)
    out["bc_weight_ablation"] = ablation(args)
    (args.docs / "chunked_ppo.json").write_text(json.dumps(out, indent=1))

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print(
        "| task | method | seeds | success | steps to success | steps (fail = cap) | wall-clock s | update s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for task, k, r in rows:
        print(
            f"| {task} | {k} | {len(r['per_seed']['seeds'])} | {fmt(r['success'], '.2f')} | "
            f"{fmt(r['steps_to_success'], '.1f')} | {fmt(r['steps_all'], '.1f')} | "
            f"{fmt(r['wall_clock_s'], '.0f')} | {fmt(r['update_s'], '.1f')} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", default=None, help="passed to the example (default: all)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "chunked_ppo")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--ablation-out", type=Path, default=ROOT / "runs" / "chunked_ppo_ablation")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--set", nargs="*", default=[], help="example Config overrides, key=value")
    parser.add_argument("--aggregate", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the example's seconds-long run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--command", default="python benchmarks/run_chunked_ppo.py")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.aggregate:
        aggregate(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
