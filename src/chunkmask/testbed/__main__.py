"""The main job: `python -m chunkmask.testbed --out DIR [--quick]`.

Runs SFT (behaviour cloning on noisy expert demonstrations), then every arm from the same SFT
checkpoint, prints a summary table (with one line on what the project's compute-matched study
found) and writes `DIR/summary.json`, JSON-lines logs and PNG plots.

`--regime study` (the default) is the v3 study's regime (`DemoConfig.study`): GRPO, the paper's
PCM at B = 5 (about 19% of GRPO's chunks) and the compute-matched variant of `STUDY_ARMS`.
`--regime v2` is the earlier regime (`DemoConfig()`): GRPO, PCM and PCM-HT at B = 12 on fresh
initial states, where GRPO itself gains little.
"""

import argparse
import sys
from dataclasses import replace

import torch

from chunkmask.testbed.demo import DemoConfig, format_table, run_demo


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the main job."""
    parser = argparse.ArgumentParser(
        prog="python -m chunkmask.testbed",
        description="SFT on a CPU pick-and-place testbed, then GRPO and masked GRPO arms from "
        "the same checkpoint, side by side.",
    )
    parser.add_argument("--out", required=True, help="directory for logs, plots, summary.json")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--regime", choices=("study", "v2"), default="study",
                        help="the v3 study's regime (default) or the earlier v2 one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="RL steps per arm")
    parser.add_argument("--budget", type=int, default=None, help="masked chunks per trajectory B")
    parser.add_argument("--arms", default=None,
                        help="comma-separated subset of the regime's arms (grpo is always run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig.study() if args.regime == "study" else DemoConfig()
    arms = cfg.arms
    if args.arms is not None:
        wanted = {a.strip() for a in args.arms.split(",") if a.strip()} | {"grpo"}
        unknown = sorted(wanted - set(arms))
        if unknown:
            parser.error(f"--arms: unknown {unknown}; the {args.regime} regime has {list(arms)}")
        arms = {name: over for name, over in arms.items() if name in wanted}
    if args.quick:
        cfg = DemoConfig.quick()
    train = cfg.train
    if args.steps is not None:
        train = replace(train, steps=args.steps)
    if args.budget is not None:
        train = replace(train, budget=args.budget)
    cfg = replace(cfg, seed=args.seed, train=train, arms=arms)
    summary = run_demo(args.out, cfg, progress=not args.no_progress)
    print(format_table(summary, summary["runs"]))
    print(f"\nwrote {args.out}/summary.json and plots ({summary['total_s']:.0f} s in total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
