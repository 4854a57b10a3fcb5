"""Readers of real image sets, on tiny fixtures written by the tests in the real formats."""
import numpy as np
import pytest
import torch
from PIL import Image

from semguard.subject.real_data import ImageFolder, read_cifar100_binary
from semguard.detector.layers import LayerTap, iter_activations
from semguard.models.worldnet import WorldNet


def test_cifar100_binary_records_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    fine, coarse = np.array([0, 99, 3, 42, 7]), np.array([4, 19, 0, 11, 2])
    records = np.concatenate(
        [coarse[:, None], fine[:, None], images.transpose(0, 3, 1, 2).reshape(5, -1)], axis=1
    ).astype(np.uint8)
    path = tmp_path / "test.bin"
    records.tofile(path)
    got = read_cifar100_binary(path)
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.labels, fine)
    np.testing.assert_array_equal(got.coarse, coarse)
    path.write_bytes(records.tobytes()[:-10])
    with pytest.raises(ValueError, match="whole number"):
        read_cifar100_binary(path)
    with pytest.raises(FileNotFoundError, match="no such"):
        read_cifar100_binary(tmp_path / "missing.bin")


def test_image_folder_feeds_the_chunked_tap(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / name / f"{j}.png")
    data = ImageFolder(tmp_path, size=32, resize=36)
    assert data.classes == ["cat", "dog"] and len(data) == 6
    image, label = data[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert 0.0 <= image.min() and image.max() <= 1.0
    tap = LayerTap(WorldNet().eval(), ["stem.2", "flatten"])
    chunks = list(iter_activations(tap, data, batch_size=4))
    assert [c[1].acts["flatten"].shape[0] for c in chunks] == [4, 2]
    with torch.no_grad():
        full = tap(torch.stack([data[i][0] for i in range(6)]))
    np.testing.assert_allclose(torch.cat([c[1].acts["stem.2"] for c in chunks]), full.acts["stem.2"], atol=1e-5)


def test_image_folder_reports_bad_files(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolder(tmp_path, size=32)[0]
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(tmp_path / "cat", size=32)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder .*dog: no image files"):
        ImageFolder(tmp_path, size=32)


def test_image_folder_suffixes_in_any_case(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "n01440764").mkdir()
    for name, fmt in (("a.PNG", "PNG"), ("b.JPG", "JPEG"), ("c.Jpeg", "JPEG"), ("d.jpeg", "JPEG"), ("e.png", "PNG")):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "n01440764" / name, fmt)
    (tmp_path / "n01440764" / ".DS_Store").write_bytes(b"\0")
    data = ImageFolder(tmp_path, size=16)
    assert [f.name for f, _ in data.samples] == ["a.PNG", "b.JPG", "c.Jpeg", "d.jpeg", "e.png"]
    assert all(data[i][0].shape == (3, 16, 16) for i in range(len(data)))
