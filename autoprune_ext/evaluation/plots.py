"""PNG plots of a study result (matplotlib, Agg backend).

* ``accuracy.png`` — test accuracy against the kept fraction (prune ratio = 1 - kept; log scale for
  wide geometric schedules), one panel per distribution, one line per method, the parent's accuracy
  (dotted) and the parent minus 0.5% band;
* ``potential.png`` — prune-potential bars (delta 0.5%) per distribution and method;
* ``excess_error.png`` — excess error against prune ratio with the zero-intercept fit per method;
* ``noise.png`` — functional similarity under uniform noise: agreement with the parent, softmax L2
  distance, accuracy and prune potential against eps, with the separately trained network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLORS = {"autoprune": "tab:red", "wt": "tab:blue", "sipp": "tab:orange", "ft": "tab:green", "pfp": "tab:purple",
          "magnitude": "tab:brown"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _pct(value: float | None) -> float:
    """Percent, NaN (a gap in the line) for a missing value."""
    return 100.0 * value if value is not None else float("nan")


def _color(method: str, i: int) -> str:
    return COLORS.get(method, f"C{i % 10}")


def plot_accuracy(result: dict[str, Any], path: str | Path) -> Path:
    plt = _plt()
    dists = result["distributions"]
    ratios = result["prune_ratios"]
    keys = [f"{r:.4f}" for r in ratios]
    ncol = min(4, len(dists))
    nrow = math.ceil(len(dists) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.7 * nrow), squeeze=False)
    for ax, d in zip(axes.flat, dists):
        parent = result["parent_accuracy"][d]
        ax.axhline(100 * parent, color="k", linestyle=":", linewidth=1, label="parent")
        ax.axhspan(100 * (parent - result["deltas"][0]), 100 * parent, color="0.85", zorder=0)
        for i, m in enumerate(result["methods"]):
            acc = [_pct(result["accuracy"][m][d].get(k)) for k in keys]
            ax.plot([100 * (1 - r) for r in ratios], acc, "o-", markersize=3, color=_color(m, i), label=m)
        if all(r < 1 for r in ratios) and len(ratios) > 1 and max(1 - r for r in ratios) / min(1 - r for r in ratios) > 5:
            ax.set_xscale("log")  # geometric keep ratios: evenly spaced
            ax.xaxis.set_major_formatter(_plain_ticks())
        ax.invert_xaxis()
        ax.set_ylim(max(0.0, 100 * parent - 25), min(100.0, 100 * parent + 5))
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("kept parameters (%)", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(dists):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_potential_bars(result: dict[str, Any], path: str | Path, distributions: list[str] | None = None) -> Path:
    plt = _plt()
    dists = distributions or result["distributions"]
    methods = result["methods"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(dists) * max(1, len(methods) / 3)), 3.8))
    for i, m in enumerate(methods):
        vals = [100 * result["prune_potential"][m][d] for d in dists]
        errs = [100 * (result.get("prune_potential_std", {}).get(m, {}).get(d) or 0.0) for d in dists]
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(dists))], vals, width, yerr=errs,
               color=_color(m, i), label=m, capsize=2)
    ax.set_xticks(range(len(dists)))
    ax.set_xticklabels(dists, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("prune potential (%), delta 0.5%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_excess_error(result: dict[str, Any], path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ee = result.get("excess_error", {}).get("methods", {})
    if not ee:
        ax.text(0.5, 0.5, "no shifted test sets: no excess error", ha="center", va="center", transform=ax.transAxes)
    for i, (m, e) in enumerate(ee.items()):
        c = _color(m, i)
        pts = e.get("points", [])
        if pts:
            ax.scatter([100 * p[0] for p in pts], [100 * p[1] for p in pts], s=8, color=c, alpha=0.35)
        ax.plot([100 * r for r in e["ratios"]], [_pct(v) for v in e["mean"]], "o", markersize=4, color=c)
        slope = e.get("slope")
        if slope is not None and math.isfinite(slope):
            ax.plot([0, 100], [0, 100 * slope], "-", color=c, linewidth=1,
                    label=f"{m}: {100 * slope * 0.8:+.2f} pts at 80%")
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xlabel("prune ratio (%)")
    ax.set_ylabel("excess error (points)")
    ax.set_xlim(0, 100)
    if ee:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _representative(keys: list[str]) -> list[str]:
    """Up to three ratios of a method: the smallest, the middle one and the largest."""
    if len(keys) <= 3:
        return keys
    return [keys[0], keys[len(keys) // 2], keys[-1]]


def plot_noise(result: dict[str, Any], path: str | Path) -> Path:
    plt = _plt()
    noise = result.get("noise") or {}
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    if not noise.get("methods"):
        for ax in axes:
            ax.axis("off")
        axes[0].text(0.1, 0.5, "noise probe disabled", transform=axes[0].transAxes)
    else:
        eps = noise["eps"]
        sep = noise["separate"]
        for ax, metric, label in ((axes[0], "agreement", "top-1 agreement with parent"),
                                  (axes[1], "softmax_l2", "softmax L2 distance to parent"),
                                  (axes[2], "accuracy", "accuracy")):
            ax.plot(eps, sep[metric], "k--", linewidth=1.5, label="separate net")
            if metric == "accuracy":
                ax.plot(eps, noise["parent_accuracy"], "k:", linewidth=1.5, label="parent")
            for i, m in enumerate(result["methods"]):
                keys = _representative(list(noise["methods"][m]))
                for j, k in enumerate(keys):
                    ax.plot(eps, noise["methods"][m][k][metric], "-", color=_color(m, i), alpha=0.4 + 0.6 * j / max(len(keys) - 1, 1),
                            linewidth=1, label=f"{m} {100 * float(k):.0f}%")
            ax.set_xlabel("noise eps (normalised units)")
            ax.set_ylabel(label, fontsize=8)
        for i, m in enumerate(result["methods"]):
            axes[3].plot(eps, [100 * v for v in noise["prune_potential"][m]], "o-", markersize=3, color=_color(m, i), label=m)
        axes[3].set_xlabel("noise eps (normalised units)")
        axes[3].set_ylabel("prune potential (%), delta 0.5%", fontsize=8)
        axes[3].set_ylim(0, 100)
        axes[0].legend(fontsize=6, ncol=2)
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_all(result: dict[str, Any], out: str | Path) -> list[Path]:
    """All four PNGs into directory ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_accuracy(result, out / "accuracy.png"),
        plot_potential_bars(result, out / "potential.png"),
        plot_excess_error(result, out / "excess_error.png"),
        plot_noise(result, out / "noise.png"),
    ]
