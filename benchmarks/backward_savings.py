"""Backward-pass savings of chunk selection, measured against the physical limit N/B.

Times one full actor update (forward in micro-batches, masked GRPO loss, backward, AdamW step) of
a VLA-like policy stand-in on `T` trajectories x `N` chunks (80 x 64 by default) for:

- `full`: full GRPO, every chunk (`Selection.from_mask(valid)`);
- `pcm`: Probabilistic Chunk Masking at each budget `B` (default 8, 12, 16), selected through the
  real primitives (`ProbabilisticChunkMasker`: phases -> V_c -> score buffer -> keep probabilities
  -> Plackett-Luce) and shrunk with `shrink`; the PCM time includes selection and shrinking;
- `mask-only`: the full batch forwarded, with the PCM selection at `B = 12` entering the loss as a
  0/1 token mask and nothing shrunk (what trainers without shrinking do): no savings expected.

For each it reports the median wall time over interleaved repeats, the speedup over `full` and its
fraction of the limit `N / B` (also from process CPU time, steadier on a shared machine), the bytes saved for backward (`SavedTensorCounter`, any device), the
update's FLOPs (`count_flops`) and, on CUDA, the allocator peak. Ratios have the limit `B / N`.

Run `python benchmarks/backward_savings.py --help` for the options; the docs page
`docs/benchmarks.md` lists the commands behind the committed results.
"""

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
from _harness import (
    Setup,
    base_parser,
    emit,
    get_config,
    metadata,
    parse,
    torch_device,
    trainable_parameters,
)

from chunkmask.eval import (
    CudaPeakMemory,
    SavedTensorCounter,
    count_flops,
    time_function,
)

DEFAULT_BUDGETS = {"tiny": (2, 4)}  # every other preset: (8, 12, 16)
MASK_ONLY_BUDGET = {"tiny": 4}  # every other preset: 12


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------


def _ratio(x: float | int | None, ref: float | int | None) -> float | None:
    if x is None or ref is None or ref == 0:
        return None
    return float(x) / float(ref)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch_device(args)
    cfg = get_config(
        args.preset,
        lora_rank=args.lora_rank if args.lora else None,
        num_traj=args.num_traj,
        num_chunks=args.num_chunks,
        micro_batch_chunks=args.micro_batch,
        width=args.width,
        depth=args.depth,
    )
    budgets = args.budgets or DEFAULT_BUDGETS.get(args.preset, (8, 12, 16))
    if any(b < 1 or b > cfg.num_chunks for b in budgets):
        raise SystemExit(f"budgets must lie in [1, {cfg.num_chunks}], got {budgets}")
    mask_budget = args.mask_only_budget or MASK_ONLY_BUDGET.get(args.preset, 12)
    mask_budget = min(mask_budget, cfg.num_chunks)
    setup = Setup(cfg, device=device, dtype=args.dtype, seed=args.seed)
    n = cfg.num_chunks

    configs: list[dict[str, Any]] = [
        {"selector": "full", "budget": n, "fn": setup.full_update, "select": None}
    ]
    for b in budgets:
        fn, sel = setup.pcm_update_fn(b)
        configs.append({"selector": "pcm", "budget": b, "fn": fn, "select": sel})
    if not args.no_mask_only:
        fn, sel = setup.mask_only_update_fn(mask_budget)
        configs.append({"selector": "mask-only", "budget": mask_budget, "fn": fn, "select": sel})

    params = list(setup.policy.parameters())
    # Counting pass (also the warm-up): FLOPs, bytes saved for backward, CUDA peak.
    for c in configs:
        with CudaPeakMemory(device if device.type == "cuda" else "cpu") as mem:
            with SavedTensorCounter(exclude=params) as saved:
                flops = count_flops(c["fn"])
        c["chunks_selected"], c["micro_batches"] = flops.output
        c["flops"] = flops.total
        c["saved_bytes"] = saved.bytes
        c["peak_saved_bytes"] = saved.peak_bytes
        c["cuda_peak_bytes"] = mem.peak_bytes
        c["cuda_peak_increase_bytes"] = mem.peak_increase_bytes
        c["times"] = []
        c["cpu_times"] = []
        if args.verbose:
            print(f"counted {c['selector']} B={c['budget']}", file=sys.stderr)

    # Interleaved timing: every repeat times each configuration once, in a rotating order, so
    # that slow drifts of a shared machine hit all of them alike.
    for r in range(args.repeats):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for c in order:
            cpu_start = time.process_time()
            t = time_function(c["fn"], warmup=0, min_repeats=1, min_run_time=0.0, block_time=0.0)
            c["cpu_times"].append(time.process_time() - cpu_start)
            c["times"].append(t.median)
        if args.verbose:
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    # The selection path alone (select + shrink, or select + mask), for the breakdown.
    for c in configs:
        if c["select"] is not None:
            t = time_function(c["select"], min_run_time=0.05, min_repeats=3, warmup=1)
            c["selection_time_s"] = t.median
        else:
            c["selection_time_s"] = 0.0
    # The optimizer step, a fixed cost of every update (the same for all configurations).
    for p in trainable_parameters(setup.policy):
        p.grad = torch.zeros_like(p)
    optimizer_step_s = time_function(
        setup.trainer.optimizer.step, min_run_time=0.05, min_repeats=3, warmup=1
    ).median
    setup.trainer.optimizer.zero_grad(set_to_none=True)

    full = configs[0]
    full_time = float(np.median(full["times"]))
    full_cpu = float(np.median(full["cpu_times"]))
    full_best = float(np.min(full["times"]))
    records = []
    for c in configs:
        times = np.asarray(c["times"], dtype=float)
        median = float(np.median(times))
        q75, q25 = np.percentile(times, [75, 25])
        speedup = full_time / median
        cpu = float(np.median(c["cpu_times"]))
        limit = n / c["budget"]
        records.append(
            {
                "selector": c["selector"],
                "budget": c["budget"],
                "chunks_total": n,
                "num_traj": cfg.num_traj,
                "chunks_selected": c["chunks_selected"],
                "micro_batches": c["micro_batches"],
                "update_time_s": median,
                "update_time_iqr_s": float(q75 - q25),
                "update_time_min_s": float(times.min()),
                "speedup_best": full_best / float(times.min()),
                "update_times_s": [float(t) for t in times],
                "selection_time_s": c["selection_time_s"],
                "speedup": speedup,
                "limit": limit,
                "fraction_of_limit": speedup / limit,
                "update_cpu_time_s": cpu,
                "speedup_cpu": full_cpu / cpu,
                "fraction_of_limit_cpu": full_cpu / cpu / limit,
                "saved_bytes": c["saved_bytes"],
                "saved_ratio": _ratio(c["saved_bytes"], full["saved_bytes"]),
                "peak_saved_bytes": c["peak_saved_bytes"],
                "peak_saved_ratio": _ratio(c["peak_saved_bytes"], full["peak_saved_bytes"]),
                "flops": c["flops"],
                "flops_ratio": _ratio(c["flops"], full["flops"]),
                "flops_limit": c["budget"] / n,
                "cuda_peak_bytes": c["cuda_peak_bytes"],
                "cuda_peak_ratio": _ratio(c["cuda_peak_bytes"], full["cuda_peak_bytes"]),
                "cuda_peak_increase_bytes": c["cuda_peak_increase_bytes"],
            }
        )
    meta = metadata(
        "backward_savings",
        args,
        device,
        cfg,
        lora=bool(args.lora),
        repeats=args.repeats,
        optimizer_step_time_s=optimizer_step_s,
        trainable_parameters=sum(p.numel() for p in trainable_parameters(setup.policy)),
        parameters=sum(p.numel() for p in setup.policy.parameters()),
    )
    return {"meta": meta, "records": records}


