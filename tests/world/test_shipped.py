"""The default world's shipped WorldNet weights and SkipGram vectors (world.shipped)."""
import pytest

from semguard.cli import main
from semguard.files import sha256_file
from semguard.world import WorldSettings, build_world, shipped


def test_shipped_files_belong_to_the_default_world_and_are_intact():
    manifest = shipped.manifest()
    # A change to the world's settings or WORLD_VERSION must come with rebuilt shipped files
    # (`semguard world build --from-scratch --write-shipped`).
    assert manifest["settings_key"] == WorldSettings().key()
    for name in shipped.FILES:
        assert sha256_file(shipped.SHIPPED_DIR / name) == manifest["sha256"][name], name


def test_a_first_build_copies_the_shipped_files_instead_of_training(tmp_path, capsys):
    assert main(["world", "build", "--world-cache", str(tmp_path), "--quiet"]) == 0
    root = tmp_path / WorldSettings().key()
    for name in shipped.FILES:
        assert sha256_file(root / name) == shipped.manifest()["sha256"][name]
    accuracy = shipped.manifest()["test_accuracy"]  # the images render identically, so the CNN scores the same
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out
    world = build_world(WorldSettings(), tmp_path, progress=False)  # cached now
    assert world.test_accuracy == accuracy and world.timings_s["train_worldnet"] < 5


def test_write_shipped_needs_from_scratch(capsys):
    with pytest.raises(SystemExit, match="--write-shipped needs --from-scratch"):
        main(["world", "build", "--write-shipped"])


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "data"
    damaged.mkdir()
    for name in shipped.FILES:
        (damaged / name).write_bytes((shipped.SHIPPED_DIR / name).read_bytes())
    (damaged / "shipped.json").write_text(shipped.MANIFEST.read_text())
    (damaged / "vectors.bin").write_bytes(b"not the vectors")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", damaged)
    with pytest.raises(ValueError, match=r"vectors.bin: sha256 differs from shipped.json"):
        shipped.copy_shipped("vectors.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.rebuild
def test_training_from_scratch_reproduces_the_shipped_files(tmp_path):
    """About 5 minutes: WorldNet trains on one core. Run by .ci/run, not by the default test command."""
    world = build_world(WorldSettings(), tmp_path, progress=False, from_scratch=True)
    manifest = shipped.manifest()
    if shipped.machine() == manifest["built_on"]:
        for name in shipped.FILES:
            assert sha256_file(world.root / name) == manifest["sha256"][name], name
    else:  # floating-point training is reproducible bit for bit only on the same kind of machine
        assert abs(world.test_accuracy - manifest["test_accuracy"]) < 0.03


def test_from_scratch_retrains_a_cached_world(tmp_path, monkeypatch):
    """A cached world holds copies of the shipped files; --from-scratch must train them again."""
    build_world(WorldSettings(), tmp_path, progress=False)  # copies the shipped files
    calls = []
    monkeypatch.setattr("semguard.world.build._build_vectors", lambda s, attrs, path: calls.append(path.name))
    monkeypatch.setattr("semguard.world.build.train_worldnet", lambda *a, **k: calls.append("train") or _stop())
    with pytest.raises(_Stop):
        build_world(WorldSettings(), tmp_path, progress=False, from_scratch=True)
    assert calls == ["vectors.bin", "train"]


class _Stop(Exception):
    pass


def _stop():
    raise _Stop
