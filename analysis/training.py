"""`semguard analyze training`: 2 vs 2 of every tapped layer at every checkpoint of a training run
(paper section 5, Figures 2-3), beside the permuted-label control when given.

Per checkpoint: held-out image sets through the checkpoint's network, 2 vs 2 per layer against the
word vectors, permutation tests, BHY across that checkpoint's layers (analysis.two_vs_two). Each
checkpoint's result is written to `out/<run>/<checkpoint stem>.json` atomically as soon as it is done,
so a killed analysis resumes at the first checkpoint without one. Then `training.json`, the layer x
epoch heatmap (`training_heatmap.png`, Figure 2) and block averages over epochs (`training_by_block.png`,
Figure 3).

What the checkpoints are analysed on (`analyze_training_subject`):

- no subject flag: `semguard train` checkpoints on the embedded world's test images and word vectors;
- --images/--labels/--vectors only: `semguard train` checkpoints (FractalNet, 32 x 32 inputs) on the
  subject's images (a cifar-100-binary folder: its test.bin) and vectors;
- --model/--model-entry too: any folder of weights files of that model (`epoch_5.pt`,
  `epoch-0005.safetensors`, read weights_only / safetensors), each loaded as the subject's weights,
  tapped at the subject's layers.

Classes without a word vector are not concepts; nor are classes with fewer images than image sets.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from semguard.analysis.two_vs_two import LayerScores, image_set_indices, two_vs_two_by_layer
from semguard.detector.layers import LayerTap
from semguard.detector.significance import bhy
from semguard.files import sha256_file, write_json_atomic
from semguard.models.fractalnet import fractalnet_layers, load_fractalnet
from semguard.subject.core import ArrayImages, ImageSet, SubjectSpec, subject_record

FRACTALNET_SIZE = 32  # `semguard train` trains on 32 x 32 images (the world's, CIFAR-100's), taken as they are
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # what load_state_dict_file reads without unpickling
# Subject keys that describe a model's input or weights: FractalNet checkpoints bring their own.
NOT_FOR_FRACTALNET = ("weights", "input_size", "resize", "mean", "std", "layers")


@dataclass(frozen=True)
class TrainingAnalysisConfig:
    image_sets: int = 5  # paper 3.2
    n_permutations: int = 200  # paper 3.5: 1000; 200 per layer and checkpoint keeps a run in minutes
    seed: int = 0
    alpha: float = 0.05  # BHY level for "significant"
    progress: bool = False
    batch_size: int = 100  # images per forward pass: an image set of the world's 100 concepts in one pass
    # Activations held at once (float32, every image set): layers are tapped in passes that fit. The world's
    # FractalNet needs ~0.1 GiB (one pass); resnet18 at 224 x 224 ~9 MB per image, 4.6 GB for 100 concepts x 5.
    memory_budget_gib: float = 4.0


class Network(NamedTuple):
    """One checkpoint's network as the analysis taps it."""

    model: nn.Module  # float32 (B, 3, H, W) in [0, 1] -> logits
    layers: list[str]  # tapped nodes, depth order
    blocks: list[str]  # block of each layer


class Probe(NamedTuple):
    """What every checkpoint is analysed on, and how a checkpoint file becomes a network."""

    images: ImageSet  # held-out images, loaded on demand
    sets: np.ndarray  # (S, w) image indices: row s is image set s, column j concept j
    vectors: np.ndarray  # (w, d) word vectors, row j concept j
    load_network: Callable[[Path], Network]
    key: dict  # what results depend on besides checkpoint and settings ({} for images given as arrays)
    concepts: list[str] | None = None  # class names of the concepts, when known
    subject: dict | None = None  # the subject record (None: images given as arrays)


