"""Layer taps: a model's logits plus the flattened activations of named graph nodes, batch by batch.

Layer names are the node names of `torchvision.models.feature_extraction` (models.graph); presets
(models.presets) are lists of them:

    model = build_torchvision_model("resnet50", "resnet50.pth")
    tap = LayerTap(model, preset_layers("resnet50"))
    out = tap(images)            # TapOutput(logits (B, 1000), {name: (B, k) float32})

Wrappers (`models.normalize.Normalized`) declare `tap_prefix = "model."`: the
tap then accepts the inner model's names (a preset) as well as full names.
"""
from __future__ import annotations

import difflib
import itertools
import math
import operator
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from semguard.models.graph import Trace, trace_graph
from semguard.models.inputs import image_batches


# --------------------------------------------------------------------------- taps


class TapOutput(NamedTuple):
    logits: torch.Tensor  # (B, C): the model's output
    acts: dict[str, torch.Tensor]  # layer name -> (B, k_l) float32, in the tap's layer order


def _resolve(name: str, names: list[str], prefix: str) -> str:
    """The graph node for `name`: exact node name, or torchvision's module query (last node under it)."""
    for candidate in ([name, prefix + name] if prefix else [name]):
        if candidate in names:
            return candidate
        under = [n for n in names if n.startswith(candidate + ".")]
        if under:
            return under[-1]
    bare = [n[len(prefix):] for n in names if prefix and n.startswith(prefix)]
    close = difflib.get_close_matches(name, bare + names, n=5, cutoff=0.5)
    raise ValueError(
        f"layers: {name!r} is not a node of the model's graph; close node names: {close} "
        "(all names: models.graph.graph_node_names(model))"
    )


def _snapshot(value):
    """A tapped value and its version counter now; a later in-place op on it (or on a view of it) bumps the counter."""
    if not isinstance(value, torch.Tensor):
        return value, None
    if value.is_inference():  # inference tensors keep no version counter: copy instead
        return value.clone(), None
    return value, value._version


def _add_in_place(graph: fx.Graph, model: nn.Module) -> None:
    """Tracing turns `out += identity` into `out + identity`, a fresh (B, C, H, W) tensor per residual
    block; make it in-place again where that is safe: the left operand is a conv or batch-norm output
    (a fresh tensor, not a view) that nothing else reads (so never a tapped value)."""
    fresh = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for node in graph.nodes:
        left = node.args[0] if node.op == "call_function" and node.target is operator.add else None
        if (isinstance(left, fx.Node) and left.op == "call_module" and len(left.users) == 1
                and isinstance(model.get_submodule(left.target), fresh)):
            node.target = operator.iadd


def _extractor(model: nn.Module, trace: Trace, nodes: list[str], copied: frozenset[str] = frozenset()) -> fx.GraphModule:
    """Eval-graph module returning (output, tuple of (value, version) of `nodes`), with dead code removed.

    Values are not copied: `LayerTap` compares each returned value's version counter with the one
    taken right after the node ran, and a node whose value a later in-place op changed (a conv
    output under ReLU(inplace=True)) is rebuilt into `copied`, copied right after it runs.
    """
    graph, by_name = trace
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node):
        raise ValueError("model: its output must be a single tensor of logits (eval mode), not a tuple or dict")
    taps: dict[str, fx.Node] = {}
    for name in dict.fromkeys(nodes):
        with graph.inserting_after(by_name[name]):
            value = graph.call_function(torch.clone, (by_name[name],)) if name in copied else by_name[name]
        with graph.inserting_after(value):
            taps[name] = graph.call_function(_snapshot, (value,))
    graph.erase_node(output)
    graph.output((logits, tuple(taps[n] for n in nodes)))
    _add_in_place(graph, model)
    module = fx.GraphModule(model, graph, type(model).__name__ + "Tap")
    # Only the requested nodes outlive the pass: FX frees every other value after its last use.
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    return module.eval()


class LayerTap:
    """Run a model once and return its logits plus the flattened activations of named nodes.

    `model` takes the images the caller has (for the project: [0, 1] images, normalised inside
    the model). `layers`: node names as in `graph_node_names(model)` or a torchvision module query
    ("layer1" = the last node under layer1); a model with a `tap_prefix` attribute also accepts
    names relative to its inner model. The tap reads the model in eval mode (and sets it there);
    it shares the model's parameters, so build it after moving the model to its device.
    Works with and without grad.
    """

    def __init__(self, model: nn.Module, layers: list[str]):
        layers = list(layers)
        if not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"layers: expected a non-empty list of node names, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers: names must be unique, got {len(layers) - len(set(layers))} repeats")
        trace = trace_graph(model)
        prefix = getattr(model, "tap_prefix", "")
        self.layers: list[str] = layers
        self.nodes: list[str] = [_resolve(n, list(trace.names), prefix) for n in layers]
        self.model = model.eval()
        self._copied: frozenset[str] = frozenset()  # nodes a later in-place op changes (see _extractor)
        self._set_module(_extractor(model, trace, self.nodes))

    def _set_module(self, module: fx.GraphModule) -> None:
        self.module = module
        self._submodules = list(module.modules())  # walked once: modules() recurses (~0.2 ms a call on the world CNN)

    @property
    def device(self) -> torch.device:
        tensor = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def to(self, device: torch.device | str) -> "LayerTap":
        self.model.to(device)
        self.module.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> TapOutput:
        """images: (B, ...) model inputs -> TapOutput(logits (B, C), {layer: (B, k) float32})."""
        if not isinstance(images, torch.Tensor) or images.ndim < 2 or len(images) == 0:
            raise ValueError(f"images: expected a non-empty (B, ...) tensor, got {_describe(images)}")
        if any(m.training for m in self._submodules):  # a model put back in train mode must not change what is
            self.module.eval()  # tapped; eval() itself sets every submodule's flag (~1.5 ms a call on the world CNN)
        logits, taps = self.module(images)
        stale = frozenset(n for n, (value, version) in zip(self.nodes, taps) if version is not None and value._version != version)
        if stale:  # changed in place after the node ran: copy those from now on, and run this batch again
            self._copied |= stale
            self._set_module(_extractor(self.model, trace_graph(self.model), self.nodes, self._copied))
            logits, taps = self.module(images)
        acts = [value for value, _ in taps]
        flat = {}
        for name, act in zip(self.layers, acts):
            if not isinstance(act, torch.Tensor) or act.ndim == 0 or len(act) != len(images):
                raise ValueError(f"layers: node {name!r} does not produce a (B, ...) tensor ({_describe(act)})")
            flat[name] = act.reshape(len(act), -1).float()  # (B, k)
        return TapOutput(logits, flat)


def _describe(x) -> str:
    return f"tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def iter_activations(
    tap: LayerTap,
    images_or_dataset: torch.Tensor | Dataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    progress: bool = False,
) -> Iterator[tuple[slice, TapOutput]]:
    """Tap a tensor (N, C, H, W) or a Dataset yielding images or (image, label) in chunks.

    Yields (slice of item indices, TapOutput) batch by batch, without grad, so only one batch of
    activations is alive at a time. Images move to the tap's device; outputs stay there.
    """
    batches = image_batches(images_or_dataset, batch_size, num_workers)
    total = math.ceil(len(images_or_dataset) / batch_size) if hasattr(images_or_dataset, "__len__") else None
    device = tap.device
    start = 0
    for images in tqdm(batches, total=total, disable=not progress, desc="activations"):
        # no_grad only around the pass: a context held across `yield` would leak into the caller.
        with torch.no_grad():
            out = tap(images.to(device))
        stop = start + len(images)
        yield slice(start, stop), out
        start = stop
