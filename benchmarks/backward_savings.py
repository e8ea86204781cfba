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
import contextlib
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chunkmask.advantages import group_relative_advantages
from chunkmask.losses import masked_grpo_loss
from chunkmask.masker import ProbabilisticChunkMasker
from chunkmask.profiling import CudaPeakMemory, SavedTensorCounter, count_flops, time_function
from chunkmask.selection import Selection
from chunkmask.shrinking import shrink

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _policy import (  # noqa: E402
    PRESETS,
    ChunkPolicy,
    PolicyConfig,
    behaviour_log_probs,
    get_config,
    make_rollouts,
    trainable_parameters,
)

DEFAULT_BUDGETS = {"tiny": (2, 4)}  # every other preset: (8, 12, 16)
MASK_ONLY_BUDGET = {"tiny": 4}  # every other preset: 12


# ------------------------------------------------------------------------------------------
# A minimal actor trainer: micro-batches of whole trajectories, at most `micro_batch_chunks`
# chunks each, gradient accumulation, one optimizer step.
# ------------------------------------------------------------------------------------------


def plan_micro_batches(
    counts: list[int], micro_batch_chunks: int
) -> list[tuple[int, int, int, int]]:
    """Group consecutive trajectories into micro-batches of at most `micro_batch_chunks` chunks.

    Returns `(traj_start, traj_stop, row_start, row_stop)` per micro-batch, rows being packed
    chunks. A trajectory longer than the limit gets a micro-batch of its own.
    """
    plan, t0, r0, rows = [], 0, 0, 0
    for t, c in enumerate(counts):
        if rows and rows + c > micro_batch_chunks:
            plan.append((t0, t, r0, r0 + rows))
            t0, r0, rows = t, r0 + rows, 0
        rows += c
    if rows or t0 < len(counts):
        plan.append((t0, len(counts), r0, r0 + rows))
    return plan


def slice_selection(selection: Selection, start: int, stop: int) -> Selection:
    """The selection of trajectories `start:stop` (their packed rows are contiguous)."""
    return Selection(
        selection.indices[start:stop],
        selection.mask[start:stop],
        selection.num_chunks[start:stop],
        selection.chunks_total,
    )


class ActorTrainer:
    """Forward/backward in micro-batches with the masked GRPO loss, then one AdamW step.

    The per-micro-batch loss is scaled by its share of trajectories, so the accumulated gradient
    equals that of the `seq-mean-token-mean` loss over the whole (packed) batch.
    """

    def __init__(
        self,
        policy: ChunkPolicy,
        *,
        micro_batch_chunks: int,
        lr: float = 1e-5,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.policy = policy
        self.micro_batch_chunks = micro_batch_chunks
        self.optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=lr, foreach=True)
        self.autocast_dtype = autocast_dtype
        self.device_type = next(policy.parameters()).device.type

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def update(
        self,
        batch: dict[str, torch.Tensor],
        selection: Selection,
        counts: list[int],
        mask: torch.Tensor | None = None,
    ) -> int:
        """One actor update on a packed batch; returns the number of micro-batches."""
        num_micro_batches = self.accumulate(batch, selection, counts, mask)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return num_micro_batches

    def accumulate(
        self,
        batch: dict[str, torch.Tensor],
        selection: Selection,
        counts: list[int],
        mask: torch.Tensor | None = None,
    ) -> int:
        """Forward and backward over the micro-batches, accumulating gradients (no step)."""
        plan = plan_micro_batches(counts, self.micro_batch_chunks)
        num_traj = len(counts)
        for t0, t1, r0, r1 in plan:
            with self._autocast():
                logp = self.policy.log_prob(batch["obs"][r0:r1], batch["tokens"][r0:r1])
            out = masked_grpo_loss(
                logp,
                batch["old_logp"][r0:r1],
                batch["adv"][r0:r1],
                slice_selection(selection, t0, t1),
                None if mask is None else mask[r0:r1],
            )
            (out.loss * ((t1 - t0) / num_traj)).backward()
        return len(plan)


# ------------------------------------------------------------------------------------------
# The configurations
# ------------------------------------------------------------------------------------------


