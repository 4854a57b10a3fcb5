"""What every native attack shares: argument checks, the input gradient, and one L-inf step.

The step is written once, in ART's order of operations (ProjectedGradientDescentPyTorch:
step, clip to the valid range, project onto the eps ball around the clean image), so
every native attack that uses it reproduces ART bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Models take images in [0, 1] (ARCHITECTURE.md, Conventions); the valid input range every attack clips to.
CLIP_VALUES = (0.0, 1.0)


def check_positive(name: str, value: float) -> float:
    """`value` as a float, or ValueError naming `name` unless it is finite and > 0."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_count(name: str, value: float) -> int:
    """`value` as an int, or ValueError naming `name` unless it is a whole number >= 1."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def check_images_targets(images: torch.Tensor, targets: torch.Tensor) -> None:
    """images (B, C, H, W) float32 in [0, 1] without NaN; targets (B,) integer class ids >= 0."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.dtype != torch.float32:
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float32 tensor (B, C, H, W), got {got}")
    if images.isnan().any():
        raise ValueError("images contain NaN")
    if images.numel() and (images.min() < CLIP_VALUES[0] or images.max() > CLIP_VALUES[1]):
        raise ValueError(f"images must lie in {list(CLIP_VALUES)} (models normalise inside), "
                         f"got [{images.min().item():.4g}, {images.max().item():.4g}]")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor (B,), got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != images.shape[:1]:
        raise ValueError(f"targets must have shape ({images.shape[0]},) to match images, got {tuple(targets.shape)}")
    if targets.numel() and targets.min() < 0:
        raise ValueError("targets must be class ids >= 0")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Attack the model as it is served (batch-norm running stats, no dropout); restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class LossGradient(NamedTuple):
    grad: torch.Tensor  # (B, C, H, W) d mean-cross-entropy / dx, NaN replaced by 0
    logits: torch.Tensor  # (B, n_classes) the model's output at x (detached)


def loss_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, check_classes: bool = False) -> LossGradient:
    """d mean-cross-entropy(model(x), targets) / dx, and the logits it came from.

    The gradient is taken with respect to the input only (autograd.grad), so no weight
    gradient is computed: that is all ART's extra time (its loss.backward() fills every
    parameter's .grad). The mean over the batch is kept because ART uses it, and the
    1/B factor changes the rounding of the gradient.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        if check_classes and targets.numel() and int(targets.max()) >= logits.shape[1]:
            raise ValueError(f"targets must be class ids < {logits.shape[1]} (the model's classes), "
                             f"got {int(targets.max())}")
        loss = F.cross_entropy(logits, targets.long())
        (grad,) = torch.autograd.grad(loss, x)
    return LossGradient(torch.where(grad.isnan(), torch.zeros_like(grad), grad), logits.detach())  # ART: NaN -> 0


def linf_step(x: torch.Tensor, direction: torch.Tensor, x_clean: torch.Tensor, eps: float, step: float) -> torch.Tensor:
    """One L-inf step: x + step * sign(direction), clipped to [0, 1], projected onto the eps ball of x_clean.

    All (B, C, H, W). Order and arithmetic as ART's _apply_perturbation_pytorch then
    _projection: the clean image plus a delta clamped to [-eps, eps]. The delta is
    computed from the clipped image, so the result stays in [0, 1]; |result - x_clean|
    can exceed eps only by the float32 rounding of that last addition (< 1 ulp).
    """
    x = (x + step * direction.sign()).clamp(*CLIP_VALUES)
    return (x - x_clean).clamp(-eps, eps) + x_clean