# --------------------------------------------------------------------------- checkpoint files


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint's name gives: the last integer of its stem (epoch-0005, epoch_5, ckpt5)."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def checkpoint_files(run_dir: str | Path, own_model: bool = False) -> list[Path]:
    """The checkpoints in epoch order: `semguard train` checkpoints (epoch-NNNN.safetensors) of a run
    directory or its checkpoints/, or with `own_model` every weights file of the folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"checkpoints: no such folder {run_dir}")
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    if own_model:
        files = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES]
        if not files:
            raise ValueError(f"checkpoints {folder}: no weights files ({', '.join(WEIGHT_SUFFIXES)})")
    else:
        files = list(folder.glob("epoch-*.safetensors"))
        if not files:
            raise ValueError(f"checkpoints: no epoch-NNNN.safetensors in {folder} (for your own model's "
                             "checkpoints give --model or --model-entry with --images and --vectors)")
    numbered = sorted((e, f) for f in files if (e := checkpoint_epoch(f)) is not None)
    if not numbered:
        raise ValueError(f"checkpoints {folder}: no file name holds an epoch number (the last integer of the "
                         f"name, as in epoch-0005.safetensors or epoch_5.pt): {sorted(f.name for f in files)[:5]}")
    for (e, a), (e2, b) in zip(numbered, numbered[1:]):
        if e == e2:
            raise ValueError(f"checkpoints {folder}: {a.name} and {b.name} are both epoch {e} (the last integer "
                             "of the name); keep one file per epoch")
    unnumbered = sorted(f.name for f in files if checkpoint_epoch(f) is None)
    if unnumbered:
        print(f"checkpoints {folder}: left out (no epoch number in the name): {unnumbered}", file=sys.stderr)
    return [f for _, f in numbered]


def fractalnet_network(path: Path) -> Network:
    """A `semguard train` checkpoint: its FractalNet, every ReLU and join, blocks block1..blockB."""
    from safetensors import SafetensorError

    try:
        model = load_fractalnet(path)
    except (ValueError, SafetensorError) as error:
        raise ValueError(f"{error} (for your own model's checkpoints give --model or --model-entry with --images "
                         "and --vectors)") from None
    infos = fractalnet_layers(model.config)
    return Network(model, [i.name for i in infos], [i.block for i in infos])


# --------------------------------------------------------------------------- one checkpoint


def set_activations(tap: LayerTap, images: ImageSet, idx: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """layer -> (w, k) activations of the images `idx` (one image set), `batch_size` images per forward."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            acts = tap(images.load(idx[start:start + batch_size])).acts
            parts.append({k: v.numpy() for k, v in acts.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def layer_passes(tap: LayerTap, probe: Probe, budget_gib: float) -> list[list[str]]:
    """The tapped layers in groups whose activations for every image set fit `budget_gib` (a layer alone over
    it is a group of its own): one group, all layers, for the world's FractalNet."""
    from semguard.analysis.subject_two_vs_two import plan_passes

    with torch.no_grad():
        sizes = {name: a.shape[1] for name, a in tap(probe.images.load(probe.sets[0, :1])).acts.items()}
    return [list(p.layers) for p in plan_passes(sizes, probe.sets.size, budget_gib * 2**30)]


def checkpoint_scores(path: Path, probe: Probe, config: TrainingAnalysisConfig) -> dict:
    """2 vs 2 per layer of one checkpoint: LayerScores as JSON plus blocks, epoch and seconds taken.

    Each layer's accuracy and permutation p-value do not depend on the others (same seed per layer), so
    the layers are scored pass by pass and BHY is applied once across all of them.
    """
    start = time.perf_counter()
    net = probe.load_network(path)
    tap = LayerTap(net.model, net.layers)
    parts = []
    for layers in layer_passes(tap, probe, config.memory_budget_gib):
        pass_tap = tap if layers == net.layers else LayerTap(net.model, layers)
        acts = [set_activations(pass_tap, probe.images, idx, config.batch_size) for idx in probe.sets]
        parts.append(two_vs_two_by_layer(acts, probe.vectors, config.n_permutations, config.seed,
                                         progress=config.progress))
    p_value = np.concatenate([s.p_value for s in parts])
    scores = LayerScores([n for s in parts for n in s.layers], np.concatenate([s.accuracy for s in parts]),
                         np.concatenate([s.spread for s in parts]), p_value, bhy(p_value))
    return {**scores.as_json(), "blocks": net.blocks, "epoch": checkpoint_epoch(path),
            "seconds": round(time.perf_counter() - start, 2)}


def analyze_run(run_dir: str | Path, files: list[Path], out: Path, probe: Probe,
                config: TrainingAnalysisConfig) -> dict:
    """The checkpoints `files` of one run (reusing results already in `out`); {epochs, layers, blocks,
    accuracy (E, L), ...}."""
    results = []
    for path in files:
        target = out / f"{path.stem}.json"
        # a result is reused only for the same checkpoint bytes, settings and subject (another run's file is redone)
        key = {"checkpoint_sha256": sha256_file(path), "image_sets": config.image_sets,
               "n_permutations": config.n_permutations, "seed": config.seed, **probe.key}
        done = json.loads(target.read_text()) if target.exists() else {}
        if done.get("key") != key:
            done = {**checkpoint_scores(path, probe, config), "key": key}
            write_json_atomic(target, done)
            if config.progress:
                print(f"analysed {path} -> {target}", flush=True)
        results.append(done)
    train = Path(run_dir) / "train.json"
    return {
        "checkpoints": str(run_dir),
        "epochs": [r["epoch"] for r in results],
        "layers": results[0]["layers"],
        "blocks": results[0]["blocks"],
        "accuracy": [r["accuracy"] for r in results],  # (E, L)
        "p_bhy": [r["p_bhy"] for r in results],
        "seconds": [r["seconds"] for r in results],
        "train": json.loads(train.read_text()) if train.exists() else None,
    }


def block_means(run: dict) -> tuple[list[str], np.ndarray]:
    """Blocks in depth order and their mean 2 vs 2 per epoch: (blocks, (E, n_blocks))."""
    blocks = list(dict.fromkeys(run["blocks"]))
    acc, owner = np.asarray(run["accuracy"]), np.asarray(run["blocks"])
    return blocks, np.stack([acc[:, owner == b].mean(axis=1) for b in blocks], axis=1)


def first_reaching(curve: np.ndarray, epochs: list[int], fraction: float = 0.9) -> int:
    """The first epoch at which `curve` reaches `fraction` of its final value."""
    return int(epochs[int(np.flatnonzero(curve >= fraction * curve[-1])[0])])


def findings(run: dict, permuted: dict | None, alpha: float) -> dict:
    """The study's questions answered from the numbers (item 5 of the issue), nothing tuned."""
    blocks, means = block_means(run)
    acc, p = np.asarray(run["accuracy"]), np.asarray(run["p_bhy"])
    last = np.asarray(run["blocks"]) == blocks[-1]
    result = {
        "last_block_mean_by_epoch": means[:, -1].tolist(),
        "last_block_final": float(means[-1, -1]),
        "last_block_rises": bool(means[-1, -1] > means[0, -1]),
        "last_block_final_significant_fraction": float(np.mean(p[-1, last] < alpha)),
        "first_block_epoch_90pct": first_reaching(means[:, 0], run["epochs"]),
        "last_block_epoch_90pct": first_reaching(means[:, -1], run["epochs"]),
        "final_max": float(acc[-1].max()),
        # "earlier", per layer: the first checkpoint at which it reaches 90% of its final 2 vs 2
        "epoch_90pct_by_layer": [first_reaching(acc[:, j], run["epochs"]) for j in range(acc.shape[1])],
    }
    result["first_layers_earlier"] = result["first_block_epoch_90pct"] < result["last_block_epoch_90pct"]
    if permuted is not None:
        checkpoints = (permuted["train"] or {}).get("checkpoints", [])
        result["permuted_train_accuracy"] = checkpoints[-1]["eval_train_accuracy"] if checkpoints else None
        result["permuted_final_max"] = float(np.max(permuted["accuracy"][-1]))
        result["permuted_all_layers_max"] = float(np.max(permuted["accuracy"]))
        result["permuted_at_most_0.60_everywhere"] = result["permuted_all_layers_max"] <= 0.60
    return result


def analyze_training(checkpoints: str | Path, out: str | Path, images: np.ndarray, labels: np.ndarray,
                     vectors: np.ndarray, config: TrainingAnalysisConfig = TrainingAnalysisConfig(),
                     permuted: str | Path | None = None) -> dict:
    """`semguard train` runs on images in memory: per-checkpoint 2 vs 2, training.json and the figures in `out`.

    images: (N, H, W, 3) uint8 held-out images; labels: (N,) concept of each; vectors: (w, d), row c concept c.
    """
    runs = _runs(checkpoints, permuted, own_model=False)
    return analyze_probe(runs, out, array_probe(images, labels, vectors, config), config)


def array_probe(images: np.ndarray, labels: np.ndarray, vectors: np.ndarray, config: TrainingAnalysisConfig) -> Probe:
    """`semguard train` checkpoints on images in memory, every concept 0..w-1 (the world's case)."""
    sets = image_set_indices(labels, len(vectors), config.image_sets)
    return Probe(ArrayImages(images, labels), sets, vectors, fractalnet_network, {})


def analyze_training_subject(checkpoints: str | Path, out: str | Path, spec: SubjectSpec,
                             config: TrainingAnalysisConfig = TrainingAnalysisConfig(),
                             permuted: str | Path | None = None) -> dict:
    """The run(s) analysed on a subject's held-out images and word vectors (module docstring)."""
    own_model = spec.model is not None or spec.model_entry is not None
    runs = _runs(checkpoints, permuted, own_model)  # bad folders fail before anything loads
    probe = model_probe(runs["true_labels"][1][0], spec, config) if own_model else fractalnet_probe(spec, config)
    return analyze_probe(runs, out, probe, config)


def _runs(checkpoints: str | Path, permuted: str | Path | None, own_model: bool) -> dict[str, tuple[Path, list[Path]]]:
    """run name -> (folder, checkpoint files in epoch order)."""
    folders = {"true_labels": checkpoints, "permuted_labels": permuted}
    return {name: (Path(f), checkpoint_files(f, own_model)) for name, f in folders.items() if f is not None}


def analyze_probe(runs: dict[str, tuple[Path, list[Path]]], out: str | Path, probe: Probe,
                  config: TrainingAnalysisConfig) -> dict:
    """Each run's (true labels, permuted labels) per-checkpoint 2 vs 2 on `probe`, training.json and the
    two figures in `out`."""
    out = Path(out)
    runs = {name: analyze_run(folder, files, out / name, probe, config) for name, (folder, files) in runs.items()}
    summary = {"format": "semguard.training/1", "image_sets": config.image_sets,
               "n_permutations": config.n_permutations, "alpha": config.alpha, "runs": runs,
               "findings": findings(runs["true_labels"], runs.get("permuted_labels"), config.alpha)}
    if probe.subject is not None:
        summary.update(subject=probe.subject, concepts=probe.concepts)
    from semguard.analysis.training_figures import plot_block_lines, plot_heatmap

    plot_heatmap(out / "training_heatmap.png", runs, config.alpha)
    plot_block_lines(out / "training_by_block.png", runs)
    write_json_atomic(out / "training.json", summary)
    return summary


# --------------------------------------------------------------------------- subjects


def _subject_key(spec: SubjectSpec, sets, vectors: np.ndarray) -> dict:
    """The subject part of a checkpoint's key: its record (absolute paths) and the concepts, sets and vectors used."""
    record = {k: v for k, v in subject_record(spec).items() if k not in ("world_cache", "weights")}
    digest = hashlib.sha256()
    for array in (sets.concepts, sets.indices, vectors):
        digest.update(np.ascontiguousarray(array).tobytes())
    return {"subject": record, "probe_sha256": digest.hexdigest()}


def _image_sets(labels: np.ndarray, matched: np.ndarray, config: TrainingAnalysisConfig):
    from semguard.analysis.subject_two_vs_two import choose_image_sets

    sets = choose_image_sets(labels, matched, config.image_sets)
    if sets.too_few and config.progress:
        print(f"{len(sets.too_few)} classes with a word vector have fewer than {config.image_sets} images: "
              "left out", file=sys.stderr)
    return sets


def fractalnet_probe(spec: SubjectSpec, config: TrainingAnalysisConfig) -> Probe:
    """`semguard train` checkpoints on the subject's images (32 x 32, as they are) and word vectors (the
    embedded world's when the spec names no asset)."""
    from semguard.subject.assets import load_subject_data

    given = [f"--{k.replace('_', '-')}" for k in NOT_FOR_FRACTALNET if getattr(spec, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: FractalNet checkpoints bring their own weights and take "
                         f"{FRACTALNET_SIZE} x {FRACTALNET_SIZE} images as they are; leave them out (or give --model "
                         "for your own model's checkpoints)")
    data = load_subject_data(spec, config.progress)
    sets = _image_sets(data.labels, data.matched, config)
    images = data.images_as_they_are(FRACTALNET_SIZE, sets.indices, "FractalNet checkpoints")  # as trained on
    vectors = data.word_vectors[sets.concepts]
    return Probe(images, sets.indices, vectors, fractalnet_network, _subject_key(spec, sets, vectors),
                 [data.classes[c] for c in sets.concepts], subject_record(spec))


def model_probe(first: Path, spec: SubjectSpec, config: TrainingAnalysisConfig) -> Probe:
    """Checkpoints of the subject's model: each weights file loaded into it, tapped at the subject's layers
    (the subject itself is loaded with the `first` checkpoint as its weights)."""
    from semguard.models.presets import layer_blocks
    from semguard.subject.assets import load_subject_model
    from semguard.subject.core import load_subject

    if spec.weights is not None:  # e.g. a subject TOML shared with other commands
        print(f"--weights {spec.weights}: not used; each checkpoint in {first.parent} is the weights", file=sys.stderr)
    subject = load_subject(replace(spec, weights=first), config.progress)
    sets = _image_sets(subject.images.labels, subject.matched, config)
    layers, blocks, n_classes = subject.layers, layer_blocks(subject.name, subject.layers), len(subject.classes)

    def load_network(path: Path) -> Network:
        return Network(load_subject_model(replace(spec, weights=path), n_classes), layers, blocks)

    vectors = subject.word_vectors[sets.concepts]
    return Probe(subject.images, sets.indices, vectors, load_network, _subject_key(spec, sets, vectors),
                 [subject.classes[c] for c in sets.concepts], subject_record(spec))
