"""The subject of a batch command: what it works on, and the embedded world as the default one.

A command takes a `SubjectSpec` (flags or a TOML file, semguard.subject.flags) and calls
`load_subject(spec)`; an empty spec is the embedded world. Every command then sees the same
`Subject`, whatever the assets are:

    subject.model         nn.Module in eval mode taking float32 (B, 3, H, W) in [0, 1] (normalises inside)
    subject.model_spec    how a bundle rebuilds that model (models.factory.ModelSpec)
    subject.layers        the tapped layers, in forward order
    subject.classes       one name per model output
    subject.word_vectors  (C, d) float32, row c for classes[c]; zero rows where `matched` is False
    subject.matched       (C,) bool: the class has a word vector (semantic analyses use these only)
    subject.images        labelled images, loaded on demand (`ImageSet`)
    subject.preprocessing input size, resize and normalisation actually used (`Preprocessing`)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from semguard.models.factory import ModelSpec
from semguard.world_cache import DEFAULT_WORLD_CACHE

SPEC_FIELDS = ("model", "weights", "model_entry", "images", "labels", "vectors")  # the flags and TOML keys


@dataclass(frozen=True)
class SubjectSpec:
    """What to load; every field None is the embedded world (built or reused under `world_cache`).

    model: a torchvision or timm architecture name ("resnet50"); weights: its local weights file.
    model_entry: "pkg.module:factory" returning an nn.Module (imported only because it is named here).
    images: an ImageNet-style folder, a cifar-100-binary folder or file, or a flat folder with a CSV.
    labels: one class per line with comma-separated synonyms, or JSON. vectors: word vectors file or folder.
    input_size / resize: override the architecture's transform (centre crop / short side).
    trust_pickled_vectors: allow gensim's pickled .kv files (never by default).
    phrase_mean: a multi-word class name without a phrase token takes the mean of its words' unit vectors.
    mean / std: override the architecture's normalisation (per channel, on [0, 1] pixels).
    layers: override the tapped layers (graph node names; default: the architecture's preset, else every
        activation-function output: ReLU, ReLU6, GELU, SiLU, ...).
    """

    model: str | None = None
    weights: Path | None = None
    model_entry: str | None = None
    images: Path | None = None
    labels: Path | None = None
    vectors: Path | None = None
    input_size: int | None = None
    resize: int | None = None
    trust_pickled_vectors: bool = False
    phrase_mean: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layers: tuple[str, ...] | None = None
    world_cache: Path = Path(DEFAULT_WORLD_CACHE)
    world_seed: int = 0

    def is_world(self) -> bool:
        return all(getattr(self, name) is None for name in SPEC_FIELDS)

    def default_name(self) -> str | None:
        """A name for the subject's outputs: its architecture's, "world" for the embedded world, else None."""
        return self.model or ("world" if self.is_world() else None)

    def describe(self) -> str:
        """'the embedded world', or the assets the spec names ('model=resnet50, images=...')."""
        return describe_record(self.to_json())

    def to_json(self) -> dict:
        """JSON-able record (what an attack set or report stores about its subject)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


ADDED_DEFAULTS = {"phrase_mean": True}  # SubjectSpec fields newer than some recorded sets


def subject_record(spec: SubjectSpec) -> dict:
    """What an attack set records about its subject: SubjectSpec.to_json() with absolute paths, as JSON
    reads it back (tuples as lists)."""
    record = {k: str(Path(v).resolve()) if isinstance(getattr(spec, k), Path) else v for k, v in spec.to_json().items()}
    return json.loads(json.dumps(record))


_RECORD_TYPES = {"model": str, "weights": str, "model_entry": str, "images": str, "labels": str, "vectors": str,
                 "input_size": int, "resize": int, "trust_pickled_vectors": bool, "mean": list, "std": list,
                 "layers": list, "world_cache": str, "world_seed": int, "phrase_mean": bool}


class UntrustedRecord(ValueError):
    """A subject read from a file names code to run or a pickle to load, and the operator did not pass the flag."""


