"""`semguard quickstart --ray`: the 2 vs 2 stage's activations extracted on a Ray cluster.

Each image set goes to a Ray actor holding the model and its layer taps (on the CPU: the
quickstart asks for no GPU); the driver keeps the sets in
order and runs the statistics itself. The activations are those of the in-process path
(analysis.quickstart.layer_activations on the same images), up to float rounding across threads.

Importing this module imports ray; only the --ray path imports it.
"""
from __future__ import annotations

import numpy as np
import ray
from torch import nn

from semguard.analysis.quickstart import layer_activations
from semguard.attacks.distributed import RayParams, actor_options, connect_ray, put_model
from semguard.detector.layers import LayerTap


class LayerExtractor:
    """A Ray actor: one model with its taps; layer -> (n, k) activations of a batch of uint8 images."""

    def __init__(self, model: nn.Module, layers: list[str]):
        self.tap = LayerTap(model.eval(), layers)

    def extract(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return layer_activations(self.tap, images)


def activations_by_set_ray(model: nn.Module, layers: list[str], images: np.ndarray, sets: np.ndarray,
                           options: RayParams = RayParams()) -> list[dict[str, np.ndarray]]:
    """analysis.two_vs_two.activations_by_set on Ray: images (N, H, W, 3) uint8, sets (S, w) -> S dicts."""
    started = connect_ray(options.address)
    actors = []
    try:
        n_actors, resources = actor_options(options)
        model_ref = put_model(model)
        actors = [ray.remote(LayerExtractor).options(**resources).remote(model_ref, layers)
                  for _ in range(min(n_actors, len(sets)))]
        return ray.get([actors[i % len(actors)].extract.remote(images[idx]) for i, idx in enumerate(sets)])
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
