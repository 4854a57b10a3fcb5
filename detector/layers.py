"""Layer taps: flattened activations of named graph nodes, and layer presets as data.

Layer names are the node names of `torchvision.models.feature_extraction`
(`get_graph_node_names(model)[1]`, the eval-mode graph): "layer1.0.relu_1",
"Mixed_5b.cat", "features.29". A preset is a validated list of `LayerInfo`
records (name, block, depth); the built-in presets (the paper's layers) are
computed from the torchvision graph on first use, so they are exactly the
names the graph gives.

    model = build_torchvision_model("resnet50", "resnet50.pth")
    tap = LayerTap(model, preset_layers("resnet50"))
    out = tap(images)            # TapOutput(logits (B, 1000), {name: (B, k) float32})

Wrappers (`models.normalize.Normalized`) declare `tap_prefix = "model."`: the
tap then accepts the inner model's names (a preset) as well as full names.
"""
from __future__ import annotations

import difflib
import inspect
import itertools
import math
import operator
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.feature_extraction import NodePathTracer
from tqdm.auto import tqdm

from semguard.registry import Registry


# --------------------------------------------------------------------------- presets


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


# --------------------------------------------------------------------------- graph tracing


def layer_blocks(name: str, layers: list[str]) -> list[str]:
    """Block of each tapped layer: the preset's when the subject's layers are a preset's, else the
    layer name up to its first dot ("layer3.1.relu" -> "layer3")."""
    if name in known_presets():
        info = {i.name: i.block for i in preset_info(name)}
        if all(n in info for n in layers):
            return [info[n] for n in layers]
    return [n.split(".")[0] for n in layers]


class Trace(NamedTuple):
    graph: fx.Graph
    names: dict[str, fx.Node]  # node name (torchvision convention) -> node, in execution order


def _tracer() -> NodePathTracer:
    # The defaults of torchvision's get_graph_node_names / create_feature_extractor, so names agree with it.
    ops_modules = [
        obj for _, obj in inspect.getmembers(torchvision.ops)
        if inspect.isclass(obj) and issubclass(obj, nn.Module)
    ]
    return NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=ops_modules)


def trace_graph(model: nn.Module) -> Trace:
    """Symbolically trace `model` in eval mode (its mode is restored afterwards)."""
    was_training = model.training
    tracer = _tracer()
    try:
        graph = tracer.trace(model.eval())
    finally:
        model.train(was_training)
    return Trace(graph, {qualname: node for node, qualname in tracer.node_to_qualname.items()})


def graph_node_names(model: nn.Module) -> list[str]:
    """Eval-graph node names in execution order (same as `get_graph_node_names(model)[1]`, one trace)."""
    return list(trace_graph(model).names)


def is_relu(node: fx.Node, model: nn.Module) -> bool:
    """Whether a traced node applies a ReLU (an nn.ReLU module, torch.relu / F.relu, or .relu())."""
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, nn.functional.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def relu_nodes(model: nn.Module) -> list[str]:
    """Names of the eval graph's ReLU nodes (modules, functions, methods), in execution order."""
    return [name for name, node in trace_graph(model).names.items() if is_relu(node, model)]


# The activation functions whose outputs are a network's feature maps (ReLU's successors in ReLU6/mobile nets,
# EfficientNet, ConvNeXt, ...). Sigmoid, Hardsigmoid, Tanh and Softmax are left out: in CNNs they gate
# (squeeze-excitation, attention) rather than produce a representation.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Softplus,
)
_F = nn.functional
ACTIVATION_FUNCTIONS = frozenset({
    torch.relu, torch.relu_, _F.relu, _F.relu6, _F.leaky_relu, _F.prelu, _F.rrelu, _F.elu, _F.selu, _F.celu,
    _F.gelu, _F.silu, _F.mish, _F.hardswish, _F.softplus, torch.selu, torch.celu, torch.prelu, torch.rrelu,
})
ACTIVATION_METHODS = frozenset({"relu", "relu_"})
_SIGMOIDS = frozenset({torch.sigmoid, _F.sigmoid})
_MULS = frozenset({operator.mul, torch.mul})


def _is_swish(node: fx.Node) -> bool:
    """x * sigmoid(x) written out (Swish modules of EfficientNet-style code)."""
    if not (node.op == "call_function" and node.target in _MULS) and not (node.op == "call_method" and node.target == "mul"):
        return False
    a, b = (node.args + (None, None))[:2]
    gate = lambda g, x: (isinstance(g, fx.Node) and g.args[:1] == (x,) and  # noqa: E731
                         ((g.op == "call_function" and g.target in _SIGMOIDS) or (g.op == "call_method" and g.target == "sigmoid")))
    return gate(b, a) or gate(a, b)


