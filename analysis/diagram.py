"""`semguard analyze diagram`: a network's tapped layers drawn from the FX trace the taps use
(detector.layers), coloured by 2 vs 2 with a mark where significant after BHY.

Layout, pure matplotlib: one vertical strip per block/module in depth order (wrapping into rows),
each tapped layer a box in execution order. Edges inside a strip are the trace's own: a tapped node
is joined to its nearest tapped ancestors (through the untapped nodes between them), so parallel
branches (Inception's towers, FractalNet's columns) show as such. A strip's header says how many
graph nodes the block holds and how many are tapped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from semguard.detector.layers import (
    PRESETS,
    LayerInfo,
    _is_relu,
    _trace,
    build_torchvision_model,
)
from torch import nn

STRIPS_PER_ROW = 9  # ~2 inches each: resnet50's 17 blocks and inception_v3's 16 modules fit in two rows
CMAP, VMIN, VMAX = "RdYlGn", 0.4, 1.0


class Diagram(NamedTuple):
    path: Path
    labels: list[str]  # the tapped layers drawn, one entry per box, in drawing order
    blocks: list[str]  # strips in order
    edges: int  # tap-to-tap edges drawn inside strips


def diagram_model(name: str, weights: str | Path | None = None) -> tuple[nn.Module, list[LayerInfo]]:
    """The model and its taps: a registered preset of that name, else every ReLU grouped by top-level module."""
    if name == "fractalnet" and weights is not None:  # a `semguard train` checkpoint carries its own config
        from semguard.models.fractalnet import fractalnet_layers, load_fractalnet

        model = load_fractalnet(weights)
        return model, fractalnet_layers(model.config)
    if name in ("fractalnet", "worldnet"):
        from semguard.detector.bundle import ModelSpec, build_model

        model = build_model(ModelSpec(name, {}, f"semguard.models.{name}"))
        if weights is not None:
            from semguard.detector.layers import load_state_dict_file

            model.load_state_dict({k.removeprefix("model."): v for k, v in load_state_dict_file(weights).items()
                                   if not k.startswith("optim.")})
    elif weights is not None:
        model = build_torchvision_model(name, weights)
    else:
        with torch.device("meta"):  # structure only
            model = build_torchvision_model(name)
    if name in PRESETS.names():
        return model, PRESETS.lookup(name)
    relus = [n for n, node in _trace(model).names.items() if _is_relu(node, model)]
    if not relus:
        raise ValueError(f"model: {name!r} has no ReLU nodes and no registered preset to tap")
    return model, [LayerInfo(n, n.split(".")[0], i) for i, n in enumerate(relus)]


def load_results(path: str | Path) -> dict[str, tuple[float, bool]]:
    """layer -> (2 vs 2, significant after BHY) from a two_vs_two.json / summary.json / per-checkpoint file."""
    data = json.loads(Path(path).read_text())
    data = data.get("two_vs_two", data)
    if not {"layers", "accuracy", "p_bhy"} <= set(data):
        raise ValueError(f"results: {path} has no layers/accuracy/p_bhy (a 2 vs 2 result file)")
    return {n: (float(a), float(p) < 0.05) for n, a, p in zip(data["layers"], data["accuracy"], data["p_bhy"])}


def tap_edges(model: nn.Module, names: list[str]) -> list[tuple[str, str]]:
    """(ancestor, node) for each tapped node and each nearest tapped ancestor in the eval graph."""
    trace = _trace(model)
    qual = {node: n for n, node in trace.names.items()}
    tapped, nearest, edges = set(names), {}, []
    for node in trace.graph.nodes:
        found: set[str] = set()
        for parent in node.all_input_nodes:
            pname = qual.get(parent)
            found |= {pname} if pname in tapped else nearest.get(parent, set())
        name = qual.get(node)
        if name in tapped:
            edges += [(a, name) for a in sorted(found)]
            found = {name}
        nearest[node] = found
    return edges


def block_node_counts(model: nn.Module, infos: list[LayerInfo]) -> dict[str, int]:
    """Graph nodes per block: each node counts for the block of the next tapped layer in execution order."""
    block_of = {i.name: i.block for i in infos}
    counts: dict[str, int] = {i.block: 0 for i in infos}
    pending = 0
    for name in _trace(model).names:
        pending += 1
        if name in block_of:
            counts[block_of[name]] += pending
            pending = 0
    return counts


def draw_diagram(model: nn.Module, infos: list[LayerInfo], path: str | Path, title: str = "",
                 results: dict[str, tuple[float, bool]] | None = None) -> Diagram:
    """Draw the strips; returns what was drawn (the test counts the labels)."""
    blocks = list(dict.fromkeys(i.block for i in infos))
    members = {b: [i.name for i in infos if i.block == b] for b in blocks}
    counts = block_node_counts(model, infos)
    n_rows = -(-len(blocks) // STRIPS_PER_ROW)
    per_row = min(len(blocks), STRIPS_PER_ROW)
    row_heights = [max(len(members[b]) for b in blocks[r * per_row:(r + 1) * per_row]) + 2 for r in range(n_rows)]
    fig, ax = plt.subplots(figsize=(2.05 * per_row + 1.2, 0.3 * sum(row_heights) + 1.2))
    cmap = plt.get_cmap(CMAP)
    where, labels, top = {}, [], 0.0
    for r in range(n_rows):
        for c, block in enumerate(blocks[r * per_row:(r + 1) * per_row]):
            ax.text(c * 2 + 0.8, -top + 0.15, f"{block}\n{counts[block]} nodes, {len(members[block])} tapped",
                    ha="center", va="bottom", fontsize=7, weight="bold")
            for k, name in enumerate(members[block]):
                y = -top - 1 - k
                score = results.get(name) if results else None
                face = cmap((score[0] - VMIN) / (VMAX - VMIN)) if score else (0.85, 0.85, 0.85, 1)
                ax.add_patch(FancyBboxPatch((c * 2, y - 0.38), 1.6, 0.76, boxstyle="round,pad=0.02", fc=face, ec="black", lw=0.5))
                short = name[len(block) + 1:] if name.startswith(block + ".") else name
                text = short + (f"  {score[0]:.2f}{'*' if score[1] else ''}" if score else "")
                ax.text(c * 2 + 0.8, y, text, ha="center", va="center", fontsize=5.5 if len(text) > 24 else 6.5)
                where[name] = (c * 2, y)
                labels.append(name)
        top += row_heights[r]
    edges = 0
    block_of = {i.name: i.block for i in infos}
    for a, b in tap_edges(model, labels):
        if block_of[a] != block_of[b]:
            continue  # between blocks: the strips' order says it
        (xa, ya), (_, yb) = where[a], where[b]
        bend = 0.0 if ya - yb == 1 else 0.4  # skips around the boxes between, on the strip's left
        ax.add_patch(FancyArrowPatch((xa + 0.02, ya - 0.2), (xa + 0.02, yb + 0.2), connectionstyle=f"arc3,rad={bend}",
                                     arrowstyle="-|>", mutation_scale=5, lw=0.5, color="0.3"))
        edges += 1
    ax.set_xlim(-0.6, 2 * per_row)
    ax.set_ylim(-top - 0.2, 1.1)
    ax.axis("off")
    if results:
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(VMIN, VMAX))
        fig.colorbar(mappable, ax=ax, fraction=0.02, pad=0.01, label="2 vs 2 (* significant after BHY)")
    ax.set_title(title or f"{len(labels)} tapped layers in {len(blocks)} blocks", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return Diagram(path, labels, blocks, edges)
