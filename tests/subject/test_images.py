"""Labelled images: ImageNet-style folders, CSV, CIFAR-100 binary; bad files skipped and counted."""
import numpy as np
import pytest
import torch
from PIL import Image

from semguard.subject.images import Transform, scan_images
from semguard.subject.labels import read_labels
from tests.subject.fixtures import write_image


def solid(value: int, h: int = 12, w: int = 16) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


@pytest.fixture
def folder(tmp_path):
    """Two wnid class folders, suffixes in mixed case, val-style names that interleave the classes."""
    root = tmp_path / "val"
    first, second = "n01440764", "n01443537"
    for name, wnid, value in [("v_3.JPEG", second, 30), ("v_1.png", first, 10), ("v_2.jpg", second, 20),
                              ("v_4.PNG", first, 40)]:
        (root / wnid).mkdir(parents=True, exist_ok=True)
        write_image(root / wnid / name, solid(value))
    (root / first / "notes.txt").write_text("not an image")  # not an image suffix: not listed
    labels = tmp_path / "labels.txt"
    labels.write_text(f"{first} first, one\n{second} second\n")
    return root, labels


def test_folder_by_wnid_in_file_name_order(folder):
    root, labels = folder
    source = scan_images(root, read_labels(labels), progress=False)
    assert [f.name for f in source.items] == ["v_1.png", "v_2.jpg", "v_3.JPEG", "v_4.PNG"]  # across folders
    assert source.labels.tolist() == [0, 1, 1, 0] and source.skipped == ()
    images = source.image_set(Transform(8, 8)).load(np.array([3, 0]))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert abs(float(images[0].mean()) - 40 / 255) < 0.02 and abs(float(images[1].mean()) - 10 / 255) < 1e-6


def test_folder_names_as_class_names_without_labels(tmp_path):
    for name in ("tabby cat", "aquarium_fish"):
        (tmp_path / name).mkdir()
        write_image(tmp_path / name / "a.png", solid(5))
    source = scan_images(tmp_path, None, progress=False)
    assert source.classes.names == ["aquarium_fish", "tabby cat"] and source.labels.tolist() == [0, 1]


def test_folder_class_missing_from_labels_names_both_files(folder, tmp_path):
    root, labels = folder
    (root / "n09999999").mkdir()
    with pytest.raises(ValueError, match=rf"--images {root}: 1 class\(es\) not in the labels file {labels}: \['n09999999'\]"):
        scan_images(root, read_labels(labels), progress=False)
    with pytest.raises(ValueError, match=r"WordNet ids .* give --labels"):
        scan_images(root, None, progress=False)


def test_bad_files_skipped_with_a_count_and_rgba_converted(folder, capsys):
    root, labels = folder
    (root / "n01440764" / "v_5.JPEG").write_bytes(b"")  # 0 bytes
    (root / "n01440764" / "v_6.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rgba = np.zeros((12, 16, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 0  # fully transparent: the colour is kept, alpha dropped
    Image.fromarray(rgba, "RGBA").save(root / "n01443537" / "v_7.png")
    source = scan_images(root, read_labels(labels), progress=False)
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image file(s): v_5.JPEG (0 bytes), v_6.jpg" in err
    assert "converted 1 non-RGB image(s) to RGB (RGBA 1; alpha dropped)" in err
    assert len(source.labels) == 5 and len(source.skipped) == 2
    pixels = source.image_set(Transform(8, 8)).load(np.array([4]))
    assert pixels.shape == (1, 3, 8, 8) and abs(float(pixels.mean()) - 200 / 255) < 1e-6


def test_csv_with_header_relative_files_and_a_missing_one(tmp_path, capsys):
    for name, value in (("a.png", 1), ("b.jpg", 2)):
        write_image(tmp_path / name, solid(value))
    (tmp_path / "list.csv").write_text("file,label\na.png,cat\nb.jpg,dog\ngone.png,cat\n")
    (tmp_path / "labels.txt").write_text("dog\ncat, house cat\n")
    source = scan_images(tmp_path, read_labels(tmp_path / "labels.txt"), progress=False)  # the flat folder's CSV
    assert source.kind == "csv" and source.labels.tolist() == [1, 0]
    assert "gone.png (missing)" in capsys.readouterr().err
    (tmp_path / "list.csv").write_text("a.png,cow\n")
    with pytest.raises(ValueError, match=r"not in the labels file .*\['cow'\]"):
        scan_images(tmp_path / "list.csv", read_labels(tmp_path / "labels.txt"), progress=False)


def test_cifar100_binary_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    records = rng.integers(0, 256, (3, 3074), dtype=np.uint8)
    records[:, 0], records[:, 1] = [1, 2, 3], [4, 99, 0]  # coarse, fine labels
    (tmp_path / "cifar-100-binary").mkdir()
    records.tofile(tmp_path / "cifar-100-binary" / "test.bin")
    source = scan_images(tmp_path / "cifar-100-binary", None, progress=False)
    assert source.kind == "cifar" and source.labels.tolist() == [4, 99, 0] and len(source.classes.names) == 100
    assert source.classes.names[:2] == ["apple", "aquarium_fish"] and source.classes.names[99] == "worm"
    images = source.image_set(Transform(32, 32)).load(np.array([1]))
    expected = records[1, 2:].reshape(3, 32, 32).astype(np.float32) / 255
    np.testing.assert_array_equal(images[0].numpy(), expected)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=r"--images .*odd\.bin: 100 bytes is not a whole number"):
        scan_images(tmp_path / "odd.bin", None, progress=False)


def test_transform_validates_and_crops_the_centre():
    with pytest.raises(ValueError, match="input_size <= resize"):
        Transform(64, 32)
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # the centre 20 columns are white
    out = Transform(10, 10)(Image.fromarray(img))  # short side 20 -> 10, width 40 -> 20, crop the middle 10
    assert out.shape == (10, 10, 3) and out.min() > 200


def test_shared_class_name_resolves_by_index_and_is_refused_by_name(tmp_path):
    labels = tmp_path / "imagenet_classes.txt"  # id-less, two classes named "crane"
    labels.write_text("crane\nheron\ncrane, derrick\n")
    root = tmp_path / "val"
    for folder in ("2", "heron"):
        (root / folder).mkdir(parents=True)
        write_image(root / folder / "a.png", solid(9))
    source = scan_images(root, read_labels(labels), progress=False)
    assert source.labels.tolist() == [2, 1]  # "2" is the second crane, by index
    (root / "crane").mkdir()
    write_image(root / "crane" / "b.png", solid(9))
    with pytest.raises(ValueError, match=rf"--images {root}: 'crane' names 2 classes of the labels file {labels} "
                                         r"\(indices \[0, 2\]\); .* ids or indices instead: 0, 2"):
        scan_images(root, read_labels(labels), progress=False)
