"""attacks.generate on a tiny model: every stored image valid, resume for real after kill -9, bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semguard.attacks.generate import GenerateParams, as_model_input, generate_attack_set
from semguard.attacks.store import MANIFEST_FILE, SHARD_DIR, load_attack_set
from tests.attacks.generate_worker import PARAMS as WORKER_PARAMS
from tests.attacks.generate_worker import start_and_kill
from tests.attacks.tiny import tiny_world

ROOT = Path(__file__).resolve().parents[2]
ROUNDING = 2.0**-23  # float32 rounding of clean + delta
SMALL = GenerateParams(n_sources=5, targets_per_source=6, batch_size=8, iterations=5)


def check_set(path: Path, world, params: GenerateParams) -> None:
    """Every image of the set: inside its eps ball and [0, 1]; success flag = model predicts the target."""
    model, images, labels, names, vectors = world
    s = load_attack_set(path)
    assert s.complete and [r.id for r in s] == list(range(s.header["n_examples"]))
    adv = torch.from_numpy(s.images())
    clean = as_model_input(images[[r.source_image for r in s]])
    assert adv.dtype == torch.float32 and adv.min() >= 0 and adv.max() <= 1
    assert (adv.double() - clean.double()).abs().max() <= params.eps + ROUNDING
    with torch.no_grad():
        predicted = model(adv).argmax(1).numpy()
    assert [r.success for r in s] == list(predicted == [r.target_class for r in s])
    assert all(labels[r.source_image] == r.source_class == predicted_clean
               for r, predicted_clean in zip(s, model(clean).argmax(1).numpy()))  # sources correctly classified
    for r in s:
        assert r.source_label == names[r.source_class] and r.target_label == names[r.target_class]
        assert r.target_class != r.source_class and r.params == params.attack_kwargs()


def test_generate_and_rerun(tmp_path):
    world = tiny_world()
    result = generate_attack_set(*world, tmp_path / "set", SMALL, progress=False)
    assert result.n_examples == 30 and result.computed == [0, 1, 2, 3] and result.skipped == []
    check_set(tmp_path / "set", world, SMALL)
    s = load_attack_set(tmp_path / "set")
    assert result.n_success == len(s.successful()) > 0
    assert len({r.source_class for r in s}) == 5
    assert [r.rank for r in s] == [0, 1, 2, 3, 4, 5] * 5
    again = generate_attack_set(*world, tmp_path / "set", SMALL, progress=False)
    assert again.computed == [] and again.skipped == [0, 1, 2, 3] and again.n_success == result.n_success


def test_kill_and_resume(tmp_path):
    out, log = tmp_path / "set", tmp_path / "computed.log"
    finished, stamps = start_and_kill(out, log)
    cmd = [sys.executable, "-m", "tests.attacks.generate_worker", str(out), str(log)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    n_shards = WORKER_PARAMS.n_sources * WORKER_PARAMS.targets_per_source // WORKER_PARAMS.batch_size
    with open(out / MANIFEST_FILE, "ab") as f:
        f.write(b'{"id": 999, "source_im')  # and a row torn mid-write, as a kill inside write() leaves it
    first_run = log.read_text().split()

    subprocess.run(cmd + ["0"], cwd=ROOT, env=env, check=True, timeout=300)

    resumed = log.read_text().split()[len(first_run):]
    assert not {f"shard-{int(k):05d}.npz" for k in resumed} & finished, "finished shards were recomputed"
    assert {f"shard-{int(k):05d}.npz" for k in resumed} | finished == {f"shard-{k:05d}.npz" for k in range(n_shards)}
    assert {name: (out / SHARD_DIR / name).stat().st_mtime_ns for name in finished} == stamps
    lines = (out / MANIFEST_FILE).read_text().splitlines()
    ids = [int(line.split('"id": ')[1].split(",")[0]) for line in lines]
    assert sorted(ids) == list(range(48)), "duplicates or holes in the manifest"
    check_set(out, tiny_world(), WORKER_PARAMS)
    # the resumed set equals one generated without interruption
    generate_attack_set(*tiny_world(), tmp_path / "fresh", WORKER_PARAMS, progress=False)
    np.testing.assert_array_equal(load_attack_set(out).images(), load_attack_set(tmp_path / "fresh").images())


def test_native_and_art_sets_agree(tmp_path):
    world = tiny_world()
    params = GenerateParams(n_sources=2, batch_size=12, iterations=4)
    generate_attack_set(*world, tmp_path / "native", params, progress=False)
    art = GenerateParams(n_sources=2, batch_size=12, iterations=4, backend="art")
    generate_attack_set(*world, tmp_path / "art", art, progress=False)
    np.testing.assert_array_equal(load_attack_set(tmp_path / "native").images(), load_attack_set(tmp_path / "art").images())


def test_bad_input(tmp_path):
    model, images, labels, names, vectors = tiny_world()
    with pytest.raises(ValueError, match=r"unknown label names \(no word vector\): \['concept3'\]"):
        mapping = {n: v for n, v in zip(names, vectors) if n != "concept3"}
        generate_attack_set(model, images, labels, names, mapping, tmp_path / "a", SMALL, progress=False)
    with pytest.raises(ValueError, match="label_names has 11 names but the model gives 12 logits"):
        generate_attack_set(model, images, labels % 11, names[:11], vectors[:11], tmp_path / "a", SMALL, progress=False)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 12\)"):
        generate_attack_set(model, images, labels + 1, names, vectors, tmp_path / "a", SMALL, progress=False)
    for field, value in [("eps", 0.0), ("eps", -1.0), ("step", 0.0), ("iterations", 0), ("batch_size", 0)]:
        with pytest.raises(ValueError, match=f"{field} must be"):
            GenerateParams(**{field: value})
    with pytest.raises(ValueError, match="backend must be one of"):
        GenerateParams(backend="torchattacks")
    with pytest.raises(ValueError, match=r"word_vectors: a mapping looks classes up by name, but label_names repeats \['concept1'\]"):
        twice = [*names[:2], "concept1", *names[3:]]
        generate_attack_set(model, images, labels, twice, dict(zip(names, vectors)), tmp_path / "a", SMALL, progress=False)
    assert not (tmp_path / "a").exists()  # nothing was written by any of these


def test_classes_sharing_a_name_are_attacked_by_index(tmp_path):  # ImageNet's two "crane" (issue 27)
    model, images, labels, names, vectors = tiny_world()
    shared = ["crane" if i in (1, 4) else n for i, n in enumerate(names)]
    result = generate_attack_set(model, images, labels, shared, vectors, tmp_path / "set", SMALL, progress=False)
    s = load_attack_set(tmp_path / "set")
    assert result.n_examples == 30 and s.header["label_names"] == shared
    assert all(r.source_label == shared[r.source_class] and r.target_label == shared[r.target_class] for r in s)


def test_other_sets_manifest_refused_nothing_overwritten(tmp_path):
    world = tiny_world()
    generate_attack_set(*world, tmp_path / "set", SMALL, progress=False)
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "set").rglob("*") if p.is_file()}
    other = GenerateParams(n_sources=5, batch_size=8, iterations=5, eps=0.1)
    with pytest.raises(ValueError, match=r"different parameters \(attack_params.eps: 0.15 -> 0.1; generate.eps: 0.15 -> 0.1\)"):
        generate_attack_set(*world, tmp_path / "set", other, progress=False)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "set").rglob("*") if p.is_file()} == snapshot
