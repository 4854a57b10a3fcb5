"""A subject from real assets: the model, its transform, the class list, the images and the word vectors.

    subject = load_asset_subject(SubjectSpec(model="resnet50", weights=Path("resnet50-0676ba61.pth"),
                                             images=Path("val"), labels=Path("LOC_synset_mapping.txt"),
                                             vectors=Path("GoogleNews-vectors-negative300.bin")))

Models (the model is always wrapped so that it takes [0, 1] images; eval mode, CPU):

- a torchvision architecture + `weights` (read weights_only, or safetensors): Normalized with the
  weights' mean/std; the transform is the one torchvision ships with that architecture's weights
  (ResNet-50/VGG-16: crop 224 of 256, Inception-v3: 299 of 342, bilinear), the weight set whose
  file name the weights file has when there is one (resnet50-11ad3fa6.pth: V2's 232);
- `timm/<arch>` (or a timm name torchvision lacks; `pip install 'semguard[timm]'`): built offline,
  weights from the file, transform and mean/std from timm's pretrained config (crop_pct, bicubic);
- `model_entry = "pkg.module:factory"`: the factory's module (or (module, mean, std)), `weights`
  optional; without input_size / resize, images that all share one size are taken as they are
  (32 x 32 CIFAR photos stay 32 x 32), else 224 of 256;
- `worldnet` + a WorldNet safetensors file (`semguard world export` writes one): the embedded
  world's architecture, 32 x 32 images taken as they are.

`input_size` / `resize` / `mean` / `std` override the conventions (`input_size` alone keeps the
convention's crop ratio). Layers: `layers` (--layers), else the architecture's preset (resnet50,
inception_v3, vgg16, worldnet), else every activation-function output of the model (ReLU, ReLU6,
LeakyReLU, GELU, SiLU, Hardswish, Mish, ...: modules and functional calls), the count printed.
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from semguard.models.factory import ModelSpec
from semguard.subject.core import (
    ArrayImages,
    ImageSet,
    Preprocessing,
    Subject,
    SubjectSpec,
    model_normalisation,
    world_subject,
)
from semguard.subject.images import ImageSource, Transform, scan_images
from semguard.subject.labels import ClassList, read_labels

MAX_LISTED = 20  # unmatched class names shown in the vectors report


@dataclass(frozen=True)
class Convention:
    """An architecture's evaluation transform and normalisation (what its weights were trained with)."""

    size: int
    resize: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # ImageNet (torchvision's and timm's default)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


DEFAULT_CONVENTION = Convention(224, 256)  # torchvision's ImageNet evaluation transform


@dataclass(frozen=True)
class _Model:
    name: str  # Subject.name (bundle.json's model_name)
    arch: str | None  # the architecture name presets are looked up by
    module: nn.Module  # takes [0, 1] images
    spec: ModelSpec
    convention: Convention
    layers: list[str] | None = None  # the default taps when the architecture decides them (WorldNet's config)


# --------------------------------------------------------------------------- entry


def load_asset_subject(spec: SubjectSpec, progress: bool = True) -> Subject:
    """The subject `spec` names (module docstring); ValueError naming the flag and file on bad input."""
    _check_complete(spec)
    classes = read_labels(spec.labels) if spec.labels is not None else None
    # With a labels file the class count is known: a wrong weights file fails before the images are checked.
    loaded = _load_model(spec, len(classes.synonyms)) if classes is not None else None
    source = scan_images(spec.images, classes, progress)
    classes = source.classes
    loaded = loaded or _load_model(spec, len(classes.synonyms))
    conv = loaded.convention
    size, resize, decided_by = _input_size(spec, loaded, source.common_size)
    if resize < size:
        raise ValueError(f"--input-size {size}, --resize {resize}: the short side (resize) must be >= the crop "
                         "(input size)")
    transform = Transform(size, resize, conv.interpolation)
    model = loaded.module.eval()
    _check_outputs(model, size, len(classes.synonyms), spec)
    layers = _layers(spec, loaded)
    word_vectors, matched = _class_vectors(spec, classes, progress)
    how = Preprocessing(size, resize, conv.interpolation, *model_normalisation(model), decided_by)
    return Subject(loaded.name, model, loaded.spec, layers, classes.names, word_vectors, matched,
                   source.image_set(transform), spec, str(spec.weights) if spec.weights is not None else None, how)


