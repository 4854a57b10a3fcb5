"""`semguard world export --out DIR`: the embedded world as the real-format assets a user would have.

    DIR/test/<class>/NNNNN.png    the test split, one PNG per image in its class's folder; NNNNN is the
                                  image's index in the split, so ordering by file name (semguard.subject
                                  .images) gives back the split's order
    DIR/labels.txt                one class per line, in label order
    DIR/vectors.bin               the world's SkipGram vectors, word2vec binary
    DIR/worldnet.safetensors      WorldNet's weights (`--model worldnet --weights` loads them)
    DIR/subject.toml              the subject naming all of them (`--subject DIR/subject.toml`)

Every command run with `--subject DIR/subject.toml` goes through the real-asset loaders and gives
the figures it gives on the embedded world (tests/subject/test_export_equivalence.py). The folder
is written beside DIR under a staging name and renamed into place at the end: an interrupted or
failed export leaves nothing at DIR.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

IMAGES_DIR = "test"
FILES = {"labels": "labels.txt", "vectors": "vectors.bin", "weights": "worldnet.safetensors", "subject": "subject.toml"}


def export_world(out: str | Path, world_cache: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """Build (or reuse) the world in `world_cache` and export it to `out` (module docstring); returns `out`."""
    from semguard.world.build import WorldSettings, build_world

    _check_out(Path(out))  # before building a world (a minute) only to refuse the folder
    world = build_world(WorldSettings(seed=seed), world_cache, progress=progress)
    return write_world_assets(out, world.classes, world.test_images, world.test_labels, world.vectors_path,
                              world.model_path, progress)


def write_world_assets(out: str | Path, classes: Sequence[str], images: np.ndarray, labels: np.ndarray,
                       vectors_path: Path, model_path: Path, progress: bool = True) -> Path:
    """images: uint8 (N, H, W, 3), labels (N,) into `classes`; vectors_path: a word2vec binary;
    model_path: a WorldNet safetensors file. Staged beside `out`, renamed into place when complete."""
    out = Path(out)
    _check_out(out)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise ValueError(f"images: expected uint8 (N, H, W, 3) with one label each, got {images.dtype} {images.shape}")
    bad = [c for c in classes if not c or "," in c or "/" in c or c != c.strip()]
    if bad:
        raise ValueError(f"classes: names must be non-empty, without commas, slashes or outer spaces: {bad[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write_images(staging / IMAGES_DIR, classes, images, labels, progress)
        (staging / FILES["labels"]).write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
        shutil.copyfile(vectors_path, staging / FILES["vectors"])
        shutil.copyfile(model_path, staging / FILES["weights"])
        size = images.shape[1]
        (staging / FILES["subject"]).write_text(
            "# The embedded world as real-format assets (`semguard world export`); paths relative to this file.\n"
            f'model = "worldnet"\nweights = "{FILES["weights"]}"\nimages = "{IMAGES_DIR}"\n'
            f'labels = "{FILES["labels"]}"\nvectors = "{FILES["vectors"]}"\n'
            f"input_size = {size}  # the world's images are {size} x {size}: taken as they are\nresize = {size}\n",
            encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; remove it or name a new one")


def _write_images(root: Path, classes: Sequence[str], images: np.ndarray, labels: np.ndarray, progress: bool) -> None:
    width = max(5, len(str(len(images) - 1)))  # same-width numbers: name order = split order
    for name in classes:
        (root / name).mkdir(parents=True)
    for i in tqdm(range(len(images)), disable=not progress, desc="export images", leave=False):
        # PNG is lossless: the subject loader reads back exactly these pixels.
        Image.fromarray(images[i]).save(root / classes[int(labels[i])] / f"{i:0{width}d}.png", format="PNG",
                                        compress_level=1)
