"""Hostile files, one table: every reader and command that takes a file refuses a crafted one with a
message naming the file and the field, never imports or unpickles what the file names (no marker
file is written), and changes nothing outside its output folder.

Each row makes its files in a scratch folder (beside `evilmod.py`, a module that writes MARKER when
imported or called, and `outside.txt`, what path traversal aims at) and returns the call to make.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from semguard.attacks.store import FORMAT
from semguard.cli import main
from semguard.detector.bundle import read_bundle
from semguard.models.factory import load_state_dict_file
from semguard.subject.labels import read_labels
from semguard.subject.vectors import load_subject_vectors
from tests.tiny_worldnet import write_worldnet_bundle

EVIL = "evilmod"
DEEP = "[" * 20_000 + "]" * 20_000  # Python's parser recurses per level: a RecursionError, not a ValueError


@dataclass(frozen=True)
class Hostile:
    name: str
    make: Callable[[Path, Path], Callable[[], object]]  # (scratch folder, output folder) -> the call
    message: str  # regex: the file, then the field


# --------------------------------------------------------------------------- file makers


def _attack_set(root: Path, subject: dict | None = None, **header) -> Path:
    directory = root / "set"
    directory.mkdir()
    params = {"format": FORMAT, "n_examples": 0, "shard_size": 8, "model_sha256": "0" * 64, **header}
    if subject is not None:
        params["subject"] = {"model": None, "weights": None, "model_entry": None, "images": str(root / "imgs"),
                             "labels": None, "vectors": str(root / "v.kv"), "world_cache": str(root / "cache"),
                             "trust_pickled_vectors": False, **subject}
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def _labels(root: Path) -> str:
    (root / "labels.txt").write_text("cat\ndog\n")  # with a labels file the model is built before the images
    return str(root / "labels.txt")


def _analyze(directory: Path, out: Path) -> Callable[[], object]:
    return lambda: main(["attack", "analyze", "--attack-set", str(directory), "--out", str(out)])


def _raw_params(root: Path, text: str) -> Path:
    directory = root / "set"
    directory.mkdir()
    (directory / "params.json").write_text(text)
    return directory


def _bundle(root: Path, base: Path, edit: Callable[[dict, Path], None]) -> Callable[[], object]:
    """A copy of the tiny bundle with bundle.json edited (hashes of edited files recomputed, as an attacker would)."""
    directory = root / "bundle"
    shutil.copytree(base, directory)
    manifest = json.loads((directory / "bundle.json").read_text())
    edit(manifest, directory)
    for name in manifest["sha256"]:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            manifest["sha256"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "bundle.json").write_text(json.dumps(manifest))
    return lambda: read_bundle(directory)


def _model(builder: str, **kwargs) -> Callable[[dict, Path], None]:
    def edit(manifest: dict, _: Path) -> None:
        manifest["model"] = {"builder": builder, "kwargs": kwargs, "module": "semguard.models.normalize"}
    return edit


def _file_name(role: str, name: Callable[[Path], str]) -> Callable[[dict, Path], None]:
    def edit(manifest: dict, directory: Path) -> None:
        manifest["files"][role] = name(directory)
    return edit


def _symlink_model(manifest: dict, directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to(directory.parent / "outside.txt")


def _declare_shape(path: Path, shape: list[int]) -> Path:
    """Rewrite the first tensor's shape in a safetensors header (its length field follows), data unchanged."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[sorted(k for k in header if k != "__metadata__")[0]]["shape"] = shape
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return path


def _huge_shape_file(path: Path) -> Path:
    save_file({"w": torch.zeros(4)}, str(path))
    return _declare_shape(path, [1 << 20, 1 << 20])


def _huge_model_tensor(manifest: dict, directory: Path) -> None:
    _declare_shape(directory / "model.safetensors", [1 << 30, 1 << 20])


def _nan_threshold(manifest: dict, directory: Path) -> None:
    flagger = json.loads((directory / "flagger.json").read_text())
    flagger["threshold"] = float("nan")
    (directory / "flagger.json").write_text(json.dumps(flagger))  # json writes the NaN literal