def subject_spec_from_record(record: dict, where: str = "the recorded subject", *, trust_model_code: bool = False,
                             trust_pickled_vectors: bool = False) -> SubjectSpec:
    """The SubjectSpec a file recorded (subject_record: an attack set's params.json, a study record), back
    from its JSON; ValueError naming `where` and the field.

    A record is data: it never decides to run code. One naming an entry point ("model_entry") or claiming
    trust in pickled vectors is an UntrustedRecord unless the operator passes --trust-model-code /
    --trust-pickled-vectors on this command (the two keyword arguments); the returned spec trusts pickled
    vectors only when the operator does."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_RECORD_TYPES))
    if unknown:
        raise ValueError(f"{where}: keys this semguard does not know: {unknown}")
    for key, value in record.items():
        kind = _RECORD_TYPES[key]
        ok = value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool)))
        if not ok or (kind is list and value is not None and not all(isinstance(v, (str, int, float)) for v in value)):
            raise ValueError(f"{where}: field {key} must be {kind.__name__} or null, got {value!r}")
    if record.get("model_entry") is not None and not trust_model_code:
        raise UntrustedRecord(f"{where}: field model_entry names code to import and run ({record['model_entry']!r}); "
                              "pass --trust-model-code to allow it")
    if record.get("trust_pickled_vectors") and not trust_pickled_vectors:
        raise UntrustedRecord(f"{where}: field trust_pickled_vectors asks to unpickle {record.get('vectors')!r} "
                              "(unpickling runs code); pass --trust-pickled-vectors to allow it")
    path_fields = {"weights", "images", "labels", "vectors", "world_cache"}
    values = {k: (Path(v) if k in path_fields and v is not None else tuple(v) if isinstance(v, list) else v)
              for k, v in record.items()}
    values["trust_pickled_vectors"] = trust_pickled_vectors
    if values.get("world_cache") is None:
        values.pop("world_cache", None)
    if values.get("world_seed") is None:
        values.pop("world_seed", None)
    return SubjectSpec(**values)


def describe_record(record: dict) -> str:
    """'images=..., model=...' for the assets a subject record names, or 'the embedded world'."""
    named = [f"{k}={record[k]}" for k in SPEC_FIELDS if record.get(k) is not None]
    return ", ".join(named) if named else "the embedded world"


def resumed_subject_record(existing: dict | None | bool, spec: SubjectSpec, where: str) -> dict | None:
    """The subject record a resumed run writes into a folder whose params recorded `existing` (None or False:
    a set made before sets recorded their subject, always on the embedded world). A folder made on another
    subject is a ValueError naming what differs. On the embedded world, a folder that records no subject keeps
    recording none, and another world cache alone is no mismatch: the folder keeps the cache it recorded (the
    model fingerprint in its params still tells whether it is the same world)."""
    record = subject_record(spec)
    if isinstance(existing, dict):  # keys added since the set was made hold their defaults there
        existing = {**{k: v for k, v in ADDED_DEFAULTS.items() if k not in existing}, **existing}
    legacy = existing is False or existing is None
    if legacy and spec.is_world():
        return None
    if legacy or (describe_record(existing) == "the embedded world" and not spec.is_world()):
        raise ValueError(f"{where} holds an attack set made on the embedded world; this run names "
                         f"another subject ({describe_record(record)}); use another out dir")
    if spec.is_world() and describe_record(existing) == "the embedded world" and existing.get("world_seed") == spec.world_seed:
        return existing
    if existing != record:
        keys = sorted(set(existing) | set(record))
        diffs = [f"{k}: {existing.get(k)!r} there, {record.get(k)!r} now" for k in keys if existing.get(k) != record.get(k)]
        raise ValueError(f"{where} holds an attack set made on another subject ({'; '.join(diffs)}); "
                         "resume it with the same subject, or use another out dir")
    return record


def recorded_subject(spec: SubjectSpec, recorded: dict | None, where: str = "the recorded subject", *,
                     trust_model_code: bool = False) -> SubjectSpec:
    """The subject a recorded run is analysed on: `spec` (from flags) when it names assets, else the one the
    run recorded (a world cache given explicitly still replaces a recorded world's), else the embedded world
    in spec's cache (runs older than the record). The record is read by subject_spec_from_record: it runs
    code only under the operator's trust flags (`trust_model_code`, spec.trust_pickled_vectors)."""
    if not spec.is_world() or recorded is None:
        return spec
    found = subject_spec_from_record(recorded, where, trust_model_code=trust_model_code,
                                     trust_pickled_vectors=spec.trust_pickled_vectors)
    moved = found.is_world() and Path(spec.world_cache) != Path(DEFAULT_WORLD_CACHE)
    return dataclasses.replace(found, world_cache=Path(spec.world_cache)) if moved else found


class ImageSet(Dataset):
    """Labelled images of one subject, read on demand (a real set need not fit in memory): a torch Dataset.

    labels: (N,) int64, indices into Subject.classes. load(indices) -> float32 (n, 3, H, W) in [0, 1], at
    the model's input size, in the order of `indices` (subclasses implement it, decoding a batch at once).
    skipped: files that could not be read (reported by the loader, never in `labels`). As a Dataset, item i
    is (image (3, H, W), label); a DataLoader fetches a batch through `__getitems__`, i.e. one `load`, so
    `torch.utils.data.Subset(images, indices)` and DataLoader workers serve any caller.
    """

    labels: np.ndarray
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(np.array([index]))[0], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        return list(zip(self.load(np.asarray(indices, np.int64)), self.labels[indices].tolist()))


class ArrayImages(ImageSet):
    """An ImageSet over images already in memory: uint8 (N, H, W, 3) (the world's format)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 (N, H, W, 3) with one label each, got {images.dtype} "
                             f"{images.shape} and {np.shape(labels)} labels")
        self.images, self.labels, self.skipped = images, np.asarray(labels, np.int64), ()

    def load(self, indices: np.ndarray) -> torch.Tensor:
        from semguard.models.inputs import as_model_input

        return as_model_input(self.images[np.asarray(indices, np.int64)])


class Preprocessing(NamedTuple):
    """How a subject's images reach its model, as every report's header states it (subject.header)."""

    input_size: int  # side of the square image the model is given
    resize: int | None  # short side before the centre crop; None: the images are taken as stored
    interpolation: str | None  # the resize's PIL filter (None without a resize)
    mean: tuple[float, ...] | None  # per-channel normalisation inside the model; None: none semguard knows of
    std: tuple[float, ...] | None
    decided_by: str  # where input_size / resize came from, in words ("--input-size", "resnet50's weights", ...)


def model_normalisation(model: nn.Module) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(mean, std) a model normalises its [0, 1] input with (models.normalize.Normalized, WorldNet's
    buffers), or (None, None) when it holds none."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        return None, None
    return tuple(round(float(v), 8) for v in mean.flatten()), tuple(round(float(v), 8) for v in std.flatten())


class Subject(NamedTuple):
    name: str  # "worldnet", "resnet50", ... (bundle.json's model_name)
    model: nn.Module
    model_spec: ModelSpec
    layers: list[str]
    classes: list[str]
    word_vectors: np.ndarray
    matched: np.ndarray
    images: ImageSet
    spec: SubjectSpec
    source_weights: str | None = None  # the weights file the model came from (recorded in bundles)
    preprocessing: Preprocessing | None = None  # None: a subject built by hand (tests), not recorded


def world_subject(spec: SubjectSpec = SubjectSpec(), progress: bool = True, inputs=None) -> Subject:
    """The embedded world (its test split) through the loaders real assets use. inputs: a
    world.inputs.WorldInputs already loaded (the quickstart's, whose settings a spec cannot name)."""
    from semguard.models.presets import preset_layers
    from semguard.models.worldnet import worldnet_spec

    if inputs is None:
        from semguard.world.build import WorldSettings
        from semguard.world.inputs import load_world_inputs

        inputs = load_world_inputs(WorldSettings(seed=spec.world_seed), spec.world_cache, progress=progress)
    w = inputs.world
    how = Preprocessing(int(w.test_images.shape[1]), None, None, *model_normalisation(inputs.model),
                        "the embedded world's images, as stored")
    return Subject(
        "worldnet", inputs.model, worldnet_spec(inputs.model), list(spec.layers or preset_layers("worldnet")), list(w.classes),
        inputs.word_vectors, np.ones(len(w.classes), bool), ArrayImages(w.test_images, w.test_labels), spec,
        str(w.model_path), how,
    )


def load_subject(spec: SubjectSpec = SubjectSpec(), progress: bool = True) -> Subject:
    """The subject a spec names: the embedded world when it names no asset."""
    if spec.is_world():
        return world_subject(spec, progress)
    from semguard.subject.assets import load_asset_subject  # the real-asset loaders

    return load_asset_subject(spec, progress)
