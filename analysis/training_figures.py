"""Figures of the training-dynamics study: 2 vs 2 as a layer x epoch heatmap (paper Figure 2) and
block averages over epochs (Figure 3), one panel per run (true labels, permuted labels)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
from semguard.analysis.training import block_means

TITLES = {"true_labels": "true labels", "permuted_labels": "permuted labels"}


def plot_heatmap(path: Path, runs: dict[str, dict], alpha: float = 0.05) -> Path:
    """Rows: layers in depth order (block boundaries ruled); columns: checkpoints; colour: 2 vs 2 (0.4 .. 1);
    a dot where the layer is significant after BHY at that checkpoint."""
    n_layers = len(next(iter(runs.values()))["layers"])
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1.4, max(4.0, 0.16 * n_layers + 1.5)), squeeze=False)
    image = None
    for ax, (name, run) in zip(axes[0], runs.items()):
        acc, p = np.asarray(run["accuracy"]).T, np.asarray(run["p_bhy"]).T  # (L, E)
        image = ax.imshow(acc, aspect="auto", cmap="viridis", vmin=0.4, vmax=1.0, interpolation="nearest")
        rows, cols = np.nonzero(p < alpha)
        ax.plot(cols, rows, ".", color="white", ms=2.5)
        ax.set_xticks(range(len(run["epochs"])))
        ax.set_xticklabels(run["epochs"], fontsize=7, rotation=90 if len(run["epochs"]) > 15 else 0)
        ax.set_xlabel("epoch")
        blocks = run["blocks"]
        starts = [i for i in range(len(blocks)) if i == 0 or blocks[i] != blocks[i - 1]]
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="white", lw=0.8)
        ax.set_yticks(starts)
        ax.set_yticklabels([blocks[s] for s in starts], fontsize=8)
        ax.set_title(f"{TITLES.get(name, name)}\n(dots: significant after BHY)", fontsize=9)
    axes[0][0].set_ylabel("layer (depth order)")
    fig.colorbar(image, ax=axes[0].tolist(), label="2 vs 2 accuracy")
    return _save(fig, path)


def plot_block_lines(path: Path, runs: dict[str, dict]) -> Path:
    """One line per block: its layers' mean 2 vs 2 at each checkpoint; chance at 0.5."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5.0 * len(runs) + 1.6, 3.8), squeeze=False, sharey=True)
    for ax, (name, run) in zip(axes[0], runs.items()):
        blocks, means = block_means(run)
        colours = plt.cm.plasma(np.linspace(0.0, 0.85, len(blocks)))
        for b, block in enumerate(blocks):
            ax.plot(run["epochs"], means[:, b], "o-", ms=3, lw=1.3, color=colours[b], label=block)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set_xlabel("epoch")
        ax.set_title(TITLES.get(name, name), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("2 vs 2 accuracy (block mean)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