def _input_size(spec: SubjectSpec, loaded: _Model, common: tuple[int, int] | None) -> tuple[int, int, str]:
    """(input_size, resize, where they came from). An entry-point model has no convention of its own: with
    neither given it takes images that all share one size as they are, else ImageNet's, said on stderr."""
    conv = loaded.convention
    if spec.input_size is not None:
        resize = spec.resize or math.floor(spec.input_size * conv.resize / conv.size)
        return spec.input_size, resize, "input_size" + (", resize" if spec.resize else f" (resize keeps "
                                                         f"{loaded.name}'s ratio {conv.resize}/{conv.size})")
    if spec.resize is not None:
        return conv.size, spec.resize, f"resize; input_size {loaded.name}'s"
    if spec.model_entry is None:
        return conv.size, conv.resize, f"{loaded.name}'s convention"
    if common is not None:
        side = min(common)
        decided_by = f"the images' common size {common[0]} x {common[1]} (no resize)"
    else:
        side, decided_by = None, f"ImageNet's {conv.size} of {conv.resize}: the images differ in size"
    print(f"--model-entry {spec.model_entry}: no input_size given; taken at {decided_by}"
          f"{'' if side else ' (set input_size / resize)'}", file=sys.stderr)
    return (side, side, decided_by) if side else (conv.size, conv.resize, decided_by)


class SubjectData(NamedTuple):
    """A subject's labelled images and word vectors without its model (for a caller bringing its own network,
    e.g. `semguard train` checkpoints): the embedded world's, or those the spec names."""

    labels: np.ndarray  # (N,) class ids
    classes: list[str]
    word_vectors: np.ndarray  # (C, d) float32, zero rows where not matched
    matched: np.ndarray  # (C,) bool
    # (side, indices the caller will read, what reads them) -> an ImageSet of the images as they are, no
    # resampling; a ValueError naming the file when one of those images is not side x side
    images_as_they_are: Callable[[int, np.ndarray, str], ImageSet]


def load_subject_data(spec: SubjectSpec, progress: bool = True) -> SubjectData:
    """--images, --labels (optional) and --vectors of `spec`, as load_asset_subject reads them; no model.
    A spec naming no asset is the embedded world (its test split, 32 x 32)."""
    if spec.is_world():
        world = world_subject(spec, progress)
        return SubjectData(world.images.labels, world.classes, world.word_vectors, world.matched,
                           lambda side, indices, what: _checked_arrays(world.images, side, what))
    for flag, value in (("--images", spec.images), ("--vectors", spec.vectors)):
        if value is None:
            raise ValueError(f"{flag}: needed with the other subject flags (only the embedded world brings its own)")
    source = scan_images(spec.images, read_labels(spec.labels) if spec.labels is not None else None, progress)
    word_vectors, matched = _class_vectors(spec, source.classes, progress)
    return SubjectData(source.labels, source.classes.names, word_vectors, matched,
                       lambda side, indices, what: _native_files(source, side, indices, what))


def _checked_arrays(images: ArrayImages, side: int, what: str) -> ArrayImages:
    if images.images.shape[1:3] != (side, side):
        raise ValueError(f"{what} take {side} x {side} images, but the embedded world's are "
                         f"{images.images.shape[1]} x {images.images.shape[2]}")
    return images


