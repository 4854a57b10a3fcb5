"""`semguard analyze two-vs-two`: the paper's Figure 1 (2 vs 2 through the layers) for any subject,
at the paper's scale, streamed and resumable.

At the paper's scale (ResNet-50, 49 layers, 838 concepts x 5 image sets at 224 x 224) the tapped
activations are ~160 GB, so they are never held at once. The statistic needs, per layer and image
set, only C_I = correlation_matrix(acts): a (w, w) matrix. C_I is a Gram matrix of unit rows, so it
is not a sum over images (every pair of images meets in it), but it is a sum over feature columns:
a layer needs all w images at once, not all its features in float64. The plan (`plan_passes`):
layers in depth order are grouped so that one group's activations for the w images of one set fit
a memory budget; each group is one tapped forward pass over each set, its layers' C_I are computed
and its activations dropped. A layer that alone exceeds the budget goes to a disk-backed array
(removed afterwards). C_I is computed exactly (float64), in column blocks when a layer is large
(`correlation_blocked`).

The statistics are the quickstart's (analysis.quickstart.two_vs_two_stage): `two_vs_two` per set,
`permutation_test_two_vs_two` over the sets with one seed for every layer, BHY across the tapped
layers, raw pixels first and tested on their own. So on the embedded world the numbers equal the
quickstart's. Each finished layer is written to out/layers/NNN.json (atomic) with the settings it
was computed under; a rerun reuses every layer whose settings match and computes the rest.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from semguard.detector.layers import LayerTap
from semguard.detector.rsa import _unit_rows, as_float64, correlation_matrix, two_vs_two
from semguard.detector.significance import bhy, default_device, permutation_test_two_vs_two
from semguard.subject.header import subject_header
from semguard.too_small import TooSmall
from semguard.files import atomic_path, sha256_file, write_json_atomic

PIXELS = "pixels"  # the raw input, analysed first as in the paper's Figure 1 baseline
FORMAT = "semguard.two_vs_two/1"
PREDICTIONS_FILE = "predictions.json"


@dataclass(frozen=True)
class TwoVsTwoConfig:
    image_sets: int = 5  # paper 3.2: five distinct images per concept, one per set
    n_permutations: int = 1000  # paper 3.5
    seed: int = 0  # the permutations (the same for every layer, as the quickstart)
    # Activations held at once (float32). The study in all is ~200 GB at the paper's scale; ResNet-50's
    # largest layer for 838 images is 2.7 GB, so 4 GiB keeps the whole run under 8 GiB resident.
    memory_budget_gib: float = 4.0
    workspace_gib: float = 0.5  # float64 column blocks of one correlation matrix
    batch_size: int = 32  # images per forward pass
    device: str | None = None  # None: CUDA when present (forward, correlations, permutations), else CPU
    progress: bool = True


# --------------------------------------------------------------------------- which images


class ImageSets(NamedTuple):
    concepts: np.ndarray  # (w,) class ids analysed, ascending
    indices: np.ndarray  # (S, w) image index of concept concepts[j] in set s
    too_few: list[int]  # matched classes left out: fewer images than image sets


def choose_image_sets(labels: np.ndarray, matched: np.ndarray, n_sets: int) -> ImageSets:
    """Set s holds the s-th image (in image order) of every matched class, as `image_set_indices`
    does for the quickstart; matched classes with fewer than n_sets images are left out."""
    if n_sets < 1:
        raise ValueError(f"image_sets must be >= 1, got {n_sets}")
    labels = np.asarray(labels)
    concepts, columns, too_few = [], [], []
    for c in np.flatnonzero(matched):
        where = np.flatnonzero(labels == c)
        if len(where) < n_sets:
            too_few.append(int(c))
            continue
        concepts.append(int(c))
        columns.append(where[:n_sets])
    if len(concepts) < 3:
        raise TooSmall(f"2 vs 2 needs at least 3 matched classes with {n_sets} images each, found {len(concepts)} "
                       f"({int(np.sum(matched))} matched classes, {len(too_few)} with too few images)", len(concepts))
    return ImageSets(np.asarray(concepts), np.stack(columns, axis=1), too_few)


# --------------------------------------------------------------------------- the pass plan


class Pass(NamedTuple):
    layers: tuple[str, ...]  # in depth order; PIXELS needs no forward
    spill: bool  # one layer over the budget: its activations go to a disk-backed array


def plan_passes(sizes: dict[str, int], n_images: int, budget_bytes: float) -> list[Pass]:
    """Group layers (depth order, `sizes`: layer -> features per image) into forward passes whose
    float32 activations for `n_images` images fit `budget_bytes`; a layer alone over it is spilled."""
    if budget_bytes <= 0:
        raise ValueError(f"memory budget must be > 0 bytes, got {budget_bytes}")
    passes: list[Pass] = []
    group: list[str] = []
    held = 0
    for name, k in sizes.items():
        need = 4 * n_images * k
        if need > budget_bytes:
            if group:
                passes.append(Pass(tuple(group), False))
                group, held = [], 0
            passes.append(Pass((name,), True))
            continue
        if held + need > budget_bytes:
            passes.append(Pass(tuple(group), False))
            group, held = [], 0
        group.append(name)
        held += need
    if group:
        passes.append(Pass(tuple(group), False))
    return passes


def layer_sizes(model: torch.nn.Module, layers: list[str], sample: torch.Tensor, device: torch.device) -> dict[str, int]:
    """Features per image of PIXELS and each tapped layer, from one image."""
    with torch.no_grad():
        acts = LayerTap(model, layers)(sample[:1].to(device)).acts
    return {PIXELS: int(sample[0].numel()), **{name: int(a.shape[1]) for name, a in acts.items()}}


# --------------------------------------------------------------------------- C_I, exactly, in blocks


def correlation_blocked(acts: np.ndarray, block_cols: int, device: torch.device | str = "cpu") -> np.ndarray:
    """`correlation_matrix(acts)` computed from column blocks: (n, k) -> (n, n) float64.

    Three passes over the columns, one float64 block of `block_cols` columns alive at a time: row
    sums (means, and the raw norms that detect a constant row as detector.rsa._unit_rows does),
    centred sums of squares (norms), then C_I += U_b U_b^T over the blocks of unit rows U. Every
    product is one (n, b) @ (b, n) matrix product, so a layer of 800k features costs about what
    one whole product would, and `acts` may be a disk-backed array (read in contiguous runs).
    Equal to correlation_matrix up to summation order.
    """
    n, k = acts.shape
    if k < 2:
        raise ValueError(f"acts needs at least 2 columns to correlate rows, got {k}")
    if block_cols < 1:
        raise ValueError(f"block_cols must be >= 1, got {block_cols}")
    starts = range(0, k, block_cols)

    def block(start: int) -> torch.Tensor:  # (n, b) float64
        cols = as_float64(np.asarray(acts[:, start : start + block_cols]), device)
        if not torch.isfinite(cols).all():
            raise ValueError("acts contains NaN or infinite values")
        return cols

    sums = torch.zeros(n, 1, dtype=torch.float64, device=device)
    raw = torch.zeros(n, 1, dtype=torch.float64, device=device)
    for start in starts:
        cols = block(start)
        sums += cols.sum(-1, keepdim=True)
        raw += (cols * cols).sum(-1, keepdim=True)
    mean = sums / k
    squares = torch.zeros(n, 1, dtype=torch.float64, device=device)
    for start in starts:
        squares += ((block(start) - mean) ** 2).sum(-1, keepdim=True)
    norms = squares.sqrt()
    constant = norms <= 1e-12 * raw.sqrt().clamp_min(1e-300)  # as _unit_rows: such a row correlates 0
    scale = torch.where(constant, torch.zeros_like(norms), 1.0 / norms.clamp_min(1e-300))
    out = torch.zeros(n, n, dtype=torch.float64, device=device)
    for start in starts:
        unit = (block(start) - mean) * scale  # (n, b)
        out.addmm_(unit, unit.T)
    out = out.clamp_(-1.0, 1.0)
    out.diagonal().fill_(1.0)
    return out.cpu().numpy()


def layer_correlation(acts: np.ndarray, workspace_bytes: float, device: torch.device) -> np.ndarray:
    """C_I of one layer and image set: the quickstart's `correlation_matrix` when the float64 work
    fits `workspace_bytes` (identical numbers), else the column-blocked computation."""
    n, k = acts.shape
    if 3 * 8 * n * k <= workspace_bytes:  # float64 copy, centred rows, unit rows
        return correlation_matrix(acts)
    return correlation_blocked(acts, max(1, int(workspace_bytes // (3 * 8 * n))), device)


# --------------------------------------------------------------------------- the run


def subject_key(subject, sets: ImageSets, config: TwoVsTwoConfig) -> dict:
    """What a finished layer's numbers depend on: a stored layer is reused only under the same key."""
    weights = subject.source_weights
    spec = {k: v for k, v in subject.spec.to_json().items() if k != "world_cache"}
    key = {
        "subject": spec, "model": subject.name,
        "weights_sha256": sha256_file(weights) if weights and Path(weights).is_file() else None,
        "images_sha256": hashlib.sha256(np.ascontiguousarray(sets.indices).tobytes()
                                        + np.ascontiguousarray(sets.concepts).tobytes()).hexdigest(),
        "image_sets": config.image_sets, "n_permutations": config.n_permutations, "seed": config.seed,
    }
    return json.loads(json.dumps(key))  # as a stored layer reads it back (tuples become lists)


