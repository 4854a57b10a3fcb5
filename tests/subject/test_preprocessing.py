"""The preprocessing a subject actually uses (issue 25): an entry-point model given no input size takes
images that all share one size as they are; every subject records its input size, resize and
normalisation, and the header shows them with the model's accuracy, warning when it is low."""
import sys

import numpy as np
import pytest

from semguard.subject.core import SubjectSpec, load_subject
from semguard.subject.header import ACCURACY_WARNING, render_subject_header, subject_header
from tests.subject.fixtures import write_image, write_vectors

CIFAR_NET = '''
import torch
from torch import nn

class Cifar32(nn.Module):
    """A Keras-style CIFAR net: flattens its 32 x 32 input, so any other size is a shape error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 32 * 32, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))

def raw():
    return Cifar32(), (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)   # takes 0..255 pixels, as the issue's
'''
CLASSES = ("tench", "goldfish", "hammerhead")  # in fixtures.VOCABULARY


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """Three 32 x 32 photos per class in class folders, the vectors, and the entry point on the path."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (tmp_path / "photos" / c).mkdir(parents=True)
        for k in range(3):
            write_image(tmp_path / "photos" / c / f"{c}_{k}.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    write_vectors(tmp_path)
    name = f"cifar_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(CIFAR_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, f"{name}:raw"
    sys.modules.pop(name, None)


def spec(root, entry, **more) -> SubjectSpec:
    return SubjectSpec(model_entry=entry, images=root / "photos", vectors=root / "vectors.bin",
                       world_cache=root / "cache", **more)


def test_an_entry_point_without_input_size_takes_32_pixel_photos_as_they_are(photos, capsys):
    root, entry = photos
    subject = load_subject(spec(root, entry), progress=False)  # was: fails on a (1, 3, 224, 224) image
    how = subject.preprocessing
    assert (how.input_size, how.resize) == (32, 32) and how.decided_by == "the images' common size 32 x 32 (no resize)"
    assert how.mean == (0.0, 0.0, 0.0) and how.std == pytest.approx((1 / 255,) * 3, rel=1e-5)
    assert subject.images.load(np.arange(2)).shape == (2, 3, 32, 32)
    assert (f"--model-entry {entry}: no input_size given; taken at the images' common size 32 x 32 (no resize)"
            in capsys.readouterr().err)


def test_images_of_several_sizes_keep_the_default_and_say_so_in_one_line(photos, capsys):
    root, entry = photos
    write_image(root / "photos" / "tench" / "tench_big.png", np.zeros((40, 48, 3), np.uint8))
    with pytest.raises(ValueError, match=r"fails on a \(1, 3, 224, 224\) image.*\(set input_size / resize\)"):
        load_subject(spec(root, entry), progress=False)
    lines = [l for l in capsys.readouterr().err.splitlines() if "no input_size given" in l]
    assert lines == [f"--model-entry {entry}: no input_size given; taken at ImageNet's 224 of 256: the images "
                     "differ in size (set input_size / resize)"]


def test_input_size_alone_keeps_the_imagenet_ratio_and_the_header_says_so(photos):
    """The issue's silent run: input_size 32 alone zooms each 32-pixel photo to 36 and crops it; the
    header now shows that resize and the accuracy it gave, with a warning below ACCURACY_WARNING."""
    root, entry = photos
    subject = load_subject(spec(root, entry, input_size=32), progress=False)
    assert (subject.preprocessing.input_size, subject.preprocessing.resize) == (32, 36)
    labels = np.asarray(subject.images.labels)
    wrong = (labels + 1) % 3
    wrong[:4] = labels[:4]  # 4 of 9 right: 0.444
    header = subject_header(subject, labels, wrong)
    lines = render_subject_header(header)
    assert lines[0] == f"subject: {entry}"
    assert "32 x 32 centre crop of the short side resized to 36 (bilinear)" in lines[1]
    assert "size from input_size (resize keeps" in lines[1] and "normalised with mean (0, 0, 0)" in lines[1]
    assert lines[2:5] == ["  classes        3 of 3 have a word vector", "  images         9 read, 0 skipped (unreadable)",
                          "  top-1 accuracy 0.444 on the 9 images analysed"]
    assert lines[5] == (f"  WARNING: top-1 accuracy 0.444 is below {ACCURACY_WARNING}: check the preprocessing "
                        "(input_size, resize, mean, std) before reading the results")
    right = render_subject_header(subject_header(subject, labels, labels))
    assert "top-1 accuracy 1.000 on the 9 images analysed" in right[-1] and not any("WARNING" in l for l in right)


def test_the_embedded_world_states_its_preprocessing(tmp_path):
    from semguard.models.worldnet import WORLD_MEAN, WORLD_STD
    from tests.analysis.test_reproduce import small_world_subject

    class Inputs:  # world_subject's inputs, from the small stand-in
        s = small_world_subject(SubjectSpec())
        model, word_vectors = s.model, s.word_vectors
        world = type("W", (), {"classes": s.classes, "test_images": s.images.images, "test_labels": s.images.labels,
                               "model_path": tmp_path / "w.safetensors"})

    from semguard.subject.core import world_subject

    how = world_subject(inputs=Inputs).preprocessing
    assert (how.input_size, how.resize, how.mean, how.std) == (16, None, WORLD_MEAN, WORLD_STD)
    assert "16 x 16, images as stored; normalised with mean (0.5, 0.5, 0.5)" in render_subject_header(
        subject_header(world_subject(inputs=Inputs)))[1]
