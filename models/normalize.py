"""Models that take [0, 1] images, and the library's model builders (models.factory).

Attacks clip to [0, 1] and the guard receives raw pixels; neither should know a model's mean and std,
so every model the project uses normalises inside (`Normalized`). Registered builders: "torchvision"
(a bare torchvision classifier), "torchvision_normalized", "timm_normalized" and "entry_point" (a
user's factory: trusted callers only). A weights file is the bare network's:

    model = imagenet_classifier("resnet50", "resnet50-0676ba61.pth")   # images (B, 3, H, W) in [0, 1]
    tap = LayerTap(model, preset_layers("resnet50"))                 # preset names work on the wrapper
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from semguard.models.factory import (
    ARCH, ENTRY_POINT_BUILDER, NUM_CLASSES, Arg, ModelSpec, create_model, register_model_builder,
)

# torchvision's ImageNet statistics (the transforms of every IMAGENET1K weight set).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """`model((images - mean) / std)` per channel; images (B, C, H, W) in [0, 1].

    `tap_prefix` tells `detector.layers.LayerTap` that node names of the inner model
    ("layer1.0.relu") can be used without the wrapper's "model." prefix.
    """

    tap_prefix = "model."

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean, std: expected equal non-empty per-channel sequences, got {list(mean)}, {list(std)}")
        if not torch.all(std_t > 0):
            raise ValueError(f"std: every entry must be > 0, got {std_t.tolist()}")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))  # (1, C, 1, 1)
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def imagenet_classifier(arch: str, weights_path: str | Path | None = None, num_classes: int = 1000) -> Normalized:
    """A torchvision ImageNet classifier (eval mode) taking [0, 1] images; weights from a local file."""
    return create_model(torchvision_spec(arch, num_classes, from_weights_file=weights_path is not None),
                        weights=weights_path, what="weights_path")


# ----------------------------------------------------------------------------- builders
# Files (bundle.json, a subject record) rebuild a model from these names and JSON kwargs; ModelSpec.module
# names this module.
MODULE = "semguard.models.normalize"
# What a file may pass these builders (models.factory.Arg); anything else is refused before the
# library runs: timm's checkpoint_path / pretrained_cfg_overlay would load a pickle or reach the network.
STATS = Arg(list, item=Arg(float, -100.0, 100.0), max_len=4)  # per-channel mean or std
_NORMALIZED = {"arch": ARCH, "num_classes": NUM_CLASSES, "mean": STATS, "std": STATS}
TORCHVISION_KWARGS = {"transform_input": Arg(bool), "init_weights": Arg(bool), "aux_logits": Arg(bool),
                      "dropout": Arg(float, 0.0, 1.0)}
TIMM_KWARGS = {"drop_rate": Arg(float, 0.0, 1.0), "drop_path_rate": Arg(float, 0.0, 1.0),
               "global_pool": Arg(str, choices=("", "avg", "max", "avgmax", "catavgmax", "token", "map"))}


# torchvision builds these with auxiliary heads when given weights; we build them the same way (so the
# layout is the weight files'), then drop the heads so the eval graph has one output.
_AUX_HEADS = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}


@register_model_builder("torchvision", args={"arch": ARCH, "num_classes": NUM_CLASSES,
                                             "model_kwargs": Arg(dict, fields=TORCHVISION_KWARGS)})
def build_torchvision(arch: str, num_classes: int = 1000, model_kwargs: dict | None = None) -> nn.Module:
    """A bare torchvision classifier (no normalisation inside; random weights), aux heads dropped.
    `model_kwargs` override constructor arguments (pretrained_layout gives those of the weight files)."""
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5)
        raise ValueError(f"arch: unknown torchvision classification model {arch!r}; close names: {close}")
    kwargs: dict = {"num_classes": num_classes}
    if arch in _AUX_HEADS:
        kwargs.update(aux_logits=True, init_weights=True)
    kwargs.update(model_kwargs or {})
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    for head in _AUX_HEADS.get(arch, ()):
        setattr(model, head, None)
    if arch in _AUX_HEADS:
        model.aux_logits = False
    return model.eval()


def build_torchvision_model(arch: str, weights_path: str | Path | None = None, num_classes: int = 1000) -> nn.Module:
    """A bare torchvision classifier in eval mode, weights from a local file (.safetensors or a state dict
    read weights_only; never downloads), built in the layout of torchvision's weight files when given one."""
    spec = ModelSpec("torchvision", {"arch": arch, "num_classes": num_classes,
                                     "model_kwargs": pretrained_layout(arch) if weights_path is not None else {}})
    return create_model(spec, weights=weights_path, what="weights_path")