def _native_files(source: ImageSource, side: int, indices: np.ndarray, what: str) -> ImageSet:
    """The scanned images at side x side as they are: every image used must be that size (CIFAR's are 32 x 32)."""
    if source.kind != "cifar":
        from PIL import Image

        for i in np.unique(indices):
            with Image.open(source.items[i]) as img:  # the header only
                if img.size != (side, side):
                    raise ValueError(f"--images {source.path}: {what} take {side} x {side} images as they are (no "
                                     f"resampling), but {source.items[i]} is {img.size[0]} x {img.size[1]}")
    return source.image_set(Transform(side, side))


def load_subject_model(spec: SubjectSpec, n_classes: int) -> nn.Module:
    """The model `spec` names with its --weights loaded (eval mode, taking [0, 1] images), as
    load_asset_subject builds it: to swap weights under a loaded subject (one model per checkpoint)."""
    _check_complete(spec)
    return _load_model(spec, n_classes).module.eval()


def _check_complete(spec: SubjectSpec) -> None:
    if spec.model is None and spec.model_entry is None:
        raise ValueError("--model or --model-entry: a subject needs a model (or give no subject flags at all "
                         "for the embedded world)")
    if spec.model is not None and spec.model_entry is not None:
        raise ValueError(f"--model {spec.model!r} and --model-entry {spec.model_entry!r}: give one of them")
    if spec.model is not None and spec.weights is None:
        raise ValueError(f"--weights: --model {spec.model} needs a local weights file (semguard never downloads)")
    if spec.images is None:
        raise ValueError("--images: a subject needs labelled images (an ImageNet-style folder, "
                         "a CIFAR-100 binary, or a CSV of file,label)")
    if spec.vectors is None:
        raise ValueError("--vectors: a subject needs word vectors (word2vec binary/text, GloVe, fastText .vec, "
                         "or a native folder); only the embedded world brings its own")
    if spec.weights is not None and not Path(spec.weights).is_file():
        raise ValueError(f"--weights {spec.weights}: no such file")


# --------------------------------------------------------------------------- models


def _load_model(spec: SubjectSpec, n_classes: int) -> _Model:
    if spec.model_entry is not None:
        return _entry_point_model(spec, n_classes)
    name = spec.model
    if name == "worldnet":
        return _worldnet_model(spec)
    import torchvision

    if name.startswith("timm/"):
        return _timm_model(spec, name[len("timm/"):], n_classes)
    if name in torchvision.models.list_models(module=torchvision.models):
        return _torchvision_model(spec, name, n_classes)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return _timm_model(spec, name, n_classes)
    import difflib

    close = difflib.get_close_matches(name, torchvision.models.list_models(module=torchvision.models), n=5)
    extra = "" if timm is not None else "; timm architectures need `pip install 'semguard[timm]'`"
    raise ValueError(f"--model {name!r}: not a torchvision{'' if timm is None else ' or timm'} classification "
                     f"architecture (close torchvision names: {close}){extra}")


def torchvision_convention(arch: str, weights: Path | None = None) -> Convention:
    """The transform torchvision ships with `arch`'s weights: the weight set whose file name `weights`
    has, else the first (IMAGENET1K_V1: the paper's era); ImageNet 224/256 for an architecture without any."""
    import torchvision

    try:
        sets = list(torchvision.models.get_model_weights(arch))
    except (ValueError, KeyError):
        return DEFAULT_CONVENTION
    if not sets:
        return DEFAULT_CONVENTION
    named = [w for w in sets if weights is not None and w.url.rsplit("/", 1)[-1] == Path(weights).name]
    t = (named or sets)[0].transforms()
    return Convention(int(t.crop_size[0]), int(t.resize_size[0]), t.interpolation.value,
                      tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std))


def _built(spec: SubjectSpec, model_spec: ModelSpec, n_classes: int) -> nn.Module:
    """The factory's model for `model_spec` with --weights loaded (a wrong class count named with the labels file)."""
    from semguard.models.factory import OtherClassCount, create_model

    try:
        return create_model(model_spec, weights=spec.weights, trust_model_code=spec.model_entry is not None,
                            what="--weights")
    except OtherClassCount as error:
        raise ValueError(f"{error.found}, but {_class_source(spec)} has {n_classes} classes") from None


