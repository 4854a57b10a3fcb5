"""The one way semguard builds a network (timm's `create_model`): a `ModelSpec` names a registered builder
and its JSON keyword arguments; `create_model(spec, weights=...)` builds it and loads the weights.

A subject (`--model resnet50 --weights f.pth`), a guard bundle (bundle.json's "model") and a training
checkpoint (its metadata) all describe their network as a ModelSpec and build it here:

    model = create_model(ModelSpec("torchvision", {"arch": "resnet18", "num_classes": 10}), weights="w.pth")

Builders register by name (`@register_model_builder("worldnet")`) with an explicit allow-list of the
kwargs a file may give them (`args`, checked before the builder runs: timm's `checkpoint_path` would
load a pickle, torchvision's `weights=` would download). The library's builders live in
models.normalize (torchvision, timm, entry point), models.worldnet and models.fractalnet and are
registered on first use. A spec may name the module registering its builder (`ModelSpec.module`); it is
imported only when it lies in the semguard package, never an arbitrary module a file names. Names
written before semguard had one import name ("models.worldnet") map to their semguard.* module.

One builder runs code a file names: "entry_point" (a user's `pkg.module:factory`). `create_model`
refuses it unless the caller passes `trust_model_code=True`, before anything is imported.

Weights: a .safetensors file or a torch state dict read with weights_only=True (never unpickled), or a
dict of tensors; loaded strictly into the network (a wrapper's inner network when it declares a
`tap_prefix`, models.normalize.Normalized: a weights file is the bare network's).
"""
from __future__ import annotations

import importlib
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semguard.registry import Registry

PLUGIN_PACKAGE = "semguard"  # a spec may ask to import a module of this package (to register a builder), no other
# Files written before the move under one import name call semguard.models.* "models.*" (and so on).
LEGACY_PACKAGES = ("detector", "attacks", "service", "world", "models", "analysis")
LIBRARY_MODULES = ("semguard.models.normalize", "semguard.models.worldnet", "semguard.models.fractalnet")
ENTRY_POINT_BUILDER = "entry_point"  # imports and runs the user code its kwargs name: trusted callers only
# Heads torchvision builds for pretrained weights and the builder drops (Inception-v3, GoogLeNet): a weights
# file may hold them or not.
DROPPED_HEADS = ("AuxLogits.", "aux1.", "aux2.")


class ModelSpecError(ValueError):
    """A spec that names no known builder, a module outside semguard, or kwargs its builder does not allow."""


class UntrustedModelCode(ModelSpecError):
    """The model is built by user code (an entry point) and the caller did not say it trusts it."""


class OtherClassCount(ValueError):
    """A weights file for the same architecture with another number of classes (`key` is its head tensor)."""

    def __init__(self, found: str, key: str, classes: int, expected: int):
        super().__init__(f"{found}, but the model is built for {expected}")
        self.found, self.key, self.classes = found, key, classes  # found: "<file>: <name> weights for K classes (...)"


# ----------------------------------------------------------------------------- builders and their arguments

ModelBuilder = Callable[..., nn.Module]
MODEL_BUILDERS: Registry[ModelBuilder] = Registry("model builder")


@dataclass(frozen=True)
class Arg:
    """A keyword argument a builder accepts from a file: its JSON type and its range, choices, keys or items."""

    kind: type | tuple[type, ...]
    low: float | None = None  # numbers: inclusive bounds
    high: float | None = None
    choices: tuple | None = None
    fields: dict[str, "Arg"] | None = None  # dicts: the allowed keys (others refused)
    item: "Arg | None" = None  # lists: every item
    max_len: int = 16


BUILDER_ARGS: dict[str, dict[str, Arg]] = {}  # builder -> the kwargs a file may give it (the allow-list)
NUM_CLASSES = Arg(int, 1, 1_000_000)
ARCH = Arg(str)  # checked against the library's own list of architectures by the builder


