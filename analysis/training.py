"""`semguard analyze training`: 2 vs 2 of every tapped layer at every checkpoint of a training run
(paper section 5, Figures 2-3), beside the permuted-label control when given.

Per checkpoint: the world's image sets through the checkpoint's FractalNet, 2 vs 2 per layer against
the word vectors, permutation tests, BHY across that checkpoint's layers (analysis.two_vs_two). Each
checkpoint's result is written to `out/<run>/epoch-NNNN.json` atomically as soon as it is done, so a
killed analysis resumes at the first checkpoint without one. Then `training.json`, the layer x epoch
heatmap (`training_heatmap.png`, Figure 2) and block averages over epochs (`training_by_block.png`,
Figure 3).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from semguard.analysis.two_vs_two import (
    activations_by_set,
    image_set_indices,
    two_vs_two_by_layer,
)
from semguard.files import sha256_file
from semguard.detector.layers import LayerTap
from semguard.models.fractalnet import fractalnet_layers, load_fractalnet
from semguard.models.inputs import as_model_input

from semguard.files import write_json_atomic


@dataclass(frozen=True)
class TrainingAnalysisConfig:
    image_sets: int = 5  # paper 3.2
    n_permutations: int = 200  # paper 3.5: 1000; 200 per layer and checkpoint keeps a run in minutes
    seed: int = 0
    alpha: float = 0.05  # BHY level for "significant"
    progress: bool = False


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints in epoch order; `run_dir` is a `semguard train --out` or its checkpoints/."""
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    files = sorted(folder.glob("epoch-*.safetensors"))
    if not files:
        raise ValueError(f"checkpoints: no epoch-NNNN.safetensors in {folder}")
    return files


def checkpoint_scores(path: Path, images: np.ndarray, sets: np.ndarray, vectors: np.ndarray,
                      config: TrainingAnalysisConfig) -> dict:
    """2 vs 2 per layer of one checkpoint: LayerScores as JSON plus blocks, epoch and seconds taken."""
    start = time.perf_counter()
    model = load_fractalnet(path)
    infos = fractalnet_layers(model.config)
    tap = LayerTap(model, [i.name for i in infos])

    def extract(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: v.numpy() for k, v in tap(as_model_input(batch)).acts.items()}

    scores = two_vs_two_by_layer(activations_by_set(images, sets, extract), vectors,
                                 config.n_permutations, config.seed, progress=config.progress)
    epoch = int(path.stem.split("-")[1])
    return {**scores.as_json(), "blocks": [i.block for i in infos], "epoch": epoch,
            "seconds": round(time.perf_counter() - start, 2)}


def analyze_run(run_dir: str | Path, out: Path, images: np.ndarray, labels: np.ndarray, vectors: np.ndarray,
                config: TrainingAnalysisConfig) -> dict:
    """Every checkpoint of one run (reusing those already in `out`); {epochs, layers, blocks, accuracy (E, L), ...}."""
    sets = image_set_indices(labels, len(vectors), config.image_sets)
    results = []
    for path in checkpoint_files(run_dir):
        target = out / f"{path.stem}.json"
        # a result is reused only for the same checkpoint bytes and settings (another run's file is redone)
        key = {"checkpoint_sha256": sha256_file(path), "image_sets": config.image_sets,
               "n_permutations": config.n_permutations, "seed": config.seed}
        done = json.loads(target.read_text()) if target.exists() else {}
        if done.get("key") != key:
            done = {**checkpoint_scores(path, images, sets, vectors, config), "key": key}
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
    """Both runs' per-checkpoint 2 vs 2, training.json and the two figures in `out`.

    images: (N, H, W, 3) uint8 held-out images; labels: (N,) concept of each; vectors: (w, d), row c concept c.
    """
    out = Path(out)
    runs = {"true_labels": analyze_run(checkpoints, out / "true_labels", images, labels, vectors, config)}
    if permuted is not None:
        runs["permuted_labels"] = analyze_run(permuted, out / "permuted_labels", images, labels, vectors, config)
    summary = {"format": "semguard.training/1", "image_sets": config.image_sets,
               "n_permutations": config.n_permutations, "alpha": config.alpha, "runs": runs,
               "findings": findings(runs["true_labels"], runs.get("permuted_labels"), config.alpha)}
    from semguard.analysis.training_figures import plot_block_lines, plot_heatmap

    plot_heatmap(out / "training_heatmap.png", runs, config.alpha)
    plot_block_lines(out / "training_by_block.png", runs)
    write_json_atomic(out / "training.json", summary)
    return summary