def _class_source(spec: SubjectSpec) -> str:
    return f"the labels file {spec.labels}" if spec.labels is not None else f"the image source {spec.images}"


def _torchvision_model(spec: SubjectSpec, arch: str, n_classes: int) -> _Model:
    from semguard.models.normalize import torchvision_spec

    conv = torchvision_convention(arch, spec.weights)
    model_spec = torchvision_spec(arch, n_classes, spec.mean or conv.mean, spec.std or conv.std)
    return _Model(arch, arch, _built(spec, model_spec, n_classes), model_spec, conv)


def _timm_model(spec: SubjectSpec, arch: str, n_classes: int) -> _Model:
    try:
        import timm
        import timm.data
    except ImportError:
        raise ValueError(f"--model timm/{arch}: timm is not installed; `pip install 'semguard[timm]'`") from None
    from semguard.models.normalize import timm_spec

    if not timm.is_model(arch):
        raise ValueError(f"--model timm/{arch}: timm knows no architecture {arch!r} "
                         f"(close: {timm.list_models(f'*{arch[:6]}*')[:5]})")
    # offline: the pretrained config (transform, mean/std) is in timm's registry (timm's defaults without one)
    pretrained = timm.models.get_pretrained_cfg(arch)
    cfg = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained is not None
                                        else {"input_size": (3, 224, 224)})
    size = int(cfg["input_size"][-1])
    interpolation = cfg.get("interpolation", "bicubic")
    conv = Convention(size, math.floor(size / cfg.get("crop_pct", 0.875)),
                      interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
                      tuple(cfg["mean"]), tuple(cfg["std"]))
    model_spec = timm_spec(arch, n_classes, spec.mean or conv.mean, spec.std or conv.std)
    return _Model(f"timm/{arch}", arch, _built(spec, model_spec, n_classes), model_spec, conv)


def _entry_point_model(spec: SubjectSpec, n_classes: int) -> _Model:
    from semguard.models.normalize import entry_point_spec

    model_spec = entry_point_spec(spec.model_entry, spec.mean, spec.std)
    return _Model(spec.model_entry, None, _built(spec, model_spec, n_classes), model_spec, DEFAULT_CONVENTION)


def _worldnet_model(spec: SubjectSpec) -> _Model:
    from semguard.models.worldnet import load_world_model, worldnet_layers, worldnet_spec

    try:
        model = load_world_model(spec.weights)
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(f"--weights {spec.weights}: not a WorldNet safetensors file "
                         f"(`semguard world export` writes one): {error}") from None
    if spec.mean is not None or spec.std is not None:
        raise ValueError("mean, std: WorldNet normalises inside with its own statistics; leave them out")
    layers = [info.name for info in worldnet_layers(model.config)]  # the "worldnet" preset, for this file's config
    return _Model("worldnet", "worldnet", model, worldnet_spec(model), Convention(32, 32), layers)


def _check_outputs(model: nn.Module, size: int, n_classes: int, spec: SubjectSpec) -> None:
    """One forward pass on a blank image: the model must give (1, n_classes) logits."""
    what = (f"--model-entry {spec.model_entry}" if spec.model_entry
            else f"--model {spec.model} (--weights {spec.weights})")
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, size, size))
    except RuntimeError as error:
        raise ValueError(f"{what}: fails on a (1, 3, {size}, {size}) image: {str(error).splitlines()[0]} "
                         "(set input_size / resize)") from None
    if not isinstance(out, torch.Tensor) or out.shape != (1, n_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what}: gives outputs {got} per image, but {_class_source(spec)} has {n_classes} classes")


