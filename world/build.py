"""Build (or reuse) the embedded world: images, corpus + SkipGram vectors, trained WorldNet.

Everything is cached under cache_dir/<hash of the settings>/, one file per stage, each
written atomically (temp file + rename), so a rebuild with the same settings reuses what
exists and an interrupted build resumes at the first missing stage.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from semguard.files import atomic_path, write_json_atomic
from semguard.models.worldnet import load_world_model, save_worldnet
from semguard.world import shipped
from semguard.world.attributes import ConceptAttributes, concept_attributes
from semguard.world.corpus import generate_corpus, train_skipgram
from semguard.world.render import render
from semguard.world.taxonomy import SUPERCLASS_OF, select_classes
from semguard.world.train import TrainSettings, accuracy, train_worldnet
from semguard.world_cache import DEFAULT_WORLD_CACHE

# Bump when the renderer, corpus or training changes what a given setting produces,
# so stale caches are not reused.
WORLD_VERSION = 2


@dataclass(frozen=True)
class WorldSettings:
    seed: int = 0
    n_classes: int = 100  # a multiple of 5: whole CIFAR-100 superclasses, first ones first
    train_per_class: int = 400  # images per class to train WorldNet on (300 gave 0.80 test accuracy, too close)
    test_per_class: int = 50  # held-out images per class (2 vs 2 image sets come from these)
    image_size: int = 32
    epochs: int = 10  # WorldNet training epochs; ~2.5 min on one CPU core at the defaults
    batch_size: int = 128
    lr: float = 0.1
    corpus_sentences: int = 60_000  # ~460k tokens: SkipGram trains in a few seconds
    vector_size: int = 64
    w2v_epochs: int = 10
    # Fixed, so float reductions (and results) do not depend on the machine's core count. One thread:
    # these small convs gain little from two, and on a shared CPU OpenMP's spin-waiting made two
    # threads 50x slower (0.4 vs 22 steps/s measured while other jobs ran).
    torch_threads: int = 1

    def key(self) -> str:
        blob = json.dumps({"version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class World:
    settings: WorldSettings
    root: Path
    classes: list[str]  # class names, label order
    superclasses: list[str]  # superclass of each class (same order)
    attributes: list[ConceptAttributes]
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray  # (M, H, W, 3) uint8
    test_labels: np.ndarray  # (M,) int64
    vectors_path: Path  # word2vec binary; load with detector.words.load_vectors
    model_path: Path  # WorldNet safetensors; load with load_world_model
    test_accuracy: float
    timings_s: dict[str, float] = field(default_factory=dict)  # seconds per stage in this call (~0 if reused)

    def image_sets(self, n_sets: int = 5) -> np.ndarray:
        """(n_sets, n_classes, H, W, 3) uint8: set k holds the k-th test image of every class."""
        if not 1 <= n_sets <= self.settings.test_per_class:
            raise ValueError(f"n_sets must be in [1, {self.settings.test_per_class}], got {n_sets}")
        idx = [np.flatnonzero(self.test_labels == c)[:n_sets] for c in range(len(self.classes))]
        return self.test_images[np.stack(idx, axis=1)]  # (n_sets, n_classes, ...)


def _save_images(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _build_images(s: WorldSettings, attrs: list[ConceptAttributes], path: Path) -> None:
    n = len(attrs)
    # Independent streams per split, so changing one split's size leaves the other unchanged.
    y_train = np.tile(np.arange(n, dtype=np.int64), s.train_per_class)
    y_test = np.tile(np.arange(n, dtype=np.int64), s.test_per_class)
    x_train = render(attrs, y_train, np.random.default_rng([s.seed, 1]), s.image_size)
    x_test = render(attrs, y_test, np.random.default_rng([s.seed, 2]), s.image_size)
    _save_images(path, train_images=x_train, train_labels=y_train, test_images=x_test, test_labels=y_test)


def _build_vectors(s: WorldSettings, attrs: list[ConceptAttributes], path: Path) -> None:
    sentences = generate_corpus(attrs, s.corpus_sentences, np.random.default_rng([s.seed, 3]))
    with atomic_path(path) as tmp:
        train_skipgram(sentences, tmp, s.vector_size, s.w2v_epochs, s.seed)


def build_world(settings: WorldSettings = WorldSettings(), cache_dir: str | Path = DEFAULT_WORLD_CACHE,
                progress: bool = True, from_scratch: bool = False) -> World:
    """Build the world for these settings under cache_dir, or load it if it is already there.

    The default world's trained files ship with semguard (world.shipped) and are copied instead
    of trained, unless `from_scratch`.
    """
    classes = select_classes(settings.n_classes)
    attrs = [concept_attributes(c) for c in classes]
    root = Path(cache_dir) / settings.key()
    root.mkdir(parents=True, exist_ok=True)
    images_path, vectors_path = root / "images.npz", root / "vectors.bin"
    model_path, meta_path = root / "worldnet.safetensors", root / "meta.json"
    timings: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads)
    try:
        use_shipped = not from_scratch and shipped.shipped_for(settings.key())
        if from_scratch:  # a cached world may hold copies of the shipped files: train them again
            for path in (vectors_path, model_path, meta_path):
                path.unlink(missing_ok=True)
        for stage, path, build in (("render", images_path, _build_images), ("corpus_word2vec", vectors_path, _build_vectors)):
            t0 = time.perf_counter()
            if not path.exists() and use_shipped and path.name in shipped.FILES:
                shipped.copy_shipped(path.name, path)
            elif not path.exists():
                build(settings, attrs, path)
            timings[stage] = time.perf_counter() - t0
        with np.load(images_path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        t0 = time.perf_counter()
        if not model_path.exists() or not meta_path.exists():
            if use_shipped:
                shipped.copy_shipped(model_path.name, model_path)
                model = load_world_model(model_path)
            else:
                train = TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr)
                model = train_worldnet(data["train_images"], data["train_labels"], len(classes), train,
                                       settings.seed, progress)
                save_worldnet(model, model_path)
            acc = accuracy(model, data["test_images"], data["test_labels"])
            meta = {"settings": asdict(settings), "classes": classes, "test_accuracy": acc}
            write_json_atomic(meta_path, meta, indent=1)
        timings["train_worldnet"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    meta = json.loads(meta_path.read_text())
    return World(settings, root, classes, [SUPERCLASS_OF[c] for c in classes], attrs,
                 data["train_images"], data["train_labels"], data["test_images"], data["test_labels"],
                 vectors_path, model_path, float(meta["test_accuracy"]), timings)