class _Marks:
    """Unpickling this writes MARKER (what a hostile pickle would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickled_weights(root: Path) -> Path:
    path = root / "w.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _Marks(str(root / "MARKER"))}, f)
    return path


def _pickled_vectors(root: Path) -> Path:
    path = root / "v.kv"
    with open(path, "wb") as f:
        pickle.dump(_Marks(str(root / "MARKER")), f, protocol=2)
    return path


def _calling(fn: Callable, *args) -> Callable[[], object]:
    """The call to make, its files already written (the snapshot is taken between the two)."""
    return lambda: fn(*args)


# --------------------------------------------------------------------------- the table

CASES = [
    Hostile("params.json subject names an entry point",  # complete enough that main imported and called it
            lambda d, o: _analyze(_attack_set(d, {"model_entry": f"{EVIL}:factory", "vectors": str(d / "v.bin"),
                                                  "labels": _labels(d)}), o),
            r"params\.json: subject: field model_entry .*--trust-model-code"),
    Hostile("params.json subject trusts pickled vectors",
            lambda d, o: _analyze(_attack_set(d, {"model": "resnet18", "weights": str(d / "w.pth"),
                                                  "trust_pickled_vectors": True}), o),
            r"params\.json: subject: field trust_pickled_vectors .*--trust-pickled-vectors"),
    Hostile("params.json subject field of the wrong type",
            lambda d, o: _analyze(_attack_set(d, {"model": "resnet18", "weights": 5}), o),
            r"params\.json: subject: field weights must be str"),
    Hostile("params.json nested 20000 deep", lambda d, o: _analyze(_raw_params(d, DEEP), o),
            r"params\.json: JSON nested 20000 levels deep"),
    Hostile("params.json declares 10^18 examples", lambda d, o: _analyze(_attack_set(d, n_examples=10**18), o),
            r"params\.json: field n_examples must be an integer"),
    Hostile("manifest row whose shard is a path",
            lambda d, o: (_analyze(_attack_set(d), o),
                          (d / "set" / "manifest.jsonl").write_text(json.dumps(
                              {"id": 0, "source_image": 0, "source_class": 0, "source_label": "a", "target_class": 1,
                               "target_label": "b", "rank": 0, "similarity": 0.5, "success": True,
                               "predicted_class": 1, "shard": "../../outside.txt", "index": 0, "attack": "m",
                               "params": {}}) + "\n"))[0],
            r"manifest\.jsonl line 1: field shard must name a shard"),
    Hostile("bundle model is an entry point",
            lambda d, o: _bundle(d, BASE[0], lambda m, _: m.update(model={"builder": "entry_point", "kwargs": {
                "entry": f"{EVIL}:factory"}, "module": "semguard.models.normalize"})),
            r"bundle\.json: field model\.builder: .*entry point 'evilmod:factory'.*--trust-model-code"),
    Hostile("bundle names a module outside semguard",
            lambda d, o: _bundle(d, BASE[0], lambda m, _: m["model"].update(module=EVIL, builder="evil")),
            r"bundle\.json: model\.module 'evilmod' is outside the 'semguard' package"),
    Hostile("bundle passes timm a checkpoint_path (a pickle load)",
            lambda d, o: _bundle(d, BASE[0], _model("timm_normalized", arch="resnet18", num_classes=6,
                                                    mean=[0.5] * 3, std=[0.2] * 3,
                                                    model_kwargs={"checkpoint_path": str(d / "w.pth")})),
            r"bundle\.json: field model\.kwargs\.model_kwargs\.checkpoint_path: not an argument"),
    Hostile("bundle passes timm a pretrained_cfg_overlay",
            lambda d, o: _bundle(d, BASE[0], _model("timm_normalized", arch="resnet18", num_classes=6,
                                                    mean=[0.5] * 3, std=[0.2] * 3,
                                                    model_kwargs={"pretrained_cfg_overlay": {"file": "x"}})),
            r"bundle\.json: field model\.kwargs\.model_kwargs\.pretrained_cfg_overlay: not an argument"),
    Hostile("bundle passes torchvision weights= (a download)",
            lambda d, o: _bundle(d, BASE[0], _model("torchvision_normalized", arch="resnet18", num_classes=6,
                                                    mean=[0.5] * 3, std=[0.2] * 3,
                                                    model_kwargs={"weights": "IMAGENET1K_V1"})),
            r"bundle\.json: field model\.kwargs\.model_kwargs\.weights: not an argument"),
    Hostile("bundle builder argument out of range",
            lambda d, o: _bundle(d, BASE[0], _model("torchvision_normalized", arch="resnet18", num_classes=10**12,
                                                    mean=[0.5] * 3, std=[0.2] * 3, model_kwargs={})),
            r"bundle\.json: field model\.kwargs\.num_classes: must be in"),
    Hostile("bundle file name ../../outside.txt",
            lambda d, o: _bundle(d, BASE[0], _file_name("model", lambda _: "../../outside.txt")),
            r"bundle\.json: field files\.model must be a file name inside the bundle"),
    Hostile("bundle file name is an absolute path",
            lambda d, o: _bundle(d, BASE[0], _file_name("words", lambda b: str(b.parent / "outside.txt"))),
            r"bundle\.json: field files\.words must be a file name inside the bundle"),
    Hostile("bundle file is a symlink out of the bundle",
            lambda d, o: _bundle(d, BASE[0], _symlink_model),
            r"bundle\.json: field files\.model: model\.safetensors is a symlink out of the bundle"),
    Hostile("bundle.json nested 20000 deep",
            lambda d, o: (_bundle(d, BASE[0], lambda m, _: None),
                          (d / "bundle" / "bundle.json").write_text(DEEP))[0],
            r"bundle\.json: JSON nested 20000 levels deep"),
    Hostile("bundle weights declare a 2^50-element tensor",
            lambda d, o: _bundle(d, BASE[0], _huge_model_tensor),
            r"model\.safetensors: tensor '.*': field shape \[1073741824, 1048576\] declares"),
    Hostile("flagger.json threshold NaN",
            lambda d, o: _bundle(d, BASE[0], _nan_threshold),
            r"flagger\.json: field threshold must be finite"),
    Hostile("--weights safetensors declaring 2^40 floats",
            lambda d, o: _calling(load_state_dict_file, _huge_shape_file(d / "w.safetensors")),
            r"w\.safetensors: tensor 'w': field (shape|data_offsets)"),
    Hostile("--weights a pickle that runs code",
            lambda d, o: _calling(load_state_dict_file, _pickled_weights(d)),
            r"w\.pth'? is not a plain tensor state dict"),
    Hostile("--vectors a pickled .kv without the flag",
            lambda d, o: _calling(load_subject_vectors, _pickled_vectors(d), o / "cache"),
            r"--vectors .*v\.kv: a pickled gensim \.kv file; .*--trust-pickled-vectors"),
    Hostile("--labels JSON nested 20000 deep",
            lambda d, o: (d / "labels.json").write_text(DEEP) and _calling(read_labels, d / "labels.json"),
            r"--labels .*labels\.json: JSON nested 20000 levels deep"),
]
BASE: list[Path] = []  # the tiny bundle, made once


@pytest.fixture(scope="module", autouse=True)
def base_bundle(tmp_path_factory):
    BASE.append(write_worldnet_bundle(tmp_path_factory.mktemp("base") / "bundle"))
    yield
    BASE.clear()


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file() and not p.is_symlink() and skip not in p.parents}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_file_is_refused(case, tmp_path, monkeypatch):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    marker = scratch / "MARKER"
    (scratch / f"{EVIL}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                        f"def factory():\n    Path({str(marker)!r}).touch()\n")
    (scratch / "outside.txt").write_text("what traversal aims at\n")
    monkeypatch.chdir(scratch)  # an entry point would be imported from here
    monkeypatch.delitem(sys.modules, EVIL, raising=False)
    call = case.make(scratch, out)
    before = _snapshot(tmp_path, out)
    with pytest.raises((ValueError, SystemExit)) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message.strip(), message
    assert re.search(case.message, message), message
    assert not marker.exists() and EVIL not in sys.modules
    assert _snapshot(tmp_path, out) == before  # nothing outside the output folder changed
