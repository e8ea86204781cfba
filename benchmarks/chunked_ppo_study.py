"""Study driver for `examples/metaworld_chunked_ppo.py`: tasks x seeds x variants, then statistics.

**Run.** Each (task, seed, variant) unit runs the example as its own process, `python
examples/metaworld_chunked_ppo.py --task T --seed S --variants V --out OUT --results RESULTS ...`.
The example is the single runner; this script only schedules it and aggregates the files it
writes (nothing here imports the example). The example keeps each (task, seed)'s SFT checkpoint
under ``OUT/<task>/seed<k>/`` (default ``runs/chunked_ppo``, git-ignored) and writes one small
JSON record per finished unit, as soon as it finishes, to ``RESULTS/<task>/seed<k>/<variant>.json``
(default ``benchmarks/results/chunked_ppo``, committed), plus ``sft.json``. A unit whose record exists is skipped,
so a killed study resumes where it stopped. ``--shard i/n`` runs every n-th unit, so that n
processes can share the work. ``--bc-weight RULE ...`` adds the weight-rule ablation: variant
``ppo_sbc+RULE`` per rule (the default rule, ``--default-bc-weight``, is ``ppo_sbc`` itself).

**Aggregate.** ``--aggregate`` reads whatever has finished and writes ``SUMMARY`` (default
``RESULTS.json``, i.e. ``benchmarks/results/chunked_ppo.json``):
``{"tasks": {TASK: {VARIANT: {success, steps_to_success, steps_all, wall_clock_s, ...}}}}`` with a
``<field>_ci95`` beside each mean (Student-t over seeds, `chunkmask.eval.paired_difference`), the
``per_seed`` lists, the pooled Wilson interval of success over all evaluation episodes
(`binomial_interval`), paired differences against ``sft`` and ``ppo_sbc`` on the same seeds and
goals (``paired``), a TOST of each variant against ``ppo_sbc`` at ±5 success points
(`equivalence_test`), and ``overall``: success averaged over the tasks, per seed. It also draws
``DOCS/img/chunked_ppo_<task>.png`` (default ``docs/img``: learning curves, mean and 95% CI band
over seeds) and prints the Markdown tables of ``docs/chunked_ppo.md``. Data goes under
``benchmarks/results/``, only the figures under ``docs/`` (see ``docs/benchmarks.md``).

    python benchmarks/chunked_ppo_study.py --seeds 0 1 2 3 4 --shard 0/2   # and --shard 1/2
    python benchmarks/chunked_ppo_study.py --aggregate
"""

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chunkmask.eval import binomial_interval, equivalence_test, paired_difference

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "metaworld_chunked_ppo.py"
TASKS = ("pick-place-v3", "drawer-close-v3", "window-open-v3")
VARIANTS = ("ppo", "ppo_sbc", "ppo_sbc_pcm")
BC_WEIGHT_RULES = ("constant", "success_rate", "loss_balance", "product")
# Per-seed fields of a variant's record: name in the summary -> path in the record.
SEED_FIELDS = {
    "success": ("final", "success"),
    "steps_to_success": ("final", "steps_to_success"),
    "steps_all": ("final", "steps_all"),
    "wall_clock_s": ("wall_clock_s",),
    "cpu_s": ("cpu_s",),
    "update_s": ("update_s",),
    "rollout_s": ("rollout_s",),
    "env_steps": ("env_steps",),
}
# Fields compared between variants on the same seeds (and, for steps_common, the same goals).
PAIRED_FIELDS = ("success", "steps_to_success", "steps_all", "steps_common")
EQUIVALENCE_MARGIN = 0.05


# --------------------------------------------------------------------------------------------
# Running


def study_variants(variants: Sequence[str], rules: Sequence[str], default_rule: str) -> list[str]:
    """The variants to run: `variants`, then ``ppo_sbc+<rule>`` for each ablation rule.

    Raises:
        ValueError: if a variant or a rule is unknown.
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"`variants` must be drawn from {VARIANTS}, got {v!r}.")
    for r in [*rules, default_rule]:
        if r not in BC_WEIGHT_RULES:
            raise ValueError(f"`bc_weight` rules must be drawn from {BC_WEIGHT_RULES}, got {r!r}.")
    return list(variants) + [f"ppo_sbc+{r}" for r in rules if r != default_rule]


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``.

    Raises:
        ValueError: if `shard` is not of that form.
    """
    i, sep, n = shard.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and int(n) > 0 and int(i) < int(n)):
        raise ValueError(f"`shard` must be 'i/n' with 0 <= i < n, got {shard!r}.")
    return int(i), int(n)