def _layers(spec: SubjectSpec, loaded: _Model) -> list[str]:
    """--layers / TOML layers, else the architecture's preset, else every activation-function output
    (ReLU, ReLU6, GELU, SiLU, Hardswish, ...; models.graph.activation_nodes); the count is printed."""
    from semguard.detector.layers import LayerTap
    from semguard.models.blocks import BLOCKS
    from semguard.models.factory import inner_network
    from semguard.models.graph import activation_nodes
    from semguard.models.presets import known_presets, preset_layers

    if spec.layers is not None and list(spec.layers) == [BLOCKS]:
        return _block_layers(loaded)
    if spec.layers is not None:
        LayerTap(loaded.module, list(spec.layers))  # every name a node of the graph, else a ValueError naming it
        return list(spec.layers)
    if loaded.layers is not None:
        return list(loaded.layers)
    if loaded.arch is not None and loaded.arch in known_presets() and not loaded.name.startswith("timm/"):
        return preset_layers(loaded.arch)
    found = activation_nodes(inner_network(loaded.module))
    if not found:
        raise ValueError(f"layers: {loaded.name} has no activation-function outputs (ReLU, ReLU6, GELU, SiLU, "
                         "Hardswish, ...) to tap by default; name the graph nodes to tap with --layers a,b,c or "
                         "`layers = [...]` in the subject TOML (models.graph.graph_node_names(model))")
    kinds = ", ".join(f"{k} {n}" for k, n in Counter(found.values()).most_common())
    # like the vectors report, printed with --quiet too: it says what the run measures
    print(f"layers: tapping {len(found)} activation outputs of {loaded.name} ({kinds}), {next(iter(found))} .. "
          f"{list(found)[-1]}; choose others with --layers a,b,c or `layers = [...]` in the subject TOML", file=sys.stderr)
    return list(found)


def _block_layers(loaded: _Model) -> list[str]:
    """`--layers blocks`: each block's output (models.blocks), the count printed as the default taps' is."""
    from semguard.models.blocks import block_modules
    from semguard.models.factory import inner_network

    found = block_modules(inner_network(loaded.module))
    print(f"layers: tapping the outputs of {len(found)} blocks of {loaded.name}, {found[0]} .. {found[-1]}",
          file=sys.stderr)
    return found


# --------------------------------------------------------------------------- vectors


def _class_vectors(spec: SubjectSpec, classes: ClassList, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(C, d) float32 word vectors (zero rows for classes without one) and (C,) bool matched."""
    from semguard.detector.words import match_labels
    from semguard.subject.vectors import load_subject_vectors, vectors_cache_dir

    kv = load_subject_vectors(spec.vectors, vectors_cache_dir(spec.world_cache),
                              trust_pickled=spec.trust_pickled_vectors, progress=progress)
    match = match_labels(kv, classes.synonyms, phrase_mean=spec.phrase_mean)
    n = len(classes.synonyms)
    vectors = np.zeros((n, kv.vector_size), np.float32)  # (C, d)
    vectors[match.matched] = match.vectors
    matched = np.zeros(n, bool)
    matched[match.matched] = True
    if not match.matched:
        raise ValueError(f"--vectors {spec.vectors}: none of the {n} classes has a word vector (first tried: "
                         f"{classes.synonyms[0]!r}); is it the right vectors file and labels file?")
    counts = match.counts()
    rules = (f"{counts['word']} by a word, {counts['phrase']} by a phrase token, {counts['mean']} by the mean of "
             f"their words" + ("" if spec.phrase_mean else " (off: --no-phrase-mean)"))
    text = f"{len(match.matched)} of {n} classes have a word vector ({rules})"
    if match.unmatched:
        listed = ", ".join(classes.names[i] for i in match.unmatched[:MAX_LISTED])
        text += f"; unmatched left out of the semantic analyses: {listed}"
        text += " ..." if len(match.unmatched) > MAX_LISTED else ""
    print(f"--vectors {spec.vectors}: {text}", file=sys.stderr)
    return vectors, matched