def layer_scores(c_is: np.ndarray, c_d: np.ndarray, config: TwoVsTwoConfig, device: torch.device) -> dict:
    """One layer from its (S, w, w) C_I: the quickstart's statistics (two_vs_two_by_layer)."""
    per_set = [two_vs_two(c_i, c_d) for c_i in c_is]
    result = permutation_test_two_vs_two(c_is, c_d, n_permutations=config.n_permutations, seed=config.seed,
                                         device=device)
    return {"accuracy": result.accuracy, "per_set": per_set, "spread": float(np.std(per_set)),
            "p_value": result.p_value}


class _Collector:
    """One pass's activations for one image set: layer -> (w, k) float32, in memory or on disk."""

    def __init__(self, sizes: dict[str, int], n: int, spill_dir: Path | None):
        self.arrays: dict[str, np.ndarray] = {}
        for name, k in sizes.items():
            if spill_dir is None:
                self.arrays[name] = np.empty((n, k), np.float32)
            else:
                spill_dir.mkdir(parents=True, exist_ok=True)
                self.arrays[name] = np.lib.format.open_memmap(spill_dir / "acts.npy", "w+", np.float32, (n, k))


class DecodedSets:
    """Each image set decoded once into a disk-backed float32 array, read back by every later pass.

    With several passes a set would otherwise be read and decoded once per pass (9 times for
    ResNet-50 under 4 GiB), and on a GPU the decoding, not the model, bounds the run (BENCHMARKS.md,
    Paper scale). The arrays hold exactly what `images.load` gives; `folder` is emptied first (a
    killed run's leftovers) and removed by `remove()`.
    """

    def __init__(self, images, indices: np.ndarray, folder: Path, batch_size: int):
        self.images, self.indices, self.folder, self.batch_size = images, indices, folder, batch_size
        shutil.rmtree(folder, ignore_errors=True)

    def load(self, s: int, start: int, stop: int) -> torch.Tensor:
        """Images start:stop of set s: (b, 3, H, W) float32."""
        path = self.folder / f"set-{s}.npy"
        if not path.exists():
            self._decode(s, path)
        return torch.from_numpy(np.array(np.load(path, mmap_mode="r")[start:stop]))

    def _decode(self, s: int, path: Path) -> None:
        indices = self.indices[s]
        first = self.images.load(indices[:1])
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # np.save's header, then the rows batch by batch
                np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                         "shape": (len(indices), *first.shape[1:])})
                for start in range(0, len(indices), self.batch_size):
                    batch = self.images.load(indices[start : start + self.batch_size])
                    f.write(np.ascontiguousarray(batch.numpy(), dtype="<f4").tobytes())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _pass_correlations(subject, tap: LayerTap | None, p: Pass, sizes: dict[str, int], sets: ImageSets,
                       config: TwoVsTwoConfig, device: torch.device, spill_dir: Path, bar,
                       decoded: DecodedSets | None = None, predicted: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """layer -> (S, w, w) C_I for the layers of one pass: one tapped forward over each set (its images
    from `decoded` when given, else read from the subject). predicted: (S, w), filled with the model's
    class for each image when given (the tap's logits come with the activations)."""
    w = sets.indices.shape[1]
    c = {name: np.empty((len(sets.indices), w, w)) for name in p.layers}
    for s, indices in enumerate(sets.indices):
        acts = _Collector({n: sizes[n] for n in p.layers}, w, spill_dir if p.spill else None).arrays
        for start in range(0, w, config.batch_size):
            stop = min(start + config.batch_size, w)
            images = (decoded.load(s, start, stop) if decoded is not None
                      else subject.images.load(indices[start:stop]))  # (b, 3, H, W)
            if PIXELS in acts:
                acts[PIXELS][start:stop] = images.reshape(len(images), -1).numpy()
            if tap is not None:
                with torch.no_grad():
                    tapped = tap(images.to(device))
                for name, a in tapped.acts.items():
                    acts[name][start:stop] = a.cpu().numpy()
                if predicted is not None:
                    predicted[s, start:stop] = tapped.logits.argmax(1).cpu().numpy()
            bar.update(len(images))
        for name in p.layers:
            c[name][s] = layer_correlation(acts[name], config.workspace_gib * 2**30, device)
        del acts
        if p.spill:
            shutil.rmtree(spill_dir, ignore_errors=True)
    return c


def _stored_predictions(path: Path, key: dict) -> np.ndarray | None:
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return np.asarray(record["predicted"], np.int64) if record.get("key") == key else None


def _layer_file(out: Path, index: int) -> Path:
    return out / "layers" / f"{index:03d}.json"


def _finished(out: Path, names: list[str], key: dict) -> dict[str, dict]:
    done = {}
    for i, name in enumerate(names):
        f = _layer_file(out, i)
        if f.exists():
            record = json.loads(f.read_text())
            if record.get("key") == key and record.get("layer") == name:
                done[name] = record
    return done


def run_two_vs_two(subject, out: str | Path, config: TwoVsTwoConfig = TwoVsTwoConfig(),
                   on_layer: Callable[[str], None] | None = None) -> dict:
    """2 vs 2 of raw pixels and every tapped layer of `subject` (a semguard.subject.Subject) on its
    matched classes: two_vs_two.json and two_vs_two_by_layer.png in `out`, layers written as they finish.

    Returns the two_vs_two.json record plus "computed" (layers computed by this call). on_layer(name)
    is called after each layer's file is written (progress hooks, tests).
    """
    out = Path(out)
    device = torch.device(config.device) if config.device else default_device()
    sets = choose_image_sets(subject.images.labels, subject.matched, config.image_sets)
    names = [PIXELS, *subject.layers]
    key = subject_key(subject, sets, config)
    done = _finished(out, names, key)
    todo = [n for n in names if n not in done]
    computed: list[str] = []
    predictions = out / PREDICTIONS_FILE  # the model's class for each set image, for the subject header
    predicted = _stored_predictions(predictions, key)
    if predicted is None:
        predictions.unlink(missing_ok=True)
        predicted = np.full(sets.indices.shape, -1, np.int64)  # (S, w)
    if todo:
        model = subject.model.to(device).eval()
        sample = subject.images.load(sets.indices[0, :1])
        sizes = {n: k for n, k in layer_sizes(model, subject.layers, sample, device).items() if n in todo}
        w = len(sets.concepts)
        passes = plan_passes(sizes, w, config.memory_budget_gib * 2**30)
        c_d = correlation_matrix(subject.word_vectors[sets.concepts])
        _say(config, f"2 vs 2 on {subject.name}: {w} concepts x {config.image_sets} image sets, "
                     f"{len(todo)} of {len(names)} layers to compute ({len(done)} reused) in {len(passes)} passes, "
                     f"device {device}")
        bar = tqdm(total=len(passes) * config.image_sets * w, unit="img", desc="2 vs 2 activations",
                   disable=not config.progress, dynamic_ncols=True)
        # several passes: each set is decoded once, not once per pass
        decoded = (DecodedSets(subject.images, sets.indices, out / ".images", config.batch_size)
                   if len(passes) > 1 else None)
        try:
            for p in passes:
                bar.set_postfix_str(f"{p.layers[0]}..{p.layers[-1]}" if len(p.layers) > 1 else p.layers[0])
                tapped = [n for n in p.layers if n != PIXELS]
                tap = LayerTap(model, tapped) if tapped else None
                fill = predicted if tap is not None and not predictions.is_file() else None
                c = _pass_correlations(subject, tap, p, sizes, sets, config, device, out / ".spill", bar, decoded, fill)
                if fill is not None:
                    write_json_atomic(predictions, {"key": key, "predicted": predicted.tolist()})
                for name in p.layers:
                    record = {"layer": name, **layer_scores(c.pop(name), c_d, config, device), "key": key}
                    write_json_atomic(_layer_file(out, names.index(name)), record)
                    done[name] = record
                    computed.append(name)
                    if config.progress:
                        bar.write(f"  {name}: 2 vs 2 {record['accuracy']:.4f} (p {record['p_value']:.4f})")
                    if on_layer is not None:
                        on_layer(name)
        finally:
            if decoded is not None:
                decoded.remove()
        bar.close()
    summary = summarize(subject, sets, [done[n] for n in names], config)
    labels = np.asarray(subject.images.labels)[sets.indices]
    known = predictions.is_file()  # else every layer was reused from a run before headers
    summary["header"] = subject_header(subject, labels.ravel() if known else None, predicted.ravel() if known else None)
    write_json_atomic(out / "two_vs_two.json", summary)
    plot_two_vs_two(out / "two_vs_two_by_layer.png", summary, subject.name)
    return {**summary, "computed": computed}


def summarize(subject, sets: ImageSets, records: list[dict], config: TwoVsTwoConfig) -> dict:
    """two_vs_two.json: the quickstart's two_vs_two section plus per-set accuracies and what was left out."""
    pixels, layers = records[0], records[1:]
    p = np.asarray([r["p_value"] for r in layers])
    p_bhy = bhy(p)
    return {
        "format": FORMAT,
        "model": subject.name,
        "subject": subject.spec.to_json(),
        "layers": [r["layer"] for r in layers],
        "accuracy": [r["accuracy"] for r in layers],
        "spread": [r["spread"] for r in layers],
        "per_set": [r["per_set"] for r in layers],  # (L, S)
        "p_value": p.tolist(),
        "p_bhy": p_bhy.tolist(),
        "significant": (p_bhy < 0.05).tolist(),
        "pixels": pixels["accuracy"],
        "pixels_p_value": pixels["p_value"],
        "pixels_per_set": pixels["per_set"],
        "image_sets": config.image_sets,
        "n_permutations": config.n_permutations,
        "seed": config.seed,
        "concepts": len(sets.concepts),
        "classes": [subject.classes[c] for c in sets.concepts],
        "left_out": {"unmatched": int(np.sum(~np.asarray(subject.matched, bool))),
                     "too_few_images": [subject.classes[c] for c in sets.too_few]},
    }


def skipped_summary(subject, config: TwoVsTwoConfig, error: TooSmall) -> dict:
    """two_vs_two.json of a 2 vs 2 that could not run (too few classes with enough images): summarize's
    keys, empty, and "skipped": {"reason", "count": the classes that had enough images}."""
    labels, matched = np.asarray(subject.images.labels), np.asarray(subject.matched, bool)
    too_few = [subject.classes[c] for c in np.flatnonzero(matched) if np.sum(labels == c) < config.image_sets]
    return {
        "format": FORMAT, "model": subject.name, "subject": subject.spec.to_json(), "layers": list(subject.layers),
        "accuracy": [], "spread": [], "per_set": [], "p_value": [], "p_bhy": [], "significant": [],
        "pixels": None, "pixels_p_value": None, "pixels_per_set": [], "image_sets": config.image_sets,
        "n_permutations": config.n_permutations, "seed": config.seed, "concepts": error.count, "classes": [],
        "left_out": {"unmatched": int(np.sum(~matched)), "too_few_images": too_few}, "skipped": error.record(),
    }


def plot_two_vs_two(path: Path, summary: dict, name: str) -> None:
    """Figure 1 for the subject, drawn as the quickstart draws its own."""
    from semguard.analysis.figures import plot_by_layer

    t = summary
    plot_by_layer(
        path, [PIXELS, *t["layers"]], {name: np.asarray([t["pixels"], *t["accuracy"]])},
        significant={name: np.asarray([t["pixels_p_value"] < 0.05, *t["significant"]])},
        errors={name: np.asarray([np.std(t["pixels_per_set"]), *t["spread"]])},
        title=f"2 vs 2 by layer, {name} ({t['concepts']} concepts, {t['image_sets']} image sets)",
    )


def _say(config: TwoVsTwoConfig, line: str) -> None:
    if config.progress:
        print(line, file=sys.stderr, flush=True)

