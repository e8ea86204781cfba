"""CPU time of one default `masked_grpo_loss` call against a bare clipped surrogate.

Both compute the same value on a `(96, 56)` batch (96 packed chunks of 56 action tokens, one
selected chunk per trajectory); the calls are interleaved in one process so machine load hits
both alike, and the ratio of medians is reported. The default path runs metadata checks only
(`validate_args=False`); the `validate_args=True` row shows what the value checks cost.

    python benchmarks/loss_overhead.py --out benchmarks/results/loss_overhead.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from chunkmask import Selection, clipped_surrogate, masked_grpo_loss


def bare(logp, old, adv):
    """The same value by hand: per-token surrogate, mean per trajectory, mean over them."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    a = adv[:, None]
    loss = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 0.8, 1.28))
    return loss.mean(1).mean()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=56)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_overhead.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(args.rows, args.tokens, generator=gen)
    old = logp + 0.05 * torch.randn(args.rows, args.tokens, generator=gen)
    adv = torch.randn(args.rows, generator=gen)
    sel = Selection.from_mask(torch.ones(args.rows, 1, dtype=torch.bool))
    calls = {
        "bare_surrogate": lambda: bare(logp, old, adv),
        "clipped_surrogate_mean": lambda: clipped_surrogate(
            logp, old_logp=old, advantages=adv
        ).loss.mean(),
        "masked_grpo_loss": lambda: masked_grpo_loss(
            logp, old_logp=old, advantages=adv, selection=sel
        ).loss,
        "masked_grpo_loss_validate": lambda: masked_grpo_loss(
            logp, old_logp=old, advantages=adv, selection=sel, validate_args=True
        ).loss,
    }
    values = {k: float(f()) for k, f in calls.items()}
    ref = values["bare_surrogate"]
    for k, v in values.items():
        if abs(v - ref) > 1e-6 * max(1.0, abs(ref)):
            raise SystemExit(f"{k} computes {v}, not the bare value {ref}")
    times = {k: [] for k in calls}
    for _ in range(50):  # warm-up
        for f in calls.values():
            f()
    for _ in range(args.repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    result = {
        "shape": [args.rows, args.tokens],
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median_us": med,
        "ratio_to_bare": {k: v / med["bare_surrogate"] for k, v in med.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k in calls:
        print(f"{k:28s} {med[k]:8.1f} us  x{result['ratio_to_bare'][k]:.2f}")
    return result


if __name__ == "__main__":
    main()
