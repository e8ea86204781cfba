"""The main job: `python -m chunkmask.testbed --out DIR [--quick]`.

Runs SFT (behaviour cloning on noisy expert demonstrations), then GRPO, PCM (Eq. 11) and PCM with
the Horvitz-Thompson estimator from the same SFT checkpoint, prints a summary table and writes
`DIR/summary.json`, JSON-lines logs and PNG plots.
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
        description="Reproduce the PCM paper on a CPU pick-and-place testbed: SFT, then GRPO "
        "and PCM from the same checkpoint.",
    )
    parser.add_argument("--out", required=True, help="directory for logs, plots, summary.json")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="RL steps per method")
    parser.add_argument("--budget", type=int, default=None, help="PCM chunks per trajectory B")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-ht",
        action="store_true",
        help="skip the pcm_ht run (PCM with the unbiased Horvitz-Thompson estimator)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    train = cfg.train
    if args.steps is not None:
        train = replace(train, steps=args.steps)
    if args.budget is not None:
        train = replace(train, budget=args.budget)
    cfg = replace(cfg, seed=args.seed, train=train, pcm_ht=not args.no_ht)
    summary = run_demo(args.out, cfg, progress=not args.no_progress)
    print(format_table(summary, summary["runs"]))
    print(f"\nwrote {args.out}/summary.json and plots ({summary['total_s']:.0f} s in total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
