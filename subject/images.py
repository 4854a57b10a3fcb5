"""A subject's labelled images: an ImageNet-style folder, CIFAR-100's binary distribution, or a CSV.

    source = scan_images(Path("imagenet/val"), classes)          # files found, checked, labelled
    images = source.image_set(Transform(224, 256))               # ImageSet: decoded on demand

Formats (`--images`):

- ImageNet-style folder: one sub-folder per class, named by the class's WordNet id
  (n01440764, mapped through the labels file), its index ("0") or one of its names ("tench",
  "aquarium_fish" = "aquarium fish"; case ignored; a name two classes share must be an id or index). Image suffixes in any case (.JPEG, .png).
  Images are ordered by file name across the class folders (ties: folder name), so an ImageNet
  val folder keeps the val order and an exported world (`semguard world export`) its test order.
- CIFAR-100 binary: `test.bin` / `train.bin`, or the cifar-100-binary folder (test.bin used);
  memory-mapped, never the python distribution (a pickle).
- A CSV of `file,label` rows (a header row allowed), given as the file or as a flat folder
  holding one .csv; files relative to the CSV's folder; label = a class name, id or index.

Every image file is opened and decoded once when the set is scanned (JPEGs at reduced scale),
so a corrupt, truncated, 0-byte or missing file is reported on stderr with a count and skipped
up front, never a crash half-way through a run. Non-RGB images (RGBA, LA, palette, grayscale,
CMYK) are converted to RGB: grayscale replicated, alpha dropped (not composited).
"""
from __future__ import annotations

import csv
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from semguard.subject.real_data import image_files, read_cifar100_binary, resize_center_crop
from semguard.detector.words import CIFAR100_CLASSES
from semguard.subject.core import ImageSet
from semguard.subject.labels import ClassList, builtin_classes

_WNID = re.compile(r"^n\d{8}$")
_HEADER_CELLS = {"file", "filename", "path", "image", "name", "file_name"}
_THREADS = max(1, min(8, os.cpu_count() or 1))  # PIL decodes without the GIL
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
MAX_LISTED = 5  # file names shown in a skip report


@dataclass(frozen=True)
class Transform:
    """Evaluation transform: short side to `resize`, centre crop `size`; `interpolation` a PIL filter name."""

    size: int
    resize: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 1 or self.resize < self.size:
            raise ValueError(f"input_size, resize: need 1 <= input_size <= resize, got {self.size}, {self.resize}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation: expected one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 (size, size, 3)."""
        return resize_center_crop(img, self.size, self.resize, _RESAMPLE[self.interpolation])


def _to_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    if not pixels:
        return torch.zeros(0, 3, 0, 0)
    return torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).copy()).float().div_(255)  # (n, 3, H, W)


class FileImages(ImageSet):
    """ImageSet over image files, decoded on demand (only the requested images are ever in memory)."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, transform: Transform, skipped: tuple[str, ...] = ()):
        self.files, self.labels, self.transform, self.skipped = list(files), np.asarray(labels, np.int64), transform, skipped

    def _read(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"image {path}: cannot be read ({error}); it could be when the set was scanned") from None

    def load(self, indices: np.ndarray) -> torch.Tensor:
        """float32 (n, 3, size, size) in [0, 1], in the order of `indices`."""
        paths = [self.files[i] for i in np.asarray(indices, np.int64).reshape(-1)]
        with ThreadPoolExecutor(_THREADS) as pool:
            return _to_tensor(list(pool.map(self._read, paths)))


class CifarImages(ImageSet):
    """ImageSet over memory-mapped CIFAR records (uint8 (N, 32, 32, 3)), transformed on demand."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform):
        self.images, self.labels, self.transform, self.skipped = images, np.asarray(labels, np.int64), transform, ()

    def load(self, indices: np.ndarray) -> torch.Tensor:
        rows = self.images[np.asarray(indices, np.int64).reshape(-1)]  # (n, 32, 32, 3)
        return _to_tensor([self.transform(Image.fromarray(np.ascontiguousarray(r))) for r in rows])


