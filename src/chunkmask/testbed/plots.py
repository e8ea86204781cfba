"""PNG plots of testbed runs: learning curves, realised phase allocation, captured-V curve."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chunkmask.pcm import Phase

PHASE_NAMES = [Phase(i).name.lower().replace("_", "-") for i in range(5)]
COLORS = {  # the first key a run's name starts with picks its colour
    "grpo": "#1f77b4",
    "full": "#1f77b4",
    "pcm_ht_long": "#8c6d1f",
    "pcm_long": "#3b0a0a",
    "pcm_ht": "#ff7f0e",
    "pcm_b8": "#bcbd22",
    "pcm_b16": "#17becf",
    "pcm_floor": "#8c564b",
    "pcm_refresh": "#e377c2",
    "pcm": "#d62728",
    "random": "#7f7f7f",
    "top_phase": "#9467bd",
    "entropy_topk": "#2ca02c",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(name: str) -> str | None:
    for key, color in COLORS.items():
        if name.startswith(key):
            return color
    return None


def eval_curve(records: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """`(steps, cumulative training seconds, held-out success)` at every evaluated step.

    Step 0 of the curve is the starting policy (before any update) at 0 seconds.
    """
    steps, wall, success = [], [], []
    elapsed = 0.0
    for r in records:
        if "eval_success_init" in r:
            steps.append(r["step"])
            wall.append(elapsed)
            success.append(r["eval_success_init"])
        elapsed += r["rollout_s"] + r["update_s"]
        if "eval_success" in r:
            steps.append(r["step"] + 1)
            wall.append(elapsed)
            success.append(r["eval_success"])
    return steps, wall, success


def plot_success(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    x: str = "step",
    threshold: float | None = None,
) -> None:
    """Held-out success against training step (`x="step"`) or wall-clock (`x="wall"`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, records in runs.items():
        steps, wall, success = eval_curve(records)
        xs = steps if x == "step" else wall
        ax.plot(xs, [100 * s for s in success], label=name, color=_color(name), lw=1.8)
    if threshold is not None:
        ax.axhline(100 * threshold, color="k", ls=":", lw=1, label="threshold")
    ax.set_xlabel("training step" if x == "step" else "training wall-clock (s)")
    ax.set_ylabel("held-out success (%)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_phase_allocation(
    records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None
) -> None:
    """Realised chunks per trajectory of each phase over training (Fig. 6 of the paper)."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    alloc = [[r["selected_per_phase"][c] for r in records] for c in range(len(PHASE_NAMES))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.stackplot(steps, alloc, labels=PHASE_NAMES, alpha=0.85)
    ax.set_xlabel("training step")
    ax.set_ylabel("selected chunks per trajectory")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_captured_v(
    curve_x: Sequence[float],
    curve_y: Sequence[float],
    path: str | Path,
    *,
    suggested: float,
    budget_fraction: float | None = None,
) -> None:
    """Captured share of the phase-score mass against the fraction of chunks kept (Fig. 8)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([100 * v for v in curve_x], [100 * v for v in curve_y], color="#d62728", lw=2)
    ax.plot([0, 100], [0, 100], color="k", ls=":", lw=1, label="uniform")
    ax.axvline(100 * suggested, color="#1f77b4", ls="--", label=f"knee ({100 * suggested:.0f}%)")
    if budget_fraction is not None:
        ax.axvline(100 * budget_fraction, color="#2ca02c", ls="-.", label="budget B")
    ax.set_xlabel("chunks kept (% of N)")
    ax.set_ylabel("captured V (%)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
