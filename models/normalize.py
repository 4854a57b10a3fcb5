"""Input normalisation inside the model, so every model the project uses takes [0, 1] images.

Attacks clip to [0, 1] and the guard receives raw pixels; neither should know a
model's mean and std. Wrap a torchvision classifier once:

    model = imagenet_classifier("resnet50", "resnet50-0676ba61.pth")   # images (B, 3, H, W) in [0, 1]
    tap = LayerTap(model, preset_layers("resnet50"))                 # preset names work on the wrapper
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from semguard.detector.layers import build_torchvision_model

# torchvision's ImageNet statistics (the transforms of every IMAGENET1K weight set).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """`model((images - mean) / std)` per channel; images (B, C, H, W) in [0, 1].

    `tap_prefix` tells `detector.layers.LayerTap` that node names of the inner model
    ("layer1.0.relu") can be used without the wrapper's "model." prefix.
    """

    tap_prefix = "model."

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean, std: expected equal non-empty per-channel sequences, got {list(mean)}, {list(std)}")
        if not torch.all(std_t > 0):
            raise ValueError(f"std: every entry must be > 0, got {std_t.tolist()}")
        self.model = model
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))  # (1, C, 1, 1)
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def imagenet_classifier(
    arch: str, weights_path: str | Path | None = None, num_classes: int = 1000, **model_kwargs
) -> Normalized:
    """A torchvision ImageNet classifier (eval mode) taking [0, 1] images; weights from a local file."""
    model = build_torchvision_model(arch, weights_path, num_classes, **model_kwargs)
    return Normalized(model, IMAGENET_MEAN, IMAGENET_STD).eval()