def units(tasks: Sequence[str], seeds: Sequence[int], variants: Sequence[str],
          shard: str = "0/1") -> list[tuple[str, int, str]]:
    """This shard's (task, seed, variant) units, seed-major so that early seeds finish first."""
    i, n = parse_shard(shard)
    every = [(t, s, v) for s in seeds for t in tasks for v in variants]
    return every[i::n]


def parse_sets(pairs: Sequence[str]) -> list[str]:
    """``key=value`` overrides -> the example's ``--key value`` arguments.

    Raises:
        ValueError: if an item is not ``key=value``.
    """
    out: list[str] = []
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise ValueError(f"`--set` takes key=value, got {kv!r}.")
        out += ["--" + key.replace("_", "-"), value]
    return out


def example_command(task: str, seed: int, variant: str, args: argparse.Namespace) -> list[str]:
    """The example's command line for one unit."""
    cmd = [sys.executable, str(EXAMPLE), "--task", task, "--seed", str(seed), "--variants",
           variant, "--out", str(args.out), "--results", str(args.results),
           "--bc-weight", args.default_bc_weight]
    if args.quick:
        cmd.append("--quick")
    if args.no_progress:
        cmd.append("--no-progress")
    return cmd + parse_sets(args.set)


def record_path(results: Path, task: str, seed: int, variant: str) -> Path:
    """Where the example writes the record of one unit."""
    return results / task / f"seed{seed}" / f"{variant}.json"


def run(args: argparse.Namespace) -> None:
    """Run this shard's unfinished units one after another."""
    variants = study_variants(args.variants, args.bc_weight, args.default_bc_weight)
    todo = units(args.tasks, args.seeds, variants, args.shard)
    for task, seed, variant in todo:
        if record_path(args.results, task, seed, variant).exists():
            print(f"== {task} seed {seed} {variant}: done", flush=True)
            continue
        print(f"== {task} seed {seed} {variant}", flush=True)
        subprocess.run(example_command(task, seed, variant, args), check=True)


# --------------------------------------------------------------------------------------------
# Statistics (all intervals come from chunkmask.eval)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_ci(values: Sequence[Any], confidence: float = 0.95) -> tuple[float | None, list | None, int]:
    """Mean, Student-t CI over the finite values (None below 2) and their count.

    The one-sample interval is `paired_difference(values, zeros)`: the same t-interval.
    """
    xs = [float(x) for x in values if _finite(x)]
    if not xs:
        return None, None, 0
    mean = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, 1
    d = paired_difference(xs, [0.0] * len(xs), confidence=confidence)
    return mean, [d.low, d.high], len(xs)


def common_goal_steps(a: dict, b: dict) -> float | None:
    """Mean of (a's - b's) steps over the evaluation goals both succeed on (None if none).

    `a` and `b` are `final` evaluations of one seed, on the same goals in the same order.

    Raises:
        ValueError: if the two evaluations have different numbers of episodes.
    """
    sa, sb = a["per_episode_success"], b["per_episode_success"]
    if len(sa) != len(sb):
        raise ValueError(f"evaluations must share their goals: {len(sa)} vs {len(sb)} episodes.")
    d = [x - y for x, y, ok_a, ok_b in zip(a["per_episode_steps"], b["per_episode_steps"], sa, sb,
                                           strict=True) if ok_a and ok_b]
    return math.fsum(d) / len(d) if d else None


def paired(records_a: dict[int, dict], records_b: dict[int, dict]) -> dict[str, Any]:
    """Paired differences a - b over the seeds both finished, per field of `PAIRED_FIELDS`.

    Each entry holds ``mean``, ``ci95`` (None below 2 pairs), ``n`` and ``seeds``; a seed with
    no successes in one arm drops out of the steps fields.
    """
    out: dict[str, Any] = {}
    seeds = sorted(set(records_a) & set(records_b))
    for field in PAIRED_FIELDS:
        pairs = []
        for s in seeds:
            fa, fb = records_a[s]["final"], records_b[s]["final"]
            if field == "steps_common":
                x = common_goal_steps(fa, fb)
                pair = (x, 0.0) if x is not None else None
            else:
                pair = (fa[field], fb[field]) if _finite(fa[field]) and _finite(fb[field]) else None
            if pair is not None:
                pairs.append((s, *pair))
        entry: dict[str, Any] = {"mean": None, "ci95": None, "n": len(pairs),
                                 "seeds": [p[0] for p in pairs]}
        if pairs:
            diffs = [p[1] - p[2] for p in pairs]
            entry["mean"] = math.fsum(diffs) / len(diffs)
        if len(pairs) >= 2:
            d = paired_difference([p[1] for p in pairs], [p[2] for p in pairs])
            entry["ci95"] = [d.low, d.high]
        out[field] = entry
    return out


