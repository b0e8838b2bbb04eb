"""PNG plots for the command-line reports (matplotlib, non-interactive backend)."""
from __future__ import annotations

from typing import Dict, List, Sequence

__all__ = ["plot_layer_widths", "plot_spectra", "plot_compare"]

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    ax.set_title("Per-layer width (KFE blocks: output directions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _width(layer: dict) -> int:
    dirs = layer.get("directions")
    return dirs[1] if dirs else layer["out_channels"]


def plot_spectra(spectra: Dict[str, Dict[str, List[float]]], path: str) -> None:
    """Eigenvalue spectra (descending, log scale) of λ_A and λ_S per layer."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, spec in spectra.items():
        for ax, key in zip(axes, ("input", "grad")):
            values = sorted((v for v in spec[key] if v > 0), reverse=True)
            ax.semilogy(range(1, len(values) + 1), values, label=name)
    axes[0].set_title("λ_A (input factor A)")
    axes[1].set_title("λ_S (gradient factor S)")
    for ax in axes:
        ax.set_xlabel("rank")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(results: Sequence[dict], path: str) -> None:
    """Test accuracy vs remaining parameters, one line per (method, fine-tune budget)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    series: Dict[str, list] = {}
    for r in results:
        series.setdefault(f"{r['method']} (ft {r['finetune_epochs']})", []).append(
            (r["params_fraction"], r["accuracy"]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p for p, _ in points], [a for _, a in points], marker="o", label=label)
    ax.set_xlabel("remaining parameters (fraction of original)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