class Setup:
    """The policy, the rollout batch and one update function per configuration."""

    def __init__(self, cfg: PolicyConfig, *, device: torch.device, dtype: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = device
        self.policy = ChunkPolicy(cfg).to(device)
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        self.trainer = ActorTrainer(
            self.policy, micro_batch_chunks=cfg.micro_batch_chunks, autocast_dtype=autocast
        )
        data = make_rollouts(cfg, seed=seed, device=device)
        self.data = data
        with self.trainer._autocast():
            old_logp = behaviour_log_probs(
                self.policy, data["obs"], data["tokens"], cfg.micro_batch_chunks
            ).float()
        self.adv = group_relative_advantages(data["rewards"], data["group"])
        self.per_chunk = {
            "obs": data["obs"],
            "tokens": data["tokens"],
            "old_logp": old_logp,
            "adv": self.adv,
        }
        t_, n = cfg.num_traj, cfg.num_chunks
        # Every chunk is valid, so the packed full batch is the row-major flattening: no gather.
        self.full_batch = {
            "obs": data["obs"].flatten(0, 1),
            "tokens": data["tokens"].flatten(0, 1),
            "old_logp": old_logp.flatten(0, 1),
            "adv": self.adv[:, None].expand(t_, n).reshape(-1),
        }
        self.seed = seed

    def masker(self, budget: int) -> ProbabilisticChunkMasker:
        return ProbabilisticChunkMasker(budget, seed=self.seed)

    def select(self, masker: ProbabilisticChunkMasker) -> Selection:
        d = self.data
        selection, _ = masker.select(
            actions=d["actions"], success=d["success"], group=d["group"], valid=d["valid"]
        )
        return selection

    # -- update functions; each returns the number of chunks forwarded and of micro-batches --

    def full_update(self) -> tuple[int, int]:
        selection = Selection.from_mask(self.data["valid"])
        counts = selection.counts.tolist()
        return sum(counts), self.trainer.update(self.full_batch, selection, counts)

    def pcm_update_fn(self, budget: int) -> tuple[Callable[[], tuple[int, int]], Callable[[], Any]]:
        masker = self.masker(budget)

        def select_and_shrink() -> tuple[dict[str, torch.Tensor], Selection, list[int]]:
            selection = self.select(masker)
            counts = selection.counts.tolist()  # the one host sync: sizes the micro-batches
            batch = shrink(self.per_chunk, selection, size=sum(counts), validate_args=False)
            return batch, selection, counts

        def update() -> tuple[int, int]:
            batch, selection, counts = select_and_shrink()
            return sum(counts), self.trainer.update(batch, selection, counts)

        return update, select_and_shrink

    def mask_only_update_fn(
        self, budget: int
    ) -> tuple[Callable[[], tuple[int, int]], Callable[[], Any]]:
        masker = self.masker(budget)
        k = self.cfg.tokens_per_chunk

        def select_mask() -> tuple[torch.Tensor, Selection, list[int]]:
            chosen = self.select(masker).chunk_mask()
            token_mask = chosen.reshape(-1, 1).expand(-1, k)
            full = Selection.from_mask(self.data["valid"])
            return token_mask, full, full.counts.tolist()

        def update() -> tuple[int, int]:
            token_mask, full, counts = select_mask()
            return sum(counts), self.trainer.update(self.full_batch, full, counts, mask=token_mask)

        return update, select_mask


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------


def _ratio(x: float | int | None, ref: float | int | None) -> float | None:
    if x is None or ref is None or ref == 0:
        return None
    return float(x) / float(ref)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
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
    meta = {
        "benchmark": "backward_savings",
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "dtype": args.dtype,
        "preset": args.preset,
        "lora": bool(args.lora),
        "repeats": args.repeats,
        "optimizer_step_time_s": optimizer_step_s,
        "config": cfg.to_dict(),
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(setup.policy)),
        "parameters": sum(p.numel() for p in setup.policy.parameters()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(args.argv),
    }
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16 runs the forward under autocast",
    )
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
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1; 0 keeps torch's default)",
    )
    p.add_argument("--num-traj", type=int, default=None)
    p.add_argument("--num-chunks", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help="chunks per micro-batch")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.preset == "tiny" else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
