"""PNG plots for the command-line reports (matplotlib, non-interactive backend)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_layer_widths", "plot_spectra", "plot_compare"]

#: Marker per series, so lines that overlap stay distinguishable.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot_layer_widths(rows: Sequence[dict], path: str) -> None:
    """Bars of output channels (or KFE directions) kept per layer, before vs after."""
    names = [r["name"] for r in rows]
    before = [_width(r["before"]) for r in rows]
    after = [_width(r["after"]) if r["after"] else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    x = range(len(rows))
    ax.bar(x, before, color="#c8c8c8", label="before")
    ax.bar(x, after, color="#1f77b4", label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("channels / directions kept")
    ax.set_title("Per-layer width (KFE blocks: output directions; two-layer forms: the inner width)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _width(layer: dict) -> int:
    dirs = layer.get("directions")
    return dirs[-1] if dirs else layer["out_channels"]


def plot_spectra(spectra: Dict[str, Dict[str, List[float]]], path: str) -> None:
    """Eigenvalue spectra (descending, log scale) of λ_A and λ_S per layer.

    Every series has markers, so a short spectrum (a conv with 3 input channels has 3
    eigenvalues of A) stays visible; a layer with no positive eigenvalue says so in the legend.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, spec) in enumerate(spectra.items()):
        for ax, key in zip(axes, ("input", "grad")):
            values = sorted((v for v in spec[key] if v > 0), reverse=True)
            label = name if values else f"{name} (no positive eigenvalue)"
            ax.semilogy(range(1, len(values) + 1), values, label=label, marker=MARKERS[i % len(MARKERS)],
                        markersize=3, markevery=max(1, len(values) // 20))
    axes[0].set_title("λ_A (input factor A)")
    axes[1].set_title("λ_S (gradient factor S)")
    for ax in axes:
        ax.set_xlabel("rank")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: The x axes of :func:`plot_compare`: summary key and label.
COMPARE_AXES = (("params_fraction", "remaining parameters (fraction of original)"),
                ("latency_fraction", "measured latency (fraction of original)"))


def plot_compare(summary: Sequence[dict], path: str) -> None:
    """Test accuracy (mean ± std over seeds) against remaining parameters (left) and against
    measured latency (right), one line per (method, fine-tune budget): a marker per method, a
    line style per budget, and a small horizontal offset per method so that coinciding points
    do not hide each other."""
    fig, axes = plt.subplots(1, len(COMPARE_AXES), figsize=(12, 4.5), sharey=True)
    methods = sorted({r["method"] for r in summary})
    budgets = sorted({r["finetune_epochs"] for r in summary})
    styles = ("-", "--", ":", "-.")
    for ax, (key, label) in zip(axes, COMPARE_AXES):
        for r_method, method in enumerate(methods):
            for budget in budgets:
                rows = sorted((r for r in summary if r["method"] == method and r["finetune_epochs"] == budget),
                              key=lambda r: r[key]["mean"])
                if not rows:
                    continue
                offset = 0.004 * (r_method - (len(methods) - 1) / 2)
                ax.errorbar([r[key]["mean"] + offset for r in rows],
                            [r["accuracy"]["mean"] for r in rows], yerr=[r["accuracy"]["std"] for r in rows],
                            marker=MARKERS[r_method % len(MARKERS)], linestyle=styles[budgets.index(budget) % 4],
                            capsize=3, markersize=5, label=f"{method} (ft {budget})")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
