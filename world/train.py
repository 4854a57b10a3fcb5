"""Train and evaluate WorldNet on the world's images (CPU, seeded, with a progress bar)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from semguard.models.inputs import as_model_input, predict, random_shift
from semguard.models.worldnet import WorldNet, WorldNetConfig


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.1  # peak SGD learning rate, reached after a short warm-up
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1  # of all steps; then cosine decay to zero
    max_shift: int = 3  # random translation in pixels (position is a nuisance in the world): less overfitting


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> model input, channels-last in memory (faster convs on CPU)."""
    return as_model_input(images).contiguous(memory_format=torch.channels_last)


def _lr_at(step: int, total: int, s: TrainSettings) -> float:
    warm = max(1, int(s.warmup_fraction * total))
    if step < warm:
        return s.lr * (step + 1) / warm
    return 0.5 * s.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_worldnet(images: np.ndarray, labels: np.ndarray, num_classes: int, settings: TrainSettings,
                   seed: int, progress: bool = True) -> WorldNet:
    """Train a fresh WorldNet on (N, H, W, 3) uint8 images; returns it in eval mode."""
    torch.manual_seed(seed)
    model = WorldNet(WorldNetConfig(num_classes=num_classes)).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, nesterov=True,
                          weight_decay=settings.weight_decay)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    shift_rng = np.random.default_rng([seed, 7])
    steps_per_epoch = math.ceil(len(labels) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    bar = tqdm(total=total, desc="train worldnet", disable=not progress, unit="step")
    model.train()
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(len(labels), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            x, y = to_tensor(random_shift(images[idx.numpy()], settings.max_shift, shift_rng)), y_all[idx]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, settings)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images) == np.asarray(labels)).mean())
