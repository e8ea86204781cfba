"""Plot backward_savings results: update time and saved-activation bytes against B/N.

Each input is a JSON file written by `backward_savings.py --out`. Both panels show the ratio to
the full-GRPO update (lower is better) against the kept fraction `B / N`, with the ideal line
`y = B / N` (the physical limit: cost proportional to the chunks back-propagated). The mask-only
baseline is drawn as a separate marker: it keeps the same fraction but shrinks nothing.

    python benchmarks/plot_benchmarks.py benchmarks/results/backward_savings_small.json \\
        benchmarks/results/backward_savings_small_lora.json --out docs/img/backward_savings.png

With `--markdown` it also prints the results (selection_overhead files too) as markdown tables.
"""

import argparse
import json
from pathlib import Path
from typing import Any


def _label(meta: dict[str, Any]) -> str:
    parts = [meta.get("preset", "?"), "LoRA" if meta.get("lora") else "full fine-tune"]
    parts.append(f"{meta.get('device', '?')}, {meta.get('threads', '?')} thr")
    return ", ".join(parts)


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    panels = [
        ("update time / full (log)", lambda r: 1.0 / r["speedup"], "actor-update time"),
        ("saved bytes / full (log)", lambda r: r["saved_ratio"], "activations saved for backward"),
    ]
    markers = ["o", "s", "^", "D"]
    ticks = sorted({r["budget"] / r["chunks_total"] for res in results for r in res["records"]})
    for ax, (ylabel, value, title) in zip(axes, panels, strict=True):
        ax.plot(
            [0.05, 1.0],
            [0.05, 1.0],
            color="0.5",
            ls="--",
            lw=1,
            label="ideal: y = B/N (physical limit)",
        )
        for i, res in enumerate(results):
            recs = res["records"]
            n = recs[0]["chunks_total"]
            pcm = sorted(
                (r for r in recs if r["selector"] in ("pcm", "full")), key=lambda r: r["budget"]
            )
            xs = [r["budget"] / n for r in pcm]
            ys = [value(r) for r in pcm]
            (line,) = ax.plot(
                xs, ys, marker=markers[i % len(markers)], label=f"PCM ({_label(res['meta'])})"
            )
            if ax is axes[0]:
                ax.plot(
                    xs,
                    [r["flops_ratio"] for r in pcm],
                    ls=":",
                    color=line.get_color(),
                    marker="x",
                    label="FLOPs / full",
                )
                for r, x, y in zip(pcm, xs, ys, strict=True):
                    if r["selector"] == "pcm":
                        ax.annotate(
                            f"{r['speedup']:.2f}x of {r['limit']:.2f}x",
                            (x, y),
                            textcoords="offset points",
                            xytext=(6, -12 - 10 * i),
                            fontsize=7,
                            color=line.get_color(),
                        )
            for r in recs:
                if r["selector"] == "mask-only":
                    ax.plot(
                        r["budget"] / n,
                        value(r),
                        marker="X",
                        ms=10,
                        ls="none",
                        color=line.get_color(),
                        markeredgecolor="k",
                        label=f"mask-only, B={r['budget']} (no shrinking)",
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.set_yticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlim(min(ticks) * 0.8, 1.25)
        ax.set_ylim(min(ticks) * 0.8, 1.4)
        ax.set_xlabel("kept fraction B / N (log)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    meta = results[0]["meta"]
    cfg = meta.get("config", {})
    fig.suptitle(
        f"chunkmask backward-pass savings, {cfg.get('num_traj')} x {cfg.get('num_chunks')} chunks,"
        f" torch {meta.get('torch_version')}",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def backward_table(res: dict[str, Any]) -> str:
    """A markdown table of one backward_savings result."""
    rows = [
        "| selector | B | chunks | micro-batches | update s (IQR) | selection ms | speedup | "
        "limit N/B | of limit | CPU-time speedup (of limit) | saved MiB | saved ratio | GFLOP | "
        "FLOPs ratio | peak saved ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["records"]:
        rows.append(
            f"| {r['selector']} | {r['budget']} | {r['chunks_selected']} | {r['micro_batches']} | "
            f"{r['update_time_s']:.3f} ({r['update_time_iqr_s']:.3f}) | "
            f"{1e3 * r['selection_time_s']:.1f} | {r['speedup']:.2f}x | {r['limit']:.2f}x | "
            f"{100 * r['fraction_of_limit']:.1f}% | {r['speedup_cpu']:.2f}x "
            f"({100 * r['fraction_of_limit_cpu']:.1f}%) | {_mb(r['saved_bytes'])} | "
            f"{r['saved_ratio']:.4f} | {r['flops'] / 1e9:.2f} | {r['flops_ratio']:.4f} | "
            f"{r['peak_saved_ratio']:.3f} |"
        )
        if r.get("cuda_peak_bytes") is not None:
            rows[-1] += f" CUDA peak {_mb(r['cuda_peak_bytes'])} MiB ({r['cuda_peak_ratio']:.3f}) |"
    return "\n".join(rows)


def overhead_tables(res: dict[str, Any]) -> str:
    """Markdown tables of one selection_overhead result."""
    rows = ["| stage | time ms (IQR) | % of full update |", "|---|---|---|"]
    for r in res["stages"]:
        iqr = "" if r["iqr_s"] is None else f" ({1e3 * r['iqr_s']:.2f})"
        rows.append(
            f"| {r['stage']} | {1e3 * r['time_s']:.2f}{iqr} | "
            f"{100 * r['fraction_of_update']:.3f}% |"
        )
    rows += ["", "| sampler | time us (IQR) | vs multinomial | compile s |", "|---|---|---|---|"]
    for r in res["samplers"]:
        if r["time_s"] is None:
            rows.append(f"| {r['method']} | failed: {r['error']} | | |")
            continue
        comp = "" if r["compile_time_s"] is None else f"{r['compile_time_s']:.1f}"
        rows.append(
            f"| {r['method']} | {1e6 * r['time_s']:.1f} ({1e6 * r['iqr_s']:.1f}) | "
            f"{r['relative_to_multinomial']:.2f}x | {comp} |"
        )
    return "\n".join(rows)


def markdown(results: list[dict[str, Any]]) -> str:
    """Markdown tables for every result, each headed by its configuration."""
    parts = []
    for res in results:
        meta = res["meta"]
        head = (
            f"**{meta['benchmark']}**, preset `{meta['preset']}`"
            + (", LoRA" if meta.get("lora") else "")
            + f", {meta['device']}, {meta['threads']} thread(s), torch {meta['torch_version']},"
            f" {meta['date']}"
        )
        if meta["benchmark"] == "backward_savings":
            parts += [head, "", backward_table(res), ""]
        else:
            head += f", full update {res['full_update_time_s']:.3f} s"
            parts += [head, "", overhead_tables(res), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        help="JSON files of backward_savings (plotted) and selection_overhead",
    )
    p.add_argument("--out", type=Path, default=Path("docs/img/backward_savings.png"))
    p.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = p.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.inputs]
    if args.markdown:
        print(markdown(results))
    savings = [r for r in results if r["meta"]["benchmark"] == "backward_savings"]
    if not savings:
        return None
    plot(savings, args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