def equivalence(records_a: dict[int, dict], records_b: dict[int, dict],
                margin: float = EQUIVALENCE_MARGIN) -> dict[str, Any] | None:
    """TOST of success a - b within ±`margin` on the common seeds (None below 2 seeds)."""
    seeds = sorted(set(records_a) & set(records_b))
    if len(seeds) < 2:
        return None
    t = equivalence_test([records_a[s]["final"]["success"] for s in seeds],
                         [records_b[s]["final"]["success"] for s in seeds], margin=margin)
    return {"equivalent": t.equivalent, "p_value": t.p_value, "margin": margin,
            "ci90": [t.difference.low, t.difference.high], "n": t.difference.n}


def _get(record: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def summarise_variant(records: dict[int, dict]) -> dict[str, Any]:
    """Means with `_ci95` over seeds, the pooled Wilson interval of success, `per_seed` lists."""
    seeds = sorted(records)
    per_seed: dict[str, list] = {"seeds": seeds}
    out: dict[str, Any] = {}
    for name, path in SEED_FIELDS.items():
        values = [_get(records[s], path) for s in seeds]
        per_seed[name] = values
        mean, ci, n = mean_ci(values)
        out[name] = mean
        out[f"{name}_ci95"] = ci
        if name == "steps_to_success":
            out["steps_to_success_seeds"] = n
    wins = [sum(records[s]["final"]["per_episode_success"]) for s in seeds]
    trials = [len(records[s]["final"]["per_episode_success"]) for s in seeds]
    per_seed["success_wilson95"] = [list(binomial_interval(w, t)[1:3]) for w, t in zip(wins, trials, strict=True)]
    pooled = binomial_interval(sum(wins), sum(trials))
    out["success_pooled_wilson95"] = [pooled.low, pooled.high]
    out["eval_episodes"] = trials
    hist = [records[s].get("history") or [] for s in seeds]
    per_seed["bc_weight_final"] = [h[-1]["bc_weight"] if h else None for h in hist]
    per_seed["grad_ratio_median"] = [_median([r.get("grad_ratio") for r in h]) for h in hist]
    out["per_seed"] = per_seed
    return out


def _median(xs: Sequence[Any]) -> float | None:
    ys = sorted(float(x) for x in xs if _finite(x))
    if not ys:
        return None
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else 0.5 * (ys[mid - 1] + ys[mid])


def curve_band(records: dict[int, dict]) -> dict[str, Any]:
    """Learning curve over seeds: per evaluation point, mean and 95% CI of success and steps_all.

    Only iterations that every seed evaluated are kept.
    """
    curves = [records[s].get("curve") or [] for s in sorted(records)]
    if not curves or not all(curves):
        return {}
    common = set.intersection(*({p["iteration"] for p in c} for c in curves))
    out: dict[str, Any] = {"iteration": sorted(common), "n": len(curves)}
    for key in ("success", "steps_all"):
        means, lows, highs = [], [], []
        for it in out["iteration"]:
            vals = [next(p[key] for p in c if p["iteration"] == it) for c in curves]
            m, ci, _ = mean_ci(vals)
            means.append(m)
            lows.append(ci[0] if ci else m)
            highs.append(ci[1] if ci else m)
        out[key] = {"mean": means, "low": lows, "high": highs}
    return out


# --------------------------------------------------------------------------------------------
# Aggregation


def load_records(results: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """``{task: {variant: {seed: record}}}`` from ``RESULTS/<task>/seed<k>/<variant>.json``."""
    found: dict[str, dict[str, dict[int, dict]]] = {}
    if not results.exists():
        return found
    for path in sorted(results.glob("*/seed*/*.json")):
        task, seed_name = path.parts[-3], path.parts[-2]
        if not seed_name[4:].isdigit():
            continue
        found.setdefault(task, {}).setdefault(path.stem, {})[int(seed_name[4:])] = json.loads(
            path.read_text())
    return found


def _variant_order(names: Sequence[str]) -> list[str]:
    base = [v for v in ("sft", *VARIANTS) if v in names]
    return base + sorted(set(names) - set(base))


def summarise_task(by_variant: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Every variant's summary plus its paired differences vs sft and vs ppo_sbc."""
    out: dict[str, Any] = {}
    for v in _variant_order(list(by_variant)):
        recs = by_variant[v]
        entry = summarise_variant(recs)
        entry["paired"] = {}
        for ref in ("sft", "ppo_sbc"):
            if ref != v and ref in by_variant:
                entry["paired"][f"vs_{ref}"] = paired(recs, by_variant[ref])
        if v != "ppo_sbc" and "ppo_sbc" in by_variant and v != "sft":
            entry["tost_vs_ppo_sbc"] = equivalence(recs, by_variant["ppo_sbc"])
        entry["curve"] = curve_band(recs) if v != "sft" else {}
        out[v] = entry
    return out


def overall(records: dict[str, dict[str, dict[int, dict]]], tasks: Sequence[str]) -> dict[str, Any]:
    """Success averaged over `tasks` per seed (seeds with every task done), with a 95% CI."""
    out: dict[str, Any] = {}
    if not tasks or not all(t in records for t in tasks):
        return out
    variants = set.intersection(*(set(records[t]) for t in tasks))
    for v in _variant_order(list(variants)):
        seeds = sorted(set.intersection(*(set(records[t][v]) for t in tasks)))
        per_seed = [math.fsum(records[t][v][s]["final"]["success"] for t in tasks) / len(tasks)
                    for s in seeds]
        mean, ci, n = mean_ci(per_seed)
        out[v] = {"success": mean, "success_ci95": ci, "n": n, "seeds": seeds,
                  "per_seed": per_seed}
    # paired over seeds against ppo_sbc: the per-seed task averages on the common seeds
    ref = out.get("ppo_sbc")
    for v, entry in out.items():
        if ref is None or v == "ppo_sbc":
            continue
        common = sorted(set(entry["seeds"]) & set(ref["seeds"]))
        a = [entry["per_seed"][entry["seeds"].index(s)] for s in common]
        b = [ref["per_seed"][ref["seeds"].index(s)] for s in common]
        diff = {"mean": math.fsum(x - y for x, y in zip(a, b, strict=True)) / len(common)
                if common else None, "ci95": None, "n": len(common)}
        if len(common) >= 2:
            d = paired_difference(a, b)
            diff["ci95"] = [d.low, d.high]
        entry["vs_ppo_sbc"] = diff
    return out


def plot_task(task: str, summary: dict[str, Any], path: Path) -> None:
    """Learning curves (mean and 95% CI band over seeds) of success and steps (fail = cap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for v, entry in summary.items():
        band = entry.get("curve") or {}
        if not band:
            continue
        for ax, key in zip(axes, ("success", "steps_all"), strict=True):
            line, = ax.plot(band["iteration"], band[key]["mean"], marker="o", ms=3,
                            label=f"{v} ({band['n']} seeds)")
            ax.fill_between(band["iteration"], band[key]["low"], band[key]["high"],
                            color=line.get_color(), alpha=0.15)
    if "sft" in summary:
        for ax, key in zip(axes, ("success", "steps_all"), strict=True):
            ax.axhline(summary["sft"][key], color="k", ls="--", lw=1, label="sft (final goals)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title(f"{task}: eval success (mean action), 95% CI")
    axes[1].set_title(f"{task}: eval steps (failures = cap), 95% CI")
    for ax in axes:
        ax.set_xlabel("PPO iteration (0 = SFT)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _fmt_ci(mean: Any, ci: Any, spec: str) -> str:
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def markdown(out: dict[str, Any]) -> str:
    """The Markdown tables: per-variant results and paired differences vs SFT."""
    lines = ["| task | method | seeds | success | steps to success | steps (fail = cap) | "
             "env steps | CPU s | update s |", "|---|---|---|---|---|---|---|---|---|"]
    for task, summary in out["tasks"].items():
        for v, r in summary.items():
            lines.append(
                f"| {task} | {v} | {len(r['per_seed']['seeds'])} | "
                f"{_fmt_ci(r['success'], r['success_ci95'], '.2f')} | "
                f"{_fmt_ci(r['steps_to_success'], r['steps_to_success_ci95'], '.1f')} | "
                f"{_fmt_ci(r['steps_all'], r['steps_all_ci95'], '.1f')} | "
                f"{_fmt(r['env_steps'], '.0f')} | {_fmt(r['cpu_s'], '.0f')} | "
                f"{_fmt(r['update_s'], '.1f')} |")
    lines += ["", "| task | method | Δ success vs sft | Δ steps to success | Δ steps, goals both "
              "solve | Δ steps (fail = cap) |", "|---|---|---|---|---|---|"]
    for task, summary in out["tasks"].items():
        for v, r in summary.items():
            p = r["paired"].get("vs_sft")
            if p:
                cells = [_fmt_ci(p[f]["mean"], p[f]["ci95"], "+.2f" if f == "success" else "+.1f")
                         for f in ("success", "steps_to_success", "steps_common", "steps_all")]
                lines.append(f"| {task} | {v} | " + " | ".join(cells) + " |")
    lines += ["", "| task | method | Δ success vs ppo_sbc | TOST ±0.05 (p) | Δ steps, goals both "
              "solve | update s vs ppo_sbc |", "|---|---|---|---|---|---|"]
    for task, summary in out["tasks"].items():
        ref = summary.get("ppo_sbc")
        for v, r in summary.items():
            p = r["paired"].get("vs_ppo_sbc")
            if not p or v == "sft" or ref is None:
                continue
            tost = r.get("tost_vs_ppo_sbc")
            verdict = "-" if not tost else (
                f"{'**yes**' if tost['equivalent'] else 'no'} ({tost['p_value']:.2f})")
            ratio = (r["update_s"] / ref["update_s"]
                     if _finite(r["update_s"]) and _finite(ref["update_s"]) and ref["update_s"] > 0
                     else None)
            lines.append(
                f"| {task} | {v} | {_fmt_ci(p['success']['mean'], p['success']['ci95'], '+.2f')} | "
                f"{verdict} | {_fmt_ci(p['steps_common']['mean'], p['steps_common']['ci95'], '+.1f')} | "
                f"{_fmt(ratio, '.2f')}x |")
    if out.get("overall"):
        lines += ["", "| method | success over the tasks (per-seed mean) | seeds | Δ vs ppo_sbc, "
                  "paired |", "|---|---|---|---|"]
        for v, r in out["overall"].items():
            d = r.get("vs_ppo_sbc")
            paired_cell = _fmt_ci(d["mean"], d["ci95"], "+.3f") + f" ({d['n']} seeds)" if d else "-"
            lines.append(f"| {v} | {_fmt_ci(r['success'], r['success_ci95'], '.3f')} | {r['n']} | "
                         f"{paired_cell} |")
    return "\n".join(lines)


def _no_nan(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _display(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (portable records)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def aggregate(args: argparse.Namespace) -> dict[str, Any]:
    """Summarise every finished record; write the JSON and the plots; print the tables."""
    records = load_records(args.results)
    out: dict[str, Any] = {"command": args.command, "results": _display(args.results), "tasks": {}}
    for task in sorted(records):
        out["tasks"][task] = summarise_task(records[task])
        plot_task(task, out["tasks"][task], args.docs / "img" / f"chunked_ppo_{task}.png")
    out["overall"] = overall(records, [t for t in args.tasks if t in records])
    summary = args.summary or args.results.with_suffix(".json")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(_no_nan(out), indent=1, allow_nan=False))
    print(markdown(out))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--bc-weight", nargs="*", default=[], choices=BC_WEIGHT_RULES,
                        help="weight-rule ablation: add ppo_sbc+<rule> per rule")
    parser.add_argument("--default-bc-weight", default="success_rate", choices=BC_WEIGHT_RULES,
                        help="the rule of the plain ppo_sbc and ppo_sbc_pcm variants")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "chunked_ppo",
                        help="checkpoints (git-ignored)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "chunked_ppo",
                        help="per-unit JSON records (committed)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="--aggregate's JSON (default: RESULTS.json beside RESULTS)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs",
                        help="--aggregate's plots go to DOCS/img")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th unit from the i-th")
    parser.add_argument("--set", nargs="*", default=[], help="example Config overrides, key=value")
    parser.add_argument("--aggregate", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the example's seconds-long run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--command", default="python benchmarks/chunked_ppo_study.py")
    args = parser.parse_args(argv)
    try:
        parse_shard(args.shard)
        parse_sets(args.set)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run this shard's units, or aggregate with ``--aggregate``."""
    args = parse_args(argv)
    if args.aggregate:
        return aggregate(args)
    run(args)
    return None


if __name__ == "__main__":
    main()
