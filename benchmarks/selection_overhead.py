"""Cost of the PCM selection path, stage by stage, against the full-GRPO actor update.

On the batch of `backward_savings.py` (80 trajectories x 64 chunks by default) it times each stage
of the path `ProbabilisticChunkMasker.select` + `shrink` runs every step:

1. phase labelling (`gripper_close_fraction` + `label_gripper_phases`);
2. `V_c`, the success-failure action variance (`success_failure_variance`, Eq. 5);
3. the score-buffer update (`PhaseScoreBuffer.update`, Eq. 7-9, refreshing every K steps);
4. keep probabilities (`keep_probabilities`, Eq. 8-9, what a refresh computes);
5. chunk weights `w = p[phase]`;
6. sampling (`plackett_luce_sample`, Eq. 10);
7. shrinking the per-chunk batch (`shrink`);

and the whole path end to end (`masker.select` + `shrink`), each as a fraction of the full-GRPO
update time measured in the same process with the same policy stand-in.

It also compares samplers of `k` distinct chunks per row of the `T x N` weights:
`plackett_luce_sample`, `torch.multinomial(replacement=False)` and a numpy `Generator.choice`
loop, plus `torch.compile`d versions of the first two (compilation happens before timing; its
duration is reported, not timed).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _harness import Setup, base_parser, emit, get_config, metadata, parse, torch_device

from chunkmask import (
    NUM_PHASES,
    ProbabilisticChunkMasker,
    gripper_close_fraction,
    keep_probabilities,
    label_gripper_phases,
    plackett_luce_sample,
    shrink,
    success_failure_variance,
)
from chunkmask.eval import time_function
from chunkmask.pcm import PhaseScoreBuffer


def _time_interleaved(fns: list, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Median and IQR per callable over `args.rounds` rounds; each round times every callable.

    Interleaving puts every callable through the same drifts of a shared machine, so their
    ratios stay fair. Per round and callable: blocks of at least 1 ms for at least
    `min_run_time / rounds` seconds.
    """
    for fn in fns:  # warm-up
        fn()
        fn()
    per_round = args.min_run_time / args.rounds
    values: list[list[float]] = [[] for _ in fns]
    for _ in range(args.rounds):
        for i, fn in enumerate(fns):
            t = time_function(fn, min_run_time=per_round, min_repeats=1, warmup=0, block_time=1e-3)
            values[i].extend(t.times)
    out = []
    for v in values:
        q25, q50, q75 = np.percentile(np.asarray(v), [25, 50, 75])
        out.append((float(q50), float(q75 - q25)))
    return out


