"""Measure the embedded world against its targets (issue 3): `python -m world.measure`.

Prints WorldNet test accuracy, the 2 vs 2 curve (raw pixels first, then every tapped
layer; 5 image sets averaged), targeted MI-FGSM success on correctly classified test
images at the paper's settings, and build time per stage. A check, not a test: it
builds the full world (minutes on 2 cores) unless it is cached.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semguard.detector.layers import LayerTap, preset_layers
from semguard.detector.rsa import correlation_matrix, two_vs_two
from semguard.detector.words import load_vectors
from semguard.models.worldnet import load_world_model
from semguard.world.build import World, WorldSettings, build_world
from semguard.models.inputs import predict
from semguard.world.train import to_tensor


def two_vs_two_curve(world: World, n_sets: int = 5) -> dict[str, float]:
    """'pixels' then every worldnet layer -> 2 vs 2 accuracy averaged over n_sets image sets."""
    kv = load_vectors(world.vectors_path)
    c_d = correlation_matrix(np.stack([kv[c] for c in world.classes]))
    sets = world.image_sets(n_sets)  # (S, w, H, W, 3)
    tap = LayerTap(load_world_model(world.model_path), preset_layers("worldnet"))
    scores: dict[str, list[float]] = {"pixels": []}
    with torch.no_grad():
        for images in sets:
            scores["pixels"].append(two_vs_two(correlation_matrix(images.reshape(len(images), -1).astype(np.float64)), c_d))
            for name, act in tap(to_tensor(images)).acts.items():
                scores.setdefault(name, []).append(two_vs_two(correlation_matrix(act), c_d))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def mifgsm_success(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0, eps: float = 0.15,
                   step: float = 0.03, decay: float = 1.0, iterations: int = 20) -> int:
    """Targeted MI-FGSM (Dong et al. 2018) with random other-class targets; how many reach the target.
    x: (B, 3, H, W) in [0, 1], y: (B,) true labels."""
    n_classes = model(x[:1]).shape[1]
    gen = torch.Generator().manual_seed(seed)
    target = (y + torch.randint(1, n_classes, y.shape, generator=gen)) % n_classes
    adv, m = x.clone(), torch.zeros_like(x)
    for _ in range(iterations):
        adv.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(adv), target, reduction="sum"), adv)
        g = g / g.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)  # L1-normalised per sample
        m = decay * m + g
        adv = torch.min(torch.max(adv.detach() - step * m.sign(), x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        return int((model(adv).argmax(1) == target).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, default=Path(".semguard/world"))
    ap.add_argument("--attack-images", type=int, default=500)
    ap.add_argument("--n-classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=WorldSettings().torch_threads,
                    help="torch threads (1 is faster on a CPU shared with other jobs)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    world = build_world(WorldSettings(n_classes=args.n_classes, torch_threads=args.threads), args.cache)
    print(f"build {time.perf_counter() - t0:.1f}s  stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in world.timings_s.items()))
    print(f"test accuracy {world.test_accuracy:.4f}")
    for name, acc in two_vs_two_curve(world).items():
        print(f"2v2 {name:20s} {acc:.3f}")
    model = load_world_model(world.model_path)
    torch.manual_seed(0)
    pred = predict(model, world.test_images)
    ok = np.flatnonzero(pred == world.test_labels)
    pick = np.random.default_rng(0).choice(ok, size=min(args.attack_images, len(ok)), replace=False)
    x, y = to_tensor(world.test_images[pick]), torch.from_numpy(world.test_labels[pick])
    rate = sum(mifgsm_success(model, x[i:i + 250], y[i:i + 250], seed=i) for i in range(0, len(x), 250)) / len(x)
    print(f"targeted MI-FGSM success (eps 0.15, step 0.03, 20 it, random targets, {len(x)} images) {rate:.3f}")


if __name__ == "__main__":
    main()
