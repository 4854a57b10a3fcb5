"""`semguard quickstart`: the paper's method end to end on the embedded world, offline."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from analysis.figures import plot_by_layer
from analysis.report import render_report, write_json_atomic
from analysis.two_vs_two import activations_by_set, image_set_indices, two_vs_two_by_layer
from detector.layers import LayerTap, iter_activations, preset_layers
from detector.words import load_vectors, match_labels
from world import WorldSettings, build_world, load_world_model


@dataclass(frozen=True)
class QuickstartConfig:
    out: Path
    cache_dir: Path = Path(".cache/semguard")  # world, vectors and CNN, reused across runs by settings hash
    world: WorldSettings = field(default_factory=WorldSettings)
    image_sets: int = 5  # paper 3.2: five distinct images per concept, one per set
    n_permutations: int = 1000  # paper 3.5
    seed: int = 0
    batch_size: int = 256
    progress: bool = True


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1], the input every model takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def predict(tap: LayerTap, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N,) predicted labels."""
    out = np.empty(len(images), dtype=np.int64)
    for index, result in iter_activations(tap, images_to_tensor(images), batch_size):
        out[index] = result.logits.argmax(1).numpy()
    return out


def layer_activations(tap: LayerTap, images: np.ndarray) -> dict[str, np.ndarray]:
    """layer -> (n, k) float32 for a small batch of uint8 images, pixels first."""
    with torch.no_grad():
        result = tap(images_to_tensor(images))
    acts = {"pixels": images.reshape(len(images), -1).astype(np.float32)}
    acts.update({name: a.numpy() for name, a in result.acts.items()})
    return acts


def run_quickstart(config: QuickstartConfig) -> dict:
    """Build or reuse the world, run every analysis, write summary.json, figures and report.md."""
    timer = Timer()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    with timer.stage("world"):
        world = build_world(config.world, Path(config.cache_dir), progress=config.progress)
    with timer.stage("load"):
        model = load_world_model(world.model_path)
        tap = LayerTap(model, preset_layers("worldnet"))
        words = match_labels(load_vectors(world.vectors_path), world.classes)
        if words.unmatched:
            missing = [world.classes[i] for i in words.unmatched]
            raise ValueError(f"world vectors lack {len(missing)} class names: {missing[:5]}")
    with timer.stage("test_accuracy"):
        test_pred = predict(tap, world.test_images, config.batch_size)
        test_accuracy = float(np.mean(test_pred == world.test_labels))
    with timer.stage("two_vs_two"):
        sets = image_set_indices(world.test_labels, len(world.classes), config.image_sets)
        set_acts = activations_by_set(world.test_images, sets, lambda imgs: layer_activations(tap, imgs))
        pixel_acts = [{"pixels": acts.pop("pixels")} for acts in set_acts]
        run = dict(word_vectors=words.vectors, n_permutations=config.n_permutations, seed=config.seed)
        pixels = two_vs_two_by_layer(pixel_acts, progress=False, **run)
        scores = two_vs_two_by_layer(set_acts, progress=config.progress, **run)
    summary = {
        "world": {
            "classes": list(world.classes),
            "test_accuracy": test_accuracy,
            "test_images": int(len(world.test_labels)),
            "settings": asdict(config.world),
        },
        "two_vs_two": {
            **scores.as_json(),
            "pixels": float(pixels.accuracy[0]),
            "pixels_p_value": float(pixels.p_value[0]),
            "image_sets": config.image_sets,
            "n_permutations": config.n_permutations,
        },
    }
    plot_by_layer(
        out / "two_vs_two_by_layer.png",
        ["pixels", *scores.layers],
        {"world CNN": np.concatenate([pixels.accuracy, scores.accuracy])},
        significant={"world CNN": np.concatenate([pixels.p_value < 0.05, scores.significant()])},
        errors={"world CNN": np.concatenate([pixels.spread, scores.spread])},
        title=f"2 vs 2 by layer, embedded world ({len(world.classes)} concepts, {config.image_sets} image sets)",
    )
    summary["timings_s"] = timer.seconds
    write_json_atomic(out / "summary.json", summary)
    (out / "report.md").write_text(render_report(summary))
    return summary