def register_model_builder(name: str, builder: ModelBuilder | None = None, *, overwrite: bool = False,
                           args: dict[str, Arg] | None = None):
    """Register `builder(**kwargs) -> nn.Module` (taking [0, 1] images) under `name`; usable as a decorator.
    `args`: the only kwargs a file may pass it, checked before it runs (None: a builder whose kwargs are its
    own validated config, e.g. a dataclass)."""
    if args is not None:
        BUILDER_ARGS[name] = args
    return MODEL_BUILDERS.register(name, builder, overwrite=overwrite)


def known_model_builders() -> list[str]:
    _register_library()
    return MODEL_BUILDERS.names()


def check_arg(where: str, value: Any, arg: Arg) -> None:
    """ModelSpecError naming `where` (e.g. model.kwargs.model_kwargs.drop_rate) when `value` breaks `arg`."""
    numeric = arg.kind in (int, float, (int, float))
    kinds = (int, float) if arg.kind is float else arg.kind
    if not isinstance(value, kinds) or (isinstance(value, bool) and arg.kind is not bool):
        raise ModelSpecError(f"field {where}: expected {getattr(arg.kind, '__name__', arg.kind)}, got {value!r}")
    if numeric and not isinstance(value, bool):
        if not math.isfinite(value) or (arg.low is not None and value < arg.low) or (
                arg.high is not None and value > arg.high):
            raise ModelSpecError(f"field {where}: must be in [{arg.low}, {arg.high}], got {value!r}")
    if arg.choices is not None and value not in arg.choices:
        raise ModelSpecError(f"field {where}: must be one of {list(arg.choices)}, got {value!r}")
    if isinstance(value, dict) and arg.fields is not None:
        for key, inner in value.items():
            if key not in arg.fields:
                raise ModelSpecError(f"field {where}.{key}: not an argument a file may give "
                                     f"(allowed: {sorted(arg.fields)})")
            check_arg(f"{where}.{key}", inner, arg.fields[key])
    if isinstance(value, list) and arg.item is not None:
        if len(value) > arg.max_len:
            raise ModelSpecError(f"field {where}: at most {arg.max_len} items, got {len(value)}")
        for i, inner in enumerate(value):
            check_arg(f"{where}[{i}]", inner, arg.item)


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """How to build a network: a registered builder, its JSON kwargs, the module registering it."""

    builder: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # e.g. "semguard.models.worldnet"; imported on demand, only from PLUGIN_PACKAGE

    @property
    def name(self) -> str:
        """What messages call the network: its architecture ("resnet18", "timm/convnext_tiny"), entry point or builder."""
        arch = self.kwargs.get("arch") if isinstance(self.kwargs, dict) else None
        if isinstance(arch, str):
            return f"timm/{arch}" if self.builder.startswith("timm") else arch
        entry = self.kwargs.get("entry") if isinstance(self.kwargs, dict) else None
        return entry if isinstance(entry, str) else self.builder


def plugin_module(module: str) -> str:
    """The semguard module a spec's `module` names (a pre-namespace name mapped into semguard.);
    ModelSpecError for any module outside semguard, which a file must never make us import."""
    if not isinstance(module, str) or not all(part.isidentifier() for part in module.split(".")):
        raise ModelSpecError(f"model.module must be a dotted module name, got {module!r}")
    top = module.split(".")[0]
    if top in LEGACY_PACKAGES:
        module = f"{PLUGIN_PACKAGE}.{module}"
    elif top != PLUGIN_PACKAGE:
        raise ModelSpecError(f"model.module {module!r} is outside the {PLUGIN_PACKAGE!r} package; a file may only "
                             f"name {PLUGIN_PACKAGE}.* modules (register other builders in code before loading)")
    return module


def _register_library() -> None:
    for module in LIBRARY_MODULES:
        importlib.import_module(module)


