"""Real-format subject assets in a tmp folder, small enough for tests (about a second to write).

    assets = write_subject_assets(tmp_path)
    subprocess.run(["semguard", "analyze", "two-vs-two", *assets.flags(), "--out", out])
    spec = subject_spec_from_args(...)  # or SubjectSpec(**assets.spec_kwargs())

What is written (the formats users have):
    weights/resnet18-6cls.pth      torchvision resnet18 state dict (torch.save), 6 classes: random weights, the
                                   head fitted so that it classifies every image of the folder correctly
    val/<wnid>/ILSVRC2012_val_000000NN.<JPEG|png|jpg|PNG>   ImageNet-style folder, mixed-case suffixes
    LOC_synset_mapping.txt         "n01440764 tench, Tinca tinca" lines; one class ("tiger shark") has
                                   no vector under any synonym, two match only by a later synonym
    vectors.bin                    word2vec binary (gensim), 16 dimensions
    vectors.glove.txt              the same vectors as GloVe text (no header line)
    subject.toml                   the subject file naming all of them (relative paths)
The model takes 64 x 64 crops of 72 (input_size / resize): fast on a CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

CLASSES = [  # (wnid, synonyms): ImageNet's first classes, as LOC_synset_mapping.txt writes them
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),  # no vector: left out of the semantic analyses
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
]
VOCABULARY = ["tench", "goldfish", "white_shark", "hammerhead", "crampfish",  # what the classes match
              "the", "fish", "water", "sea", "river", "net", "boat", "fin", "tail", "scale", "swim", "reef"]
UNMATCHED = "tiger shark"
SUFFIXES = (".JPEG", ".png", ".jpg", ".PNG")  # ImageNet's upper-case JPEG among the usual ones
INPUT_SIZE, RESIZE = 64, 72
DIM = 16
# The [study] tables of a study small enough for a test (`semguard reproduce`): format with image_sets.
SMALL_STUDY = """
[study]
reference_size = 4
[study.two_vs_two]
image_sets = {image_sets}
n_permutations = 10
device = "cpu"
[study.attack]
n_sources = 2
targets_per_source = 2
iterations = 3
"""


class SubjectAssets(NamedTuple):
    root: Path
    weights: Path
    images: Path
    labels: Path
    vectors: Path  # word2vec binary
    glove: Path  # GloVe text, same vectors
    toml: Path
    n_classes: int
    per_class: int

    def flags(self, vectors: Path | None = None) -> list[str]:
        """The subject as command-line flags (absolute paths)."""
        return ["--model", "resnet18", "--weights", str(self.weights), "--images", str(self.images),
                "--labels", str(self.labels), "--vectors", str(vectors or self.vectors),
                "--input-size", str(INPUT_SIZE), "--resize", str(RESIZE)]

    def spec_kwargs(self) -> dict:
        """SubjectSpec keyword arguments for the same subject (add world_cache=tmp to keep caches in tmp)."""
        return {"model": "resnet18", "weights": self.weights, "images": self.images, "labels": self.labels,
                "vectors": self.vectors, "input_size": INPUT_SIZE, "resize": RESIZE}


def write_image(path: Path, pixels: np.ndarray) -> None:
    """uint8 (H, W, 3) as the format its suffix names (JPEG for .jpg/.jpeg in any case, else PNG)."""
    from PIL import Image

    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def write_vectors(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """VOCABULARY's vectors (DIM) as a word2vec binary and as GloVe text; (binary, glove)."""
    from gensim.models import KeyedVectors

    vectors = np.random.default_rng(seed).standard_normal((len(VOCABULARY), DIM)).astype(np.float32)
    kv = KeyedVectors(DIM)
    kv.add_vectors(VOCABULARY, vectors)
    binary, glove = root / "vectors.bin", root / "vectors.glove.txt"
    kv.save_word2vec_format(str(binary), binary=True)
    glove.write_text("".join(f"{w} {' '.join(f'{v:.6f}' for v in row)}\n" for w, row in zip(VOCABULARY, vectors)))
    return binary, glove


def _fitted_resnet18(images: Path, seed: int):
    """resnet18 with random weights whose head is fitted (least squares) to the images' classes, so
    it classifies every image correctly: attacks and the guard's calibration need correct images."""
    import torchvision

    from semguard.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalized
    from semguard.subject.images import Transform, scan_images
    from semguard.subject.labels import builtin_classes

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    source = scan_images(images, builtin_classes([wnid for wnid, _ in CLASSES]), progress=False)
    x = source.image_set(Transform(INPUT_SIZE, RESIZE)).load(np.arange(len(source.labels)))  # (N, 3, 64, 64)
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = Normalized(model, IMAGENET_MEAN, IMAGENET_STD)(x).double()  # (N, 512)
        design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
        target = 10.0 * torch.nn.functional.one_hot(torch.from_numpy(source.labels), len(CLASSES)).double()
        w = torch.linalg.lstsq(design, target).solution  # (513, C)
        head.weight.copy_(w[:-1].T.float())
        head.bias.copy_(w[-1].float())
    model.fc = head
    return model


def write_subject_assets(root: str | Path, per_class: int = 5, seed: int = 0) -> SubjectAssets:
    """Write the assets of the module docstring under `root` (created); per_class images per class."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = root / "LOC_synset_mapping.txt"
    labels.write_text("".join(f"{wnid} {names}\n" for wnid, names in CLASSES))

    images = root / "val"
    number = 0
    for k in range(per_class):  # val numbering interleaves the classes, as ImageNet's does
        for c, (wnid, _) in enumerate(CLASSES):
            number += 1
            folder = images / wnid
            folder.mkdir(parents=True, exist_ok=True)
            h, w = 80 + 8 * (k % 2), 96  # not square: the resize and the crop both act
            base = np.array([40 * c % 256, 255 - 37 * c % 256, 90 + 25 * c], np.float64)
            pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            write_image(folder / f"ILSVRC2012_val_{number:08d}{SUFFIXES[number % len(SUFFIXES)]}", pixels)

    weights = root / "weights" / "resnet18-6cls.pth"
    weights.parent.mkdir()
    torch.save(_fitted_resnet18(images, seed).state_dict(), weights)
    vectors, glove = write_vectors(root, seed)
    toml = root / "subject.toml"
    toml.write_text(f'model = "resnet18"\nweights = "weights/{weights.name}"\nimages = "val"\n'
                    f'labels = "{labels.name}"\nvectors = "{vectors.name}"\n'
                    f"input_size = {INPUT_SIZE}\nresize = {RESIZE}\n")
    return SubjectAssets(root, weights, images, labels, vectors, glove, toml, len(CLASSES), per_class)
