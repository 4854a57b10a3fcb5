"""`semguard world export` (semguard.world.export): the world's arrays and files back through the
real-asset loaders, exactly; nothing left behind on failure."""
import shutil

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from semguard.cli import main
from semguard.models.worldnet import WorldNet, WorldNetConfig, save_worldnet, worldnet_layers
from semguard.subject.core import ArrayImages, SubjectSpec, load_subject
from semguard.subject.flags import read_subject_toml
from semguard.world.export import write_world_assets

CLASSES = ["apple", "aquarium_fish", "maple_tree", "bear"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What export reads from a World: classes, test images and labels, vectors and WorldNet files."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    labels = np.array([2, 0, 1, 3, 3, 0, 2, 1, 0, 3, 1, 2])  # not grouped by class: the order must survive
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    kv = KeyedVectors(8)
    kv.add_vectors(CLASSES + ["other"], rng.normal(size=(5, 8)).astype(np.float32))
    kv.save_word2vec_format(str(root / "vectors.bin"), binary=True)
    torch.manual_seed(0)
    model = WorldNet(WorldNetConfig(num_classes=len(CLASSES), widths=(4, 4, 8), blocks=(1, 1, 1))).eval()
    save_worldnet(model, root / "worldnet.safetensors")
    return root, images, labels, kv, model


def test_exported_world_loads_back_exactly(world, tmp_path):
    root, images, labels, kv, model = world
    out = write_world_assets(tmp_path / "export", CLASSES, images, labels, root / "vectors.bin",
                             root / "worldnet.safetensors", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "subject.toml", "test", "vectors.bin",
                                                     "worldnet.safetensors"]
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(CLASSES)
    assert (out / "test" / "maple_tree" / "00000.png").is_file()  # image 0 is a maple_tree
    subject = load_subject(SubjectSpec(**read_subject_toml(out / "subject.toml"), world_cache=tmp_path / "c/world"),
                           progress=False)
    assert subject.name == "worldnet" and subject.classes == CLASSES and subject.matched.all()
    np.testing.assert_array_equal(subject.images.labels, labels)
    everything = np.arange(len(labels))
    expected = ArrayImages(images, labels).load(everything)
    loaded = subject.images.load(everything)
    assert torch.equal(loaded, expected)  # exact pixels, in the split's order
    np.testing.assert_array_equal(subject.word_vectors, np.stack([kv[c] for c in CLASSES]))
    with torch.no_grad():
        assert torch.equal(subject.model(loaded), model(expected))
    assert subject.layers == [info.name for info in worldnet_layers(model.config)]  # the preset, for this config


def test_an_existing_folder_is_refused_and_a_failure_leaves_nothing(world, tmp_path, monkeypatch):
    root, images, labels, _, _ = world
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        write_world_assets(tmp_path / "full", CLASSES, images, labels, root / "vectors.bin",
                           root / "worldnet.safetensors", progress=False)
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"

    def broken_copy(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write_world_assets(tmp_path / "out", CLASSES, images, labels, root / "vectors.bin",
                           root / "worldnet.safetensors", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # neither out nor its staging folder


def test_cli_refuses_a_non_empty_out(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit, match=r"semguard world export: --out .*exists and is not an empty folder"):
        main(["world", "export", "--out", str(tmp_path), "--world-cache", str(tmp_path / "cache"), "--quiet"])
