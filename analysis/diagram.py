"""`semguard analyze diagram`: a network's tapped layers drawn from the FX trace the taps use
(detector.layers), coloured by 2 vs 2 with a mark where significant after BHY.

Layout, pure matplotlib: one frame per block/module in depth order (wrapping into figure rows),
each tapped layer a box. Edges are the trace's own: a tapped node is joined to its nearest tapped
ancestors (through the untapped nodes between them). Inside a frame, parallel branches (Inception's
towers, FractalNet's columns) stand side by side in lanes and a join or concatenation spans the
lanes it merges (block_layout). A frame's header says how many graph nodes the block holds and
how many are tapped; the module path all its layers share is written once there.
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
from torch import nn

from semguard.models.factory import ModelSpec, create_model, load_state_dict_file
from semguard.models.graph import relu_nodes, trace_graph
from semguard.models.normalize import build_torchvision_model
from semguard.models.presets import PRESETS, LayerInfo


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
        state = None if weights is None else {k.removeprefix("model."): v for k, v in load_state_dict_file(weights).items()
                                               if not k.startswith("optim.")}
        model = create_model(ModelSpec(name, {}, f"semguard.models.{name}"), weights=state, what=f"--weights {weights}")
    elif weights is not None:
        model = build_torchvision_model(name, weights)
    else:
        with torch.device("meta"):  # structure only
            model = build_torchvision_model(name)
    if name in PRESETS.names():
        return model, PRESETS.lookup(name)
    relus = relu_nodes(model)
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
    trace = trace_graph(model)
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
    for name in trace_graph(model).names:
        pending += 1
        if name in block_of:
            counts[block_of[name]] += pending
            pending = 0
    return counts


def common_prefix(names: list[str]) -> str:
    """The dotted module path all names share ("layer1.0." for a ResNet block), '' for one name or none shared."""
    parts = [n.split(".")[:-1] for n in names]
    shared = []
    for level in zip(*parts) if len(names) > 1 else ():
        if len(set(level)) > 1:
            break
        shared.append(level[0])
    return "".join(p + "." for p in shared)


class Placed(NamedTuple):
    row: int  # depth level inside the block (0: top)
    lanes: tuple[int, int]  # first and last lane the box spans (a join/concat spans its branches)


def block_layout(names: list[str], parents: dict[str, list[str]]) -> dict[str, Placed]:
    """Lanes and rows of one block's tapped layers (execution order), parents: in-block tapped ancestors.

    A layer continues its parent's lane when it is that lane's latest layer; a fork or a layer with no
    parent in the block (a branch head) opens a new lane; a layer with several parents (a join) spans
    their lanes when it is the next layer of each, else opens a lane. Rows: longest path from the block's
    first layers, moved down past any box already there.
    """
    placed: dict[str, Placed] = {}
    tail: dict[int, str] = {}  # lane -> its latest layer
    taken: set[tuple[int, int]] = set()  # (row, lane)
    for name in names:
        ps = parents.get(name, [])
        row = max((placed[p].row + 1 for p in ps), default=0)
        lanes = sorted({lane for p in ps for lane in range(placed[p].lanes[0], placed[p].lanes[1] + 1)})
        if ps and all(tail.get(lane) in ps for lane in lanes) and (len(ps) > 1 or len(lanes) == 1):
            span = (lanes[0], lanes[-1])
        elif ps and len(ps) == 1 and tail.get(placed[ps[0]].lanes[0]) == ps[0]:
            span = (placed[ps[0]].lanes[0],) * 2
        else:
            span = (len(tail),) * 2 if tail or ps else (0, 0)
        while any((row, lane) in taken for lane in range(span[0], span[1] + 1)):
            row += 1
        placed[name] = Placed(row, span)
        for lane in range(span[0], span[1] + 1):
            tail[lane] = name
            taken.add((row, lane))
    return placed


LANE_W, BOX_W, ROW_H = 1.9, 1.75, 1.0  # lane pitch, box width, row pitch (data units)
MAX_ROW_LANES, MAX_ROW_BLOCKS = 18, 9  # wrap the blocks into figure rows of at most these
X_INCH, Y_INCH = 0.72, 0.36  # inches per data unit
ROW_GAP = 2.3  # between figure rows: room for the block headers


def draw_diagram(model: nn.Module, infos: list[LayerInfo], path: str | Path, title: str = "",
                 results: dict[str, tuple[float, bool]] | None = None) -> Diagram:
    """Draw the blocks (branches side by side, joins spanning them); returns what was drawn (the test counts the labels)."""
    blocks = list(dict.fromkeys(i.block for i in infos))
    members = {b: [i.name for i in infos if i.block == b] for b in blocks}
    block_of = {i.name: i.block for i in infos}
    counts = block_node_counts(model, infos)
    edges = [(a, b) for a, b in tap_edges(model, [i.name for i in infos]) if block_of[a] == block_of[b]]
    layouts = {}
    for b in blocks:
        parents: dict[str, list[str]] = {}
        for a, c in edges:
            if block_of[c] == b:
                parents.setdefault(c, []).append(a)
        layouts[b] = block_layout(members[b], parents)
    prefix = {b: common_prefix(members[b]) or (b + "." if all(n.startswith(b + ".") for n in members[b]) else "")
              for b in blocks}  # shown once, in the block's header
    width = {b: max(p.lanes[1] for p in layouts[b].values()) + 1 for b in blocks}
    height = {b: max(p.row for p in layouts[b].values()) + 1 for b in blocks}
    rows: list[list[str]] = [[]]  # blocks left to right, wrapped
    for b in blocks:
        if rows[-1] and (sum(width[x] for x in rows[-1]) + width[b] > MAX_ROW_LANES or len(rows[-1]) == MAX_ROW_BLOCKS):
            rows.append([])
        rows[-1].append(b)
    fig_lanes = max(sum(width[b] for b in row) for row in rows) + 0.3 * max(len(row) for row in rows)
    fig_rows = sum(max(height[b] for b in row) + ROW_GAP for row in rows)
    fig, ax = plt.subplots(figsize=(LANE_W * fig_lanes * X_INCH + 1.5, ROW_H * fig_rows * Y_INCH + 1.0))
    cmap = plt.get_cmap(CMAP)
    centre, labels, top = {}, [], 0.0
    for row in rows:
        left = 0.0
        for block in row:
            x0 = left
            ax.text(x0 + width[block] * LANE_W / 2 - (LANE_W - BOX_W) / 2, -top + 0.25,
                    f"{block}{f' ({prefix[block]}*)' if prefix[block] and not prefix[block].startswith(block + '.') else ''}\n"
                    f"{counts[block]} nodes, {len(members[block])} tapped",
                    ha="center", va="bottom", fontsize=7, weight="bold")
            ax.add_patch(FancyBboxPatch((x0 - 0.08, -top - 0.55 - height[block] * ROW_H), width[block] * LANE_W - (LANE_W - BOX_W) + 0.16,
                                        height[block] * ROW_H + 0.3, boxstyle="round,pad=0.02", fc="none", ec="0.75", lw=0.6))
            for name in members[block]:
                place = layouts[block][name]
                y = -top - 1 - place.row * ROW_H
                xa, xb = x0 + place.lanes[0] * LANE_W, x0 + place.lanes[1] * LANE_W + BOX_W
                score = results.get(name) if results else None
                face = cmap((score[0] - VMIN) / (VMAX - VMIN)) if score else (0.88, 0.88, 0.88, 1)
                ax.add_patch(FancyBboxPatch((xa, y - 0.3), xb - xa, 0.6, boxstyle="round,pad=0.02", fc=face,
                                            ec="black", lw=1.4 if score and score[1] else 0.5))
                short = name[len(prefix[block]):]
                text = short + (f" {score[0]:.2f}{'*' if score[1] else ''}" if score else "")
                ax.text((xa + xb) / 2, y, text, ha="center", va="center", fontsize=6 if len(text) > 16 else 6.5)
                centre[name] = ((xa + xb) / 2, y, xa, xb)
                labels.append(name)
            left += width[block] * LANE_W + 0.3 * LANE_W
        top += max(height[b] for b in row) * ROW_H + ROW_GAP
    for a, b in edges:
        xa, ya, *_ = centre[a]
        _, yb, lo, hi = centre[b]
        ax.add_patch(FancyArrowPatch((xa, ya - 0.3), (min(max(xa, lo + 0.1), hi - 0.1), yb + 0.3), arrowstyle="-|>",
                                     mutation_scale=6, lw=0.6, color="0.35", shrinkA=0, shrinkB=0))
    ax.set_xlim(-0.5, LANE_W * fig_lanes + 0.2)
    ax.set_ylim(-top - 0.2, 1.3)
    ax.axis("off")
    if results:
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(VMIN, VMAX))
        fig.colorbar(mappable, ax=ax, fraction=0.015, pad=0.01, label="2 vs 2 (* and thick border: significant after BHY)")
    ax.set_title(title or f"{len(labels)} tapped layers in {len(blocks)} blocks", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return Diagram(path, labels, blocks, len(edges))
