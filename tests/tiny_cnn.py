"""The tiny CNN the detector, evaluation and service tests calibrate real guard bundles on."""
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from semguard.models.factory import register_model_builder

LAYERS = ["conv1", "relu2", "pool"]


class TinyCNN(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, num_classes); conv1, relu2 and pool are the tapped layers."""

    def __init__(self, width: int = 6, num_classes: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def features(self, x):
        return self.flatten(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))))

    def forward(self, x):
        return self.fc(self.features(x))


register_model_builder("tiny_cnn_test", TinyCNN, overwrite=True)


@torch.no_grad()
def fit_head(model: TinyCNN, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """Least-squares head on the random features, so predictions spread over the classes.

    Returns the model's own predictions, which the tests take as the truth.
    """
    feats = model.features(images)
    x = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
    w = torch.linalg.lstsq(x, 10.0 * nn.functional.one_hot(classes, model.fc.out_features).double()).solution
    model.fc.weight.copy_(w[:-1].T.float())
    model.fc.bias.copy_(w[-1].float())
    return model(images).argmax(1).numpy()


class TinyTask(NamedTuple):
    model: TinyCNN
    images: torch.Tensor  # (N, 3, 8, 8) float32 in [0, 1]
    labels: np.ndarray  # (N,) the model's own predictions, taken as the truth
    words: np.ndarray  # (C, 12) random label word vectors
    generator: torch.Generator  # for any further random images the test needs


def tiny_task(n_classes: int, n_images: int) -> TinyTask:
    """A seeded random TinyCNN and images whose colour carries a class, with a head fitted so that
    predictions spread over the classes."""
    torch.manual_seed(0)
    model = TinyCNN(num_classes=n_classes).eval()
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(n_classes, 3, 1, 1, generator=gen)
    src = torch.randint(0, n_classes, (n_images,), generator=gen)
    images = (base[src] + 0.25 * torch.rand(n_images, 3, 8, 8, generator=gen)).clamp(0, 1).float()
    labels = fit_head(model, images, src)
    words = np.random.default_rng(2).normal(size=(n_classes, 12)).astype(np.float32)
    return TinyTask(model, images, labels, words, gen)


def write_tiny_ensemble_bundle(out, n_classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny bundle with the shipped flagger (ensemble) written to `out`; (clean images, noisy
    attack-like images) beside it."""
    from semguard.models.factory import ModelSpec
    from semguard.detector.calibrate import CalibrationConfig
    from semguard.detector.guard import calibrate_guard

    model, images, labels, words, gen = tiny_task(n_classes, 120)
    attack = (images[:40] + 0.3 * torch.randn(40, 3, 8, 8, generator=gen)).clamp(0, 1)
    calibrate_guard(model, ModelSpec("tiny_cnn_test", {"width": 6, "num_classes": n_classes}), LAYERS,
                    [f"c{i}" for i in range(n_classes)], words, images, labels, out, attack_images=attack,
                    config=CalibrationConfig(method="ensemble", per_concept=3, target_fpr=0.1, batch_size=32))
    return images, attack