@dataclass(frozen=True)
class ImageSource:
    """What scanning found: the images (files, or CIFAR pixels), their labels, the class list."""

    path: Path
    kind: str  # "folder", "csv", "cifar"
    items: Sequence[Path] | np.ndarray
    labels: np.ndarray  # (N,) int64 into classes
    classes: ClassList
    skipped: tuple[str, ...]
    common_size: tuple[int, int] | None = None  # (width, height) every image has, None when they differ

    def image_set(self, transform: Transform) -> FileImages | CifarImages:
        if self.kind == "cifar":
            return CifarImages(self.items, self.labels, transform)
        return FileImages(self.items, self.labels, transform, self.skipped)


def scan_images(path: str | Path, classes: ClassList | None = None, progress: bool = True) -> ImageSource:
    """Find, label and check the images at `path` (module docstring); `classes` from --labels, or None
    to take the class names from the images (folder names, CIFAR-100's, the CSV's labels)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--images {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return _scan_csv(path, classes, progress)
        if path.suffix.lower() == ".bin":
            return _scan_cifar(path, classes)
        raise ValueError(f"--images {path}: a file must be a .csv (file,label) or a CIFAR-100 .bin")
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if folders:
        return _scan_folder(path, folders, classes, progress)
    for name in ("test.bin", "train.bin"):
        if (path / name).is_file():
            return _scan_cifar(path / name, classes)
    tables = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if len(tables) == 1:
        return _scan_csv(tables[0], classes, progress)
    raise ValueError(f"--images {path}: expected class sub-folders, a cifar-100-binary folder (test.bin) or a flat "
                     f"folder with one .csv of file,label ({len(tables)} .csv files found)")


# --------------------------------------------------------------------------- class names -> indices


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower())


def class_lookup(classes: ClassList) -> Callable[[str], int | None]:
    """name -> class index: an id, then any synonym (case and _/space ignored), then a plain index.
    A name two classes share (ImageNet's two "crane") resolves to neither: a ValueError naming the
    classes' indices and ids, which do resolve."""
    ids = {wnid: i for i, wnid in enumerate(classes.ids) if wnid is not None}
    names: dict[str, list[int]] = {}
    for i, synonyms in enumerate(classes.synonyms):
        for key in {_key(s) for s in synonyms}:
            names.setdefault(key, []).append(i)
    where = f"the labels file {classes.path}" if classes.path else "the class list"

    def lookup(name: str) -> int | None:
        if name in ids:
            return ids[name]
        found = names.get(_key(name), [])
        if len(found) == 1:
            return found[0]
        if name.isdigit() and int(name) < len(classes.synonyms):
            return int(name)
        if found:
            alias = ", ".join(classes.ids[i] or str(i) for i in found)
            raise ValueError(f"{name!r} names {len(found)} classes of {where} (indices {found}); name the folder or "
                             f"label by one of their ids or indices instead: {alias}")
        return None

    return lookup


def _named_lookup(path: Path, lookup: Callable[[str], int | None]) -> Callable[[str], int | None]:
    def named(name: str) -> int | None:
        try:
            return lookup(name)
        except ValueError as error:
            raise ValueError(f"--images {path}: {error}") from None

    return named


def _missing_classes(path: Path, names: list[str], classes: ClassList) -> ValueError:
    where = f"the labels file {classes.path}" if classes.path else "the class list"
    return ValueError(f"--images {path}: {len(names)} class(es) not in {where}: {names[:MAX_LISTED]}"
                      f"{' ...' if len(names) > MAX_LISTED else ''}")


# --------------------------------------------------------------------------- the three formats


def _scan_folder(path: Path, folders: list[Path], classes: ClassList | None, progress: bool) -> ImageSource:
    if classes is None:
        wnids = [f.name for f in folders if _WNID.match(f.name)]
        if wnids:
            raise ValueError(f"--images {path}: class folders are WordNet ids ({wnids[0]}, ...); give --labels "
                             "(e.g. LOC_synset_mapping.txt) to name them")
        classes = builtin_classes([f.name for f in folders])
    lookup = _named_lookup(path, class_lookup(classes))
    index = {f: lookup(f.name) for f in folders}
    missing = [f.name for f, i in index.items() if i is None]
    if missing:
        raise _missing_classes(path, missing, classes)
    samples = sorted(((f.name, folder.name, f, index[folder]) for folder in folders for f in image_files(folder)))
    if not samples:
        raise ValueError(f"--images {path}: no image files in its class folders")
    return _checked(path, "folder", [s[2] for s in samples], [s[3] for s in samples], classes, (), progress)


def _scan_csv(table: Path, classes: ClassList | None, progress: bool) -> ImageSource:
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"--images {table}: cannot read the CSV: {error}") from None
    if rows and rows[0][1][0].strip().lower() in _HEADER_CELLS:
        rows = rows[1:]
    bad = [n for n, r in rows if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad or not rows:
        raise ValueError(f"--images {table}: expected rows of file,label; line {bad[0] if bad else 1} is not one")
    if classes is None:
        names = sorted({r[1].strip() for _, r in rows})
        if all(n.isdigit() for n in names):
            raise ValueError(f"--images {table}: labels are class indices; give --labels to name the classes")
        classes = builtin_classes(names)
    lookup = _named_lookup(table, class_lookup(classes))
    labels = [lookup(r[1].strip()) for _, r in rows]
    missing = sorted({r[1].strip() for (_, r), i in zip(rows, labels) if i is None})
    if missing:
        raise _missing_classes(table, missing, classes)
    files = [table.parent / r[0].strip() for _, r in rows]
    absent = tuple(f"{f.name} (missing)" for f in files if not f.is_file())
    kept = [(f, i) for f, i in zip(files, labels) if f.is_file()]
    return _checked(table, "csv", [f for f, _ in kept], [i for _, i in kept], classes, absent, progress)


def _scan_cifar(file: Path, classes: ClassList | None) -> ImageSource:
    try:
        data = read_cifar100_binary(file, mmap=True)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"--images {file}: {error}") from None
    classes = classes or builtin_classes(CIFAR100_CLASSES)
    if len(classes.synonyms) != len(CIFAR100_CLASSES):
        raise ValueError(f"--images {file}: CIFAR-100 has 100 classes, the labels file {classes.path} lists "
                         f"{len(classes.synonyms)}")
    return ImageSource(file, "cifar", data.images, data.labels, classes, (), (32, 32))


