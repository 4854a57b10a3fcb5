"""What the batch commands take from the embedded world: its model, test set and word vectors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from semguard.detector.words import load_vectors, match_labels
from semguard.models.worldnet import load_world_model
from semguard.world.build import World, WorldSettings, build_world
from semguard.world_cache import DEFAULT_WORLD_CACHE as DEFAULT_CACHE_DIR  # one constant, light for the CLI


@dataclass(frozen=True)
class WorldInputs:
    world: World
    model: nn.Module  # WorldNet, eval mode, takes [0, 1] images
    word_vectors: np.ndarray  # (n_classes, d) float32, row c is class c


def load_world_inputs(
    settings: WorldSettings = WorldSettings(), cache_dir: str | Path = DEFAULT_CACHE_DIR, progress: bool = True
) -> WorldInputs:
    """Build (or reuse) the world; load its CNN and its vectors through the loaders real assets use."""
    world = build_world(settings, cache_dir, progress=progress)
    match = match_labels(load_vectors(world.vectors_path), list(world.classes))
    if match.unmatched:
        raise ValueError(f"world vectors lack class names: {match.summary()}")
    return WorldInputs(world, load_world_model(world.model_path), match.vectors)