def activation_kind(node: fx.Node, model: nn.Module) -> str | None:
    """The activation function a traced node applies ("ReLU6", "gelu", "swish"), or None."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        return type(module).__name__ if isinstance(module, ACTIVATION_MODULES) else None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        return node.target.__name__
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        return node.target
    return "swish" if _is_swish(node) else None


def activation_nodes(model: nn.Module) -> dict[str, str]:
    """{node name: activation kind} of every activation-function output of the eval graph (modules,
    functional calls, methods, written-out swish), in execution order: the default taps of a model
    without a preset."""
    found = {}
    for name, node in trace_graph(model).names.items():
        kind = activation_kind(node, model)
        if kind is not None:
            found[name] = kind
    return found


# --------------------------------------------------------------------------- model construction

# torchvision builds these with auxiliary heads and input transform when weights are given;
# we do the same, load the file, then drop the heads so the eval graph has one output.
_AUX_HEADS = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}


def _construct(arch: str, num_classes: int, pretrained: bool, **model_kwargs) -> nn.Module:
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5)
        raise ValueError(f"arch: unknown torchvision classification model {arch!r}; close names: {close}")
    kwargs: dict = {"num_classes": num_classes}
    if arch in _AUX_HEADS:
        kwargs.update(aux_logits=True, init_weights=not pretrained)
        if pretrained:
            kwargs["transform_input"] = True
    kwargs.update(model_kwargs)
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _drop_aux_heads(arch: str, model: nn.Module) -> None:
    for head in _AUX_HEADS.get(arch, ()):
        setattr(model, head, None)
    if arch in _AUX_HEADS:
        model.aux_logits = False


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: .safetensors, or a torch file read with weights_only=True (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from semguard.files import check_safetensors

        check_safetensors(path)
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses anything but tensors and containers
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"weights_path: {str(path)!r} is not a plain tensor state dict (torch.load weights_only "
                         f"refused it, and semguard never unpickles: {first})") from error
    # Training checkpoints often nest the weights one level down.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights_path: {str(path)!r} does not hold a state dict of tensors")
    return state


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], optional: tuple[str, ...], path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"weights_path: {str(path)!r} does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, shape mismatches {wrong_shape[:5]}"
        )
    model.load_state_dict(state, strict=False)


def build_torchvision_model(
    arch: str, weights_path: str | Path | None = None, num_classes: int = 1000, **model_kwargs
) -> nn.Module:
    """A torchvision classifier in eval mode, weights from a local file (never downloads).

    `weights_path`: .safetensors or a torch state dict (loaded with weights_only=True); None keeps
    the random initialisation. Inception-v3 / GoogLeNet are built as torchvision builds them for
    pretrained weights (aux heads on, transform_input=True), loaded, then the aux heads are dropped;
    a file without the aux-head keys loads too. `model_kwargs` override constructor arguments.
    """
    model = _construct(arch, num_classes, pretrained=weights_path is not None, **model_kwargs)
    if weights_path is not None:
        optional = tuple(f"{head}." for head in _AUX_HEADS.get(arch, ()))
        _load_checked(model, load_state_dict_file(weights_path), optional, weights_path)
    _drop_aux_heads(arch, model)
    return model.eval()


def _meta_model(arch: str) -> nn.Module:
    # Parameters on the meta device: tracing needs only the structure, so building is instant.
    with torch.device("meta"):
        model = _construct(arch, 1000, pretrained=False)
    _drop_aux_heads(arch, model)
    return model.eval()


# --------------------------------------------------------------------------- built-in presets


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
        "(all names: detector.layers.graph_node_names(model))"
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
        self.module = _extractor(model, trace, self.nodes)

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
        if any(m.training for m in self.module.modules()):  # a model put back in train mode must not change what is
            self.module.eval()  # tapped; eval() itself sets every submodule's flag (~1.5 ms a call on the world CNN)
        logits, taps = self.module(images)
        stale = frozenset(n for n, (value, version) in zip(self.nodes, taps) if version is not None and value._version != version)
        if stale:  # changed in place after the node ran: copy those from now on, and run this batch again
            self._copied |= stale
            self.module = _extractor(self.model, trace_graph(self.model), self.nodes, self._copied)
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


def _first_item(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate_images(items: list) -> torch.Tensor:
    return torch.stack([torch.as_tensor(_first_item(item)) for item in items])


def image_batches(images_or_dataset: torch.Tensor | Dataset, batch_size: int, num_workers: int = 0
                  ) -> Iterator[torch.Tensor]:
    """(b, C, H, W) batches of a tensor (N, C, H, W), or of a Dataset yielding images or (image, label) (a
    DataLoader, in order; with `num_workers`, decoding runs in worker processes): the one batching loop
    that tapping and prediction share."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(images_or_dataset, torch.Tensor):
        source = images_or_dataset
        return (source[i : i + batch_size] for i in range(0, len(source), batch_size))
    if isinstance(images_or_dataset, Dataset):
        return iter(DataLoader(images_or_dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                               collate_fn=_collate_images))
    raise ValueError(
        f"images_or_dataset: expected a torch.Tensor (N, C, H, W) or a torch Dataset, "
        f"got {type(images_or_dataset).__name__}"
    )


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
