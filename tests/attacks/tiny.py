"""A tiny seeded CNN and a labelled random image set for attack tests (seconds on 2 CPU cores)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

N_CLASSES = 12


def tiny_cnn(n_classes: int = N_CLASSES, seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2, 3x3 pool, linear; normalisation inside as every project model; eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(16 * 9, n_classes),
    )
    with torch.no_grad():  # non-trivial BN statistics, so eval mode differs from train mode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        # Centre and scale the logits on random images, so that predictions spread over all classes.
        model.eval()
        probe = torch.rand(256, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
        logits = model(probe)
        head = model[-1]
        head.bias -= logits.mean(0)
        head.weight /= logits.std(0).unsqueeze(1)
        head.bias /= logits.std(0)
    return model


def tiny_world(n_images: int = 240, n_classes: int = N_CLASSES, dim: int = 8, seed: int = 0):
    """(model, images uint8 (N, 12, 12, 3), labels (N,), label_names, word_vectors (n_classes, dim)).

    Labels are the model's own predictions on most images (so many are 'correctly
    classified') and random on every fifth (so some are not).
    """
    from semguard.attacks.generate import predict

    model = tiny_cnn(n_classes, seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_images, 12, 12, 3), dtype=np.uint8)
    labels = predict(model, images, 64, torch.device("cpu"))
    labels[::5] = rng.integers(0, n_classes, size=len(labels[::5]))
    names = [f"concept{c}" for c in range(n_classes)]
    vectors = rng.normal(size=(n_classes, dim))
    return model, images, labels, names, vectors


def as_world_subject(world):
    """A stand-in for semguard.subject.core.world_subject serving `world` (a tiny_world() tuple) as the
    embedded world, so the commands' one subject path runs on it."""
    from semguard.models.factory import ModelSpec
    from semguard.subject.core import ArrayImages, Subject

    model, images, labels, names, vectors = world

    def world_subject(spec, progress=True, inputs=None):
        return Subject("tiny", model, ModelSpec("tiny", {}), [], list(names), np.asarray(vectors),
                       np.ones(len(names), bool), ArrayImages(images, labels), spec)

    return world_subject