def stage_timings(setup: Setup, budget: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    d = setup.data
    actions, valid, success, group = d["actions"], d["valid"], d["success"], d["group"]
    gripper = actions[..., -1]
    gen = torch.Generator().manual_seed(args.seed)

    def phases_fn():
        return label_gripper_phases(gripper_close_fraction(gripper, valid), valid)

    phases = phases_fn()

    def variance_fn():
        return success_failure_variance(
            actions, phases, success, group, num_phases=NUM_PHASES, valid=valid
        )

    variance = variance_fn()
    buffer = PhaseScoreBuffer(NUM_PHASES)

    def buffer_fn():
        return buffer.update(variance.scores, variance.defined)

    keep = buffer_fn()

    def keep_fn():
        return keep_probabilities(variance.scores, variance.defined)

    phase_index = torch.where(valid, phases, 0).clamp(0, NUM_PHASES - 1)
    keep = keep.to(actions.device)

    def weights_fn():
        return torch.where(valid, keep[phase_index], 0.0)

    weights = weights_fn()

    def sample_fn():
        return plackett_luce_sample(weights, budget, valid=valid, generator=gen)

    selection = sample_fn()

    def shrink_fn():
        return shrink(setup.per_chunk, selection)

    masker = ProbabilisticChunkMasker(budget, seed=args.seed)

    def path_fn():
        sel = masker.select(actions=actions, success=success, group=group, valid=valid)
        return shrink(setup.per_chunk, sel)

    stages = [
        ("phase_labelling", phases_fn),
        ("variance", variance_fn),
        ("buffer_update", buffer_fn),
        ("keep_probabilities", keep_fn),
        ("chunk_weights", weights_fn),
        ("sampling", sample_fn),
        ("shrink", shrink_fn),
    ]
    timings = _time_interleaved([fn for _, fn in stages] + [path_fn], args)
    out = [
        {"stage": name, "time_s": median, "iqr_s": iqr}
        for (name, _), (median, iqr) in zip(stages, timings[:-1], strict=True)
    ]
    out.append({"stage": "sum_of_stages", "time_s": sum(r["time_s"] for r in out), "iqr_s": None})
    median, iqr = timings[-1]
    out.append({"stage": "total_select_and_shrink", "time_s": median, "iqr_s": iqr})
    return out, weights, valid


def sampler_timings(
    weights: torch.Tensor, valid: torch.Tensor, k: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    gen = torch.Generator(device=weights.device).manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def numpy_loop():
        w = weights.detach().cpu().double().numpy()
        n = w.shape[1]
        picks = np.empty((w.shape[0], k), dtype=np.int64)
        for i, row in enumerate(w):
            picks[i] = rng.choice(n, size=k, replace=False, p=row / row.sum())
        return torch.from_numpy(np.sort(picks, axis=1)).to(weights.device)

    methods: list[tuple[str, Any, float | None, str | None]] = [
        (
            "plackett_luce_sample",
            lambda: plackett_luce_sample(weights, k, valid=valid, generator=gen),
            None,
            None,
        ),
        (
            "plackett_luce_sample(validate_args=False)",
            lambda: plackett_luce_sample(
                weights, k, valid=valid, generator=gen, validate_args=False
            ),
            None,
            None,
        ),
        (
            "torch.multinomial",
            lambda: torch.multinomial(weights, k, replacement=False, generator=gen),
            None,
            None,
        ),
        (
            # The same indices in ascending order, as a `Selection` holds them.
            "torch.multinomial + sort",
            lambda: torch.multinomial(weights, k, replacement=False, generator=gen).sort(1).values,
            None,
            None,
        ),
        ("numpy Generator.choice loop", numpy_loop, None, None),
    ]
    if args.compile:
        # Compiled variants draw from the global RNG: torch.Generator objects do not trace.
        def pl(w: torch.Tensor) -> torch.Tensor:
            return plackett_luce_sample(w, k, validate_args=False).indices

        def mn(w: torch.Tensor) -> torch.Tensor:
            return torch.multinomial(w, k, replacement=False)

        for name, fn in (("compiled plackett_luce_sample", pl), ("compiled torch.multinomial", mn)):
            compiled, mode, error = None, None, None
            start = time.perf_counter()
            for fullgraph in (True, False):
                try:
                    torch._dynamo.reset()
                    candidate = torch.compile(fn, fullgraph=fullgraph, dynamic=False)
                    candidate(weights)
                    compiled, mode = candidate, "fullgraph" if fullgraph else "graph breaks"
                    break
                except Exception as exc:  # noqa: BLE001 - report any compile failure
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            compile_s = time.perf_counter() - start
            if compiled is None:
                methods.append((name, None, compile_s, error))
            else:
                methods.append(
                    (f"{name} ({mode})", (lambda c=compiled: c(weights)), compile_s, None)
                )
    runnable = [(name, fn) for name, fn, _, _ in methods if fn is not None]
    timings = dict(
        zip(
            [n for n, _ in runnable], _time_interleaved([f for _, f in runnable], args), strict=True
        )
    )
    out = []
    for name, _fn, compile_s, error in methods:
        median, iqr = timings.get(name, (None, None))
        out.append(
            {
                "method": name,
                "time_s": median,
                "iqr_s": iqr,
                "compile_time_s": compile_s,
                "error": error,
            }
        )
    ref = next(r["time_s"] for r in out if r["method"] == "torch.multinomial")
    for r in out:
        r["relative_to_multinomial"] = None if r["time_s"] is None else r["time_s"] / ref
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch_device(args)
    cfg = get_config(args.preset, num_traj=args.num_traj, num_chunks=args.num_chunks)
    budget = min(args.budget or (4 if args.preset == "tiny" else 12), cfg.num_chunks)
    setup = Setup(cfg, device=device, dtype=args.dtype, seed=args.seed)

    if args.update_json is not None:
        saved = json.loads(args.update_json.read_text())
        full = next(r for r in saved["records"] if r["selector"] == "full")
        full_time, full_iqr = full["update_time_s"], full["update_time_iqr_s"]
        source = f"from {args.update_json.name}"
    elif args.update_time is not None:
        full_time, full_iqr, source = args.update_time, None, "given"
    else:
        t = time_function(setup.full_update, min_run_time=0.0, min_repeats=args.repeats, warmup=1)
        full_time, full_iqr, source = t.median, t.iqr, "measured"

    stages, weights, valid = stage_timings(setup, budget, args)
    for r in stages:
        r["fraction_of_update"] = r["time_s"] / full_time
        r["budget"] = budget
        r["chunks_total"] = cfg.num_chunks
    samplers = sampler_timings(weights, valid, budget, args)
    meta = metadata("selection_overhead", args, device, cfg, budget=budget)
    return {
        "meta": meta,
        "full_update_time_s": full_time,
        "full_update_iqr_s": full_iqr,
        "full_update_source": source,
        "stages": stages,
        "samplers": samplers,
    }


def format_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    c = meta["config"]
    lines = [
        f"selection_overhead  preset={meta['preset']} device={meta['device']} "
        f"threads={meta['threads']} torch={meta['torch_version']} "
        f"T x N = {c['num_traj']} x {c['num_chunks']}, B = {meta['budget']}; "
        f"full update {result['full_update_time_s']:.3f} s ({result['full_update_source']})",
        f"{'stage':<26}{'time ms':>10}{'iqr ms':>9}{'% of update':>13}",
        "-" * 58,
    ]
    for r in result["stages"]:
        iqr = "" if r["iqr_s"] is None else f"{1e3 * r['iqr_s']:.3f}"
        lines.append(
            f"{r['stage']:<26}{1e3 * r['time_s']:>10.3f}{iqr:>9}{100 * r['fraction_of_update']:>12.3f}%"
        )
    lines += [
        "",
        f"{'sampler (k = ' + str(meta['budget']) + ')':<50}{'time us':>10}{'iqr us':>9}"
        f"{'vs multinomial':>16}{'compile s':>11}",
        "-" * 96,
    ]
    for r in result["samplers"]:
        if r["time_s"] is None:
            lines.append(f"{r['method']:<50}  failed: {r['error']}")
            continue
        comp = "" if r["compile_time_s"] is None else f"{r['compile_time_s']:.1f}"
        lines.append(
            f"{r['method']:<50}{1e6 * r['time_s']:>10.1f}{1e6 * r['iqr_s']:>9.1f}"
            f"{r['relative_to_multinomial']:>15.2f}x{comp:>11}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=None, help="B (default 12; 4 for tiny)")
    p.add_argument(
        "--update-time",
        type=float,
        default=None,
        help="full-GRPO update time in seconds, instead of measuring it",
    )
    p.add_argument(
        "--update-json",
        type=Path,
        default=None,
        help="take the full-GRPO update time from a backward_savings JSON",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed full updates")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=1.0,
        help="least measured seconds per stage or sampler, over all rounds",
    )
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="also time torch.compile'd samplers (default: on, except for tiny)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = parse(p, argv)
    if args.compile is None:
        args.compile = args.preset != "tiny"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    emit(result, format_table(result), args.out)
    return result


if __name__ == "__main__":
    main()