def format_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    head = (
        f"backward_savings  preset={meta['preset']} lora={meta['lora']} device={meta['device']} "
        f"threads={meta['threads']} torch={meta['torch_version']} "
        f"T x N = {meta['config']['num_traj']} x {meta['config']['num_chunks']}"
    )
    cols = (
        f"{'selector':<10}{'B':>4}{'chunks':>8}{'mb':>5}{'time s':>10}{'iqr s':>8}{'sel ms':>8}"
        f"{'speedup':>9}{'limit':>7}{'of lim':>8}{'cpu spd':>9}{'saved MB':>10}{'ratio':>7}"
        f"{'GFLOP':>9}{'ratio':>7}"
    )
    lines = [head, cols, "-" * len(cols)]
    for r in result["records"]:
        lines.append(
            f"{r['selector']:<10}{r['budget']:>4}{r['chunks_selected']:>8}{r['micro_batches']:>5}"
            f"{r['update_time_s']:>10.3f}{r['update_time_iqr_s']:>8.3f}"
            f"{1e3 * r['selection_time_s']:>8.1f}{r['speedup']:>9.2f}{r['limit']:>7.2f}"
            f"{100 * r['fraction_of_limit']:>7.1f}%{r['speedup_cpu']:>9.2f}"
            f"{r['saved_bytes'] / 2**20:>10.1f}"
            f"{r['saved_ratio']:>7.3f}{r['flops'] / 1e9:>9.2f}{r['flops_ratio']:>7.3f}"
        )
        if r["cuda_peak_bytes"] is not None:
            lines[-1] += (
                f"  cuda peak {r['cuda_peak_bytes'] / 2**20:.0f} MB ({r['cuda_peak_ratio']:.3f})"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--lora", action="store_true", help="frozen base + trainable LoRA adapters")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=None,
        help="PCM budgets B (default 8 12 16; 2 4 for tiny)",
    )
    p.add_argument("--no-mask-only", action="store_true", help="skip the mask-only baseline")
    p.add_argument(
        "--mask-only-budget",
        type=int,
        default=None,
        help="budget of the selection the mask-only baseline masks with (default 12)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed updates per configuration (default: 5, 1 for tiny)",
    )
    p.add_argument("--micro-batch", type=int, default=None, help="chunks per micro-batch")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--verbose", action="store_true")
    args = parse(p, argv)
    if args.repeats is None:
        args.repeats = 1 if args.preset == "tiny" else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    emit(result, format_table(result), args.out)
    return result


if __name__ == "__main__":
    main()
