"""A network's eval graph: symbolic tracing with torchvision's node names, and which nodes apply an activation.

Node names are those of `torchvision.models.feature_extraction` (`get_graph_node_names(model)[1]`):
"layer1.0.relu_1", "Mixed_5b.cat", "features.29". Layer presets (models.presets) and the guard's
taps (detector.layers.LayerTap) name layers this way.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import NamedTuple

import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer


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