def create_model(spec: ModelSpec, *, weights: str | Path | dict[str, torch.Tensor] | None = None,
                 trust_model_code: bool = False, what: str = "weights") -> nn.Module:
    """The spec's network in eval mode: freshly initialised, then `weights` loaded when given (load_weights;
    `what` names them in errors, e.g. "--weights").

    trust_model_code: allow the "entry_point" builder, which imports and runs the code the spec names;
    without it such a spec is an UntrustedModelCode error and nothing is imported.
    """
    if spec.builder == ENTRY_POINT_BUILDER and not trust_model_code:
        raise UntrustedModelCode(
            f"field model.builder: the model is built by user code (entry point {spec.kwargs.get('entry')!r}); "
            "pass --trust-model-code (library: trust_model_code=True) to import and run it")
    if spec.module is not None:
        module = plugin_module(spec.module)  # checked even when the builder is known: a hostile file is refused
        if spec.builder not in MODEL_BUILDERS:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                raise ModelSpecError(f"model.module {spec.module!r}: no module {e.name!r} in this semguard") from None
    if spec.builder not in MODEL_BUILDERS:
        _register_library()
    if spec.builder not in MODEL_BUILDERS:
        raise ModelSpecError(f"model.builder {spec.builder!r} is not registered; known model builders: "
                             f"{known_model_builders()} (import the module that registers it first)")
    if not isinstance(spec.kwargs, dict):
        raise ModelSpecError(f"field model.kwargs: expected an object, got {spec.kwargs!r}")
    if spec.builder in BUILDER_ARGS:
        check_arg("model.kwargs", spec.kwargs, Arg(dict, fields=BUILDER_ARGS[spec.builder]))
    try:
        model = MODEL_BUILDERS[spec.builder](**spec.kwargs)
    except TypeError as e:  # a missing or unknown keyword argument
        raise ModelSpecError(f"field model.kwargs: do not fit builder {spec.builder!r}: {e}") from None
    if weights is not None:
        load_weights(model, weights, name=spec.name, what=what)
    return model.eval()


# ----------------------------------------------------------------------------- weights


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


def inner_network(model: nn.Module) -> nn.Module:
    """The network a wrapper holds (the submodule its `tap_prefix` names), else the model itself."""
    prefix = getattr(model, "tap_prefix", "")
    return model.get_submodule(prefix.rstrip(".")) if prefix else model


def _other_class_count(state: dict, expected: dict) -> tuple[str, int] | None:
    """(key, K) when `state` is the expected architecture with K outputs instead: every key present,
    and the only mismatches are tensors whose first dimension is K instead of the model's (the head)."""
    if any(k not in state for k in expected):
        return None
    wrong = [k for k, v in expected.items() if state[k].shape != v.shape]
    if not wrong or any(state[k].ndim != expected[k].ndim or state[k].shape[1:] != expected[k].shape[1:]
                        or expected[k].shape[0] != expected[wrong[0]].shape[0] for k in wrong):
        return None
    counts = {state[k].shape[0] for k in wrong}
    return (wrong[0], counts.pop()) if len(counts) == 1 else None


def load_weights(model: nn.Module, weights: str | Path | dict[str, torch.Tensor], *, name: str = "the model",
                 what: str = "weights") -> None:
    """Load `weights` (a file or a state dict) into `model`'s network strictly: every key, every shape, except
    the heads the builder dropped (DROPPED_HEADS). ValueError naming `what` and the file; OtherClassCount
    when the file is this architecture for another number of classes."""
    where = f"{what} {weights}" if not isinstance(weights, dict) else what
    if isinstance(weights, dict):
        state = weights
    else:
        try:
            state = load_state_dict_file(weights)
        except (ValueError, OSError) as error:
            raise ValueError(f"{where}: cannot be read as weights ({error})") from None
    target = inner_network(model)
    expected = target.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(DROPPED_HEADS)}
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    other = _other_class_count(state, expected) if not unexpected else None
    if other is not None:
        key, classes = other
        raise OtherClassCount(f"{where}: {name} weights for {classes} classes ({key} {tuple(state[key].shape)})", key,
                              classes, expected[key].shape[0])
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: not a {name} state dict (is it for another architecture?): "
                         f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]}, shape mismatches {shapes[:5]}")
    target.load_state_dict(state)
