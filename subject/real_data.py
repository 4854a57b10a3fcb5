"""Readers for the real image sets the paper used, from paths the user gives (nothing downloads).

CIFAR-100 is read from its *binary* distribution (cifar-100-binary: fixed-size records), never
from the python one, which is a pickle. ImageNet-style folders (one sub-folder per class) are
read with PIL, resized and centre-cropped as torchvision's evaluation transforms do.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

CIFAR_RECORD = 2 + 32 * 32 * 3  # coarse label byte, fine label byte, 3 planes of 32x32 pixels
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}  # compared lower-cased: .JPEG, .PNG, .Jpg count


class LabelledImages(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # (N,) int64 fine labels, CIFAR-100 order (detector.words.CIFAR100_CLASSES)
    coarse: np.ndarray  # (N,) int64 superclass labels


def read_cifar100_binary(path: str | Path, mmap: bool = False) -> LabelledImages:
    """One file of cifar-100-binary (`train.bin` or `test.bin`); `mmap`: images stay on disk, read on use."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"path {path}: no such CIFAR-100 binary file (train.bin / test.bin)")
    size = Path(path).stat().st_size
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap and size else np.fromfile(Path(path), dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise ValueError(f"path {path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-100 records")
    records = raw.reshape(-1, CIFAR_RECORD)
    if records[:, 1].max() >= 100 or records[:, 0].max() >= 20:
        raise ValueError(f"path {path}: labels out of range for CIFAR-100 (is it CIFAR-10?)")
    images = records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    images = images if mmap else np.ascontiguousarray(images)
    return LabelledImages(images, records[:, 1].astype(np.int64), records[:, 0].astype(np.int64))


def resize_center_crop(img: Image.Image, size: int, resize: int, resample: int = Image.BILINEAR) -> np.ndarray:
    """torchvision's evaluation transform on an RGB PIL image: short side to `resize`, centre crop
    `size` -> uint8 (size, size, 3). An image already at the right short side is not resampled."""
    scale = resize / min(img.size)
    if scale != 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)).convert("RGB"), dtype=np.uint8)


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, by suffix in any case, sorted by name."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolder(Dataset):
    """root/<class>/<image>: (float32 (3, size, size) in [0, 1], class index); classes sorted by name.

    Resize the short side to `resize`, then centre-crop `size` (224/256 for ResNet-50 and
    VGG-16, 299/342 for Inception-v3). A class folder without image files, or a root without class
    folders, raises ValueError naming it; an unreadable file raises ValueError naming the file.
    """

    def __init__(self, root: str | Path, size: int = 224, resize: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root {self.root}: not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"root {self.root}: no class sub-folders (expected root/<class>/<image>)")
        self.samples = []
        for label, name in enumerate(self.classes):
            files = image_files(self.root / name)
            if not files:
                raise ValueError(f"class folder {self.root / name}: no image files ({sorted(IMAGE_SUFFIXES)}, any case)")
            self.samples += [(f, label) for f in files]
        self.size, self.resize = size, resize or round(size * 8 / 7)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                pixels = resize_center_crop(img.convert("RGB"), self.size, self.resize)
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"image {path}: cannot be read ({err})") from None
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float().div_(255), label