# --------------------------------------------------------------------------- checking files


def check_image(path: Path) -> tuple[str | None, str, tuple[int, int] | None]:
    """(problem or None, mode, (width, height)) after decoding `path` once (JPEG at reduced scale:
    truncation still shows; the size is the file's, read before the reduction)."""
    try:
        if path.stat().st_size == 0:
            return "0 bytes", "", None
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            img.draft("RGB", (64, 64))
            img.load()
        return None, mode, size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return str(error).splitlines()[0][:80] or type(error).__name__, "", None


def _checked(path: Path, kind: str, files: list[Path], labels: list[int], classes: ClassList,
             skipped: tuple[str, ...], progress: bool) -> ImageSource:
    with ThreadPoolExecutor(_THREADS) as pool:
        checks = list(tqdm(pool.map(check_image, files), total=len(files), disable=not progress,
                           desc="checking images", leave=False))
    skipped += tuple(f"{f.name} ({problem})" for f, (problem, _, _) in zip(files, checks) if problem)
    keep = [i for i, (problem, _, _) in enumerate(checks) if not problem]
    if skipped:
        print(f"--images {path}: skipped {len(skipped)} unreadable image file(s): "
              f"{', '.join(skipped[:MAX_LISTED])}{' ...' if len(skipped) > MAX_LISTED else ''}", file=sys.stderr)
    modes = Counter(checks[i][1] for i in keep if checks[i][1] != "RGB")
    if modes:
        print(f"--images {path}: converted {sum(modes.values())} non-RGB image(s) to RGB "
              f"({', '.join(f'{m} {n}' for m, n in sorted(modes.items()))}; alpha dropped)", file=sys.stderr)
    if not keep:
        raise ValueError(f"--images {path}: none of its {len(files)} image files could be read")
    sizes = {checks[i][2] for i in keep}
    return ImageSource(path, kind, [files[i] for i in keep], np.asarray([labels[i] for i in keep], np.int64),
                       classes, skipped, sizes.pop() if len(sizes) == 1 else None)
