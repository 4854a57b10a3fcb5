"""Layer presets as data: validated lists of `LayerInfo` (graph node name, block, depth), by name.

The built-in presets are the paper's layers, computed from the torchvision graph on first use so they
are exactly the names the graph gives: resnet50 (49 ReLUs), inception_v3 (94 ReLUs and each Mixed_*
output), vgg16 (15 ReLUs in conv1..conv5 and classifier). models.worldnet and models.fractalnet register
their own.

    preset_layers("resnet50")      # ["relu", "layer1.0.relu", ..., "layer4.2.relu_2"]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semguard.models.graph import is_relu, relu_nodes, trace_graph
from semguard.registry import Registry


@dataclass(frozen=True)
class LayerInfo:
    """One tapped layer: graph node name, the block/module it belongs to, its index in depth order."""

    name: str
    block: str
    depth: int


def _validate_preset(name: str, layers: list[LayerInfo]) -> list[LayerInfo]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"layers: preset {name!r} needs at least one LayerInfo")
    for i, info in enumerate(layers):
        if not isinstance(info, LayerInfo):
            raise ValueError(f"layers[{i}]: expected LayerInfo, got {type(info).__name__}")
        if not info.name or not info.block:
            raise ValueError(f"layers[{i}]: name and block must be non-empty, got {info}")
        if info.depth != i:
            raise ValueError(f"layers[{i}]: depth must equal the position in depth order ({i}), got {info.depth}")
    seen: set[str] = set()
    duplicates = sorted({x.name for x in layers if x.name in seen or seen.add(x.name)})
    if duplicates:
        raise ValueError(f"layers: preset {name!r} repeats layer names {duplicates[:5]}")
    return layers


# Built-in presets are computed from the torchvision graph when first asked for (registered lazily).
PRESETS: Registry[list[LayerInfo]] = Registry("layer preset", validate=_validate_preset)


def register_preset(name: str, layers: list[LayerInfo], *, overwrite: bool = False) -> None:
    """Register a preset: `layers` in depth order (layers[i].depth == i), unique names.

    Registering an existing name with different layers raises unless `overwrite=True`
    (registering the identical list again, e.g. on a module reload, is a no-op).
    """
    PRESETS.register(name, layers, overwrite=overwrite)


def known_presets() -> list[str]:
    """Names of all registered and built-in presets."""
    return PRESETS.names()


def preset_info(name: str) -> list[LayerInfo]:
    """The preset's `LayerInfo` records in depth order; unknown name -> ValueError listing known presets."""
    return list(PRESETS.lookup(name))


def preset_layers(name: str) -> list[str]:
    """The preset's node names in depth order."""
    return [info.name for info in preset_info(name)]


def layer_blocks(name: str, layers: list[str]) -> list[str]:
    """Block of each tapped layer: the preset's when the subject's layers are a preset's, else the
    layer name up to its first dot ("layer3.1.relu" -> "layer3")."""
    if name in known_presets():
        info = {i.name: i.block for i in preset_info(name)}
        if all(n in info for n in layers):
            return [info[n] for n in layers]
    return [n.split(".")[0] for n in layers]


# --------------------------------------------------------------------------- built-in presets


def _meta_model(arch: str) -> nn.Module:
    # Parameters on the meta device: tracing needs only the structure, so building is instant.
    from semguard.models.factory import ModelSpec, create_model

    with torch.device("meta"):
        return create_model(ModelSpec("torchvision", {"arch": arch}))


def _resnet50_preset() -> list[LayerInfo]:
    # 49 ReLUs: the stem's, then 3 per bottleneck block layer1.0 .. layer4.2 (16 blocks).
    names = relu_nodes(_meta_model("resnet50"))
    block = lambda n: ".".join(n.split(".")[:2]) if n.startswith("layer") else "stem"  # noqa: E731
    return [LayerInfo(n, block(n), i) for i, n in enumerate(names)]


def _inception_v3_preset() -> list[LayerInfo]:
    # 94 ReLUs plus each Mixed_* module's output (its last node: a cat), grouped by top-level module.
    model = _meta_model("inception_v3")
    trace = trace_graph(model)
    order = list(trace.names)
    mixed_last: dict[str, str] = {}
    for name in order:
        top = name.split(".")[0]
        if top.startswith("Mixed_") and "." in name:
            mixed_last[top] = name
    chosen = set(mixed_last.values()) | {n for n, node in trace.names.items() if is_relu(node, model)}
    names = [n for n in order if n in chosen]
    return [LayerInfo(n, n.split(".")[0], i) for i, n in enumerate(names)]


def _vgg16_preset() -> list[LayerInfo]:
    # 13 conv ReLUs grouped into the five stages between max-pools (conv1 .. conv5), then 2 classifier ReLUs.
    model = _meta_model("vgg16")
    layers: list[LayerInfo] = []
    stage = 1
    for name, node in trace_graph(model).names.items():
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.MaxPool2d):
            stage += 1
        elif is_relu(node, model):
            block = "classifier" if name.startswith("classifier") else f"conv{stage}"
            layers.append(LayerInfo(name, block, len(layers)))
    return layers


for _name, _factory in (("resnet50", _resnet50_preset), ("inception_v3", _inception_v3_preset), ("vgg16", _vgg16_preset)):
    PRESETS.register_lazy(_name, _factory)