def pretrained_layout(arch: str) -> dict:
    """Constructor kwargs that give a torchvision architecture the layout of torchvision's weight
    files once build_torchvision has dropped the aux heads (Inception-v3, GoogLeNet:
    transform_input=True, which their files need), for rebuilding without a weights file."""
    return {"transform_input": True, "init_weights": False} if arch in ("inception_v3", "googlenet") else {}


@register_model_builder("torchvision_normalized",
                        args={**_NORMALIZED, "model_kwargs": Arg(dict, fields=TORCHVISION_KWARGS)})
def build_torchvision_normalized(arch: str, num_classes: int = 1000, mean: Sequence[float] = IMAGENET_MEAN,
                                 std: Sequence[float] = IMAGENET_STD, model_kwargs: dict | None = None) -> Normalized:
    """Normalized(torchvision arch) with random weights."""
    return Normalized(build_torchvision(arch, num_classes, model_kwargs), mean, std).eval()


def torchvision_spec(arch: str, num_classes: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, from_weights_file: bool = True) -> ModelSpec:
    """The ModelSpec of `imagenet_classifier(arch, weights, num_classes)` (Normalized with mean, std)."""
    kwargs = {"arch": arch, "num_classes": num_classes, "mean": list(mean), "std": list(std),
              "model_kwargs": pretrained_layout(arch) if from_weights_file else {}}
    return ModelSpec("torchvision_normalized", kwargs, module=MODULE)


@register_model_builder("timm_normalized", args={**_NORMALIZED, "model_kwargs": Arg(dict, fields=TIMM_KWARGS)})
def build_timm_normalized(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                          model_kwargs: dict | None = None) -> Normalized:
    """Normalized(timm arch) built offline (pretrained=False; needs `pip install 'semguard[timm]'`)."""
    import timm

    return Normalized(timm.create_model(arch, pretrained=False, num_classes=num_classes, **(model_kwargs or {})),
                      mean, std).eval()


def timm_spec(arch: str, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> ModelSpec:
    kwargs = {"arch": arch, "num_classes": num_classes, "mean": list(mean), "std": list(std), "model_kwargs": {}}
    return ModelSpec("timm_normalized", kwargs, module=MODULE)


def import_entry_point(entry: str):
    """The callable `pkg.module:factory` names (uvicorn-style; the working directory is on the path).
    Runs the module's code: only ever called for an entry point a user named or trusted."""
    import importlib
    import os
    import sys

    module_name, _, attr = entry.partition(":")
    if not all(p.isidentifier() for p in module_name.split(".")) or not all(p.isidentifier() for p in attr.split(".")):
        raise ValueError(f"--model-entry {entry!r}: expected pkg.module:factory")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"--model-entry {entry!r}: cannot import {error.name!r} (run from the folder that holds it, "
                         "or put it on PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--model-entry {entry!r}: module {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--model-entry {entry!r}: {attr!r} is not callable")
    return target


@register_model_builder(ENTRY_POINT_BUILDER, args={"entry": Arg(str), "mean": Arg((list, type(None)), item=STATS.item,
                                                                         max_len=4), "std": Arg((list, type(None)), item=STATS.item, max_len=4)})
def build_entry_point(entry: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """factory() -> an nn.Module taking [0, 1] images, or (module taking normalised images, mean, std),
    which is wrapped in Normalized; `mean`/`std` given here wrap a bare module (or override the factory's)."""
    made = import_entry_point(entry)()
    if isinstance(made, tuple):
        if len(made) != 3 or not isinstance(made[0], nn.Module):
            raise ValueError(f"--model-entry {entry!r}: the factory must return an nn.Module or (module, mean, std)")
        made, mean, std = made[0], mean or made[1], std or made[2]
    if not isinstance(made, nn.Module):
        raise ValueError(f"--model-entry {entry!r}: the factory returned {type(made).__name__}, not an nn.Module")
    return (Normalized(made, mean, std) if mean is not None else made).eval()


def entry_point_spec(entry: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ModelSpec:
    kwargs = {"entry": entry, "mean": list(mean) if mean else None, "std": list(std) if std else None}
    return ModelSpec(ENTRY_POINT_BUILDER, kwargs, module=MODULE)
