"""A tiny `semguard train` run on synthetic images, for the kill-and-resume test (run as a subprocess)."""
import sys

import numpy as np
import torch
from semguard.models.trainer import TrainConfig, train_checkpoints
from semguard.models.fractalnet import FractalNetConfig

TINY = TrainConfig(model=FractalNetConfig(num_classes=4, widths=(4, 8), columns=2, dropout=(0.0, 0.1)),
                   epochs=6, checkpoint_every=1, batch_size=16, lr=0.05)


def synthetic(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = (rng.integers(0, 60, (n, 16, 16, 3)) + 50 * labels[:, None, None, None]).astype(np.uint8)
    return images, labels


if __name__ == "__main__":
    torch.set_num_threads(1)
    images, labels = synthetic()
    train_checkpoints(images, labels, sys.argv[1], TINY)
