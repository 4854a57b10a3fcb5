"""The one image convention of the project: float32 (N, 3, H, W) in [0, 1]; models normalise inside."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def as_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) (the world's format) -> float32 (N, 3, H, W) in [0, 1]; float32 (N, 3, H, W) passes."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255)
    x = torch.as_tensor(images)
    if x.dtype != torch.float32 or x.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, 3) or float32 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    return x


def _first_item(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate_images(items: list) -> torch.Tensor:
    return torch.stack([torch.as_tensor(_first_item(item)) for item in items])


def image_batches(images_or_dataset: torch.Tensor | Dataset, batch_size: int, num_workers: int = 0
                  ) -> Iterator[torch.Tensor]:
    """(b, C, H, W) batches of a tensor (N, C, H, W), or of a Dataset yielding images or (image, label) (a
    DataLoader, in order; with `num_workers`, decoding runs in worker processes): the one batching loop
    that tapping and prediction share."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if isinstance(images_or_dataset, torch.Tensor):
        source = images_or_dataset
        return (source[i : i + batch_size] for i in range(0, len(source), batch_size))
    if isinstance(images_or_dataset, Dataset):
        return iter(DataLoader(images_or_dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                               collate_fn=_collate_images))
    raise ValueError(
        f"images_or_dataset: expected a torch.Tensor (N, C, H, W) or a torch Dataset, "
        f"got {type(images_or_dataset).__name__}"
    )


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor | Dataset, batch_size: int = 256,
            device: torch.device | str | None = None, num_workers: int = 0) -> np.ndarray:
    """Predicted class (N,) int64, in batches, on the model's device unless `device` is given. images: an
    array or tensor in either format of `as_model_input`, or a Dataset (an ImageSet, a Subset of one:
    read batch by batch, by `num_workers` DataLoader workers when given)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(images, Dataset):
        batches = image_batches(images, batch_size, num_workers)
    else:
        batches = (as_model_input(images[start : start + batch_size]) for start in range(0, len(images), batch_size))
    out = [model(batch.to(device)).argmax(1).cpu() for batch in batches]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """(B, H, W, C) -> same shape, each image translated by up to max_shift pixels (edges replicated)."""
    if max_shift == 0:
        return images
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    oy, ox = rng.integers(0, 2 * max_shift + 1, (2, b))
    rows = (oy[:, None] + np.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + np.arange(w))[:, None, :]  # (B, 1, W)
    return padded[np.arange(b)[:, None, None], rows, cols]
