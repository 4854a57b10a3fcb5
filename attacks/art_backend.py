"""ART (adversarial-robustness-toolbox) glue: wrap a [0, 1]-input PyTorch model as ART's classifier.

ART is the reference implementation of MI-FGSM; it is imported lazily because importing
it costs seconds and the native path does not need it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from semguard.attacks.common import CLIP_VALUES


def num_classes(model: nn.Module, images: torch.Tensor) -> int:
    """Number of logits the model gives, from one image."""
    with torch.no_grad():
        return int(model(images[:1]).shape[1])


def make_classifier(model: nn.Module, images: torch.Tensor):
    """ART PyTorchClassifier for `model` on inputs shaped like images (B, C, H, W), clip values [0, 1].

    Loss: cross-entropy on the logits (mean over the batch), as the native attacks use.
    """
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(images.shape[1:]),
        nb_classes=num_classes(model, images),
        clip_values=CLIP_VALUES,
        device_type="gpu" if images.is_cuda else "cpu",
    )


def run_art_attack(attack, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """attack.generate on numpy copies; the result back as a tensor on the images' device."""
    x = images.detach().cpu().numpy().astype(np.float32)
    y = targets.detach().cpu().numpy().astype(np.int64)
    return torch.from_numpy(attack.generate(x=x, y=y)).to(images.device)
