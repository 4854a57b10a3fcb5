"""Figures in the style of the paper: a score per layer, chance line, significant layers marked."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_by_layer(
    path: str | Path,
    layers: Sequence[str],
    curves: Mapping[str, np.ndarray],
    significant: Mapping[str, np.ndarray] | None = None,
    title: str = "",
    ylabel: str = "2 vs 2 accuracy",
    chance: float = 0.5,
    errors: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """One line per curve over layers in depth order; filled markers where significant.

    curves: name -> (L,) scores; significant: name -> (L,) bool; errors: name -> (L,) spread.
    """
    path = Path(path)
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2) + 1.6, 4.2))
    for name, y in curves.items():
        y = np.asarray(y, dtype=float)
        line = ax.plot(x, y, "-", lw=1.4, label=name)[0]
        if errors is not None and name in errors:
            e = np.asarray(errors[name])
            ax.fill_between(x, y - e, y + e, color=line.get_color(), alpha=0.15, lw=0)
        mask = np.asarray(significant[name], bool) if significant and name in significant else np.zeros(len(x), bool)
        ax.plot(x[mask], y[mask], "o", color=line.get_color(), ms=5)
        ax.plot(x[~mask], y[~mask], "o", mfc="white", color=line.get_color(), ms=5)
    ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("\nfilled: significant after BHY (q < 0.05)" if significant else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
