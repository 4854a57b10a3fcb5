"""The exported world through the real-asset path gives the embedded world's figures.

`semguard world export` writes PNGs, labels, a word2vec binary and WorldNet's weights; loading them
with --subject must give the quickstart's subject back exactly, so Figure 1 is the same to the
printed precision (here: exactly; same pixels, same model, same permutation seed), and `attack
generate` plans the same attacks with the same successes.
Slow: renders the default world (~20-50 s on 2 cores) and exports its 5000 test images, once for the module.
"""
import numpy as np
import pytest

from semguard.analysis.subject_two_vs_two import TwoVsTwoConfig, run_two_vs_two
from semguard.attacks.store import load_attack_set
from semguard.cli import main
from semguard.subject.core import SubjectSpec, load_subject, world_subject
from semguard.subject.flags import read_subject_toml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(world cache, export folder) of the default world."""
    root = tmp_path_factory.mktemp("exported-world")
    cache = root / "cache" / "world"
    assert main(["world", "export", "--out", str(root / "export"), "--world-cache", str(cache), "--quiet"]) == 0
    return cache, root / "export"


def test_two_vs_two_on_the_exported_world_equals_the_embedded_world(exported, tmp_path):
    cache, export = exported
    world = world_subject(SubjectSpec(world_cache=cache), progress=False)
    subject = load_subject(SubjectSpec(**read_subject_toml(export / "subject.toml"), world_cache=cache), progress=False)
    assert subject.classes == world.classes and subject.layers == world.layers
    assert subject.model_spec == world.model_spec
    config = TwoVsTwoConfig(n_permutations=20, progress=False, device="cpu")
    a = run_two_vs_two(world, tmp_path / "world", config)
    b = run_two_vs_two(subject, tmp_path / "exported", config)
    assert a["layers"] == b["layers"] and a["concepts"] == b["concepts"] == 100
    np.testing.assert_array_equal(np.round(a["accuracy"], 3), np.round(b["accuracy"], 3))
    assert round(a["pixels"], 3) == round(b["pixels"], 3)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"], rtol=0, atol=1e-12)  # in fact identical
    np.testing.assert_allclose(a["p_value"], b["p_value"], rtol=0, atol=1e-12)


def test_attacks_on_the_exported_world_equal_the_embedded_world(exported, tmp_path):
    """`attack generate` on the embedded world and on its export (--subject) plans the same attacks and gets the
    same successes and the same adversarial images."""
    cache, export = exported
    small = ["--sources", "6", "--targets-per-source", "6", "--iterations", "5", "--batch-size", "12"]
    assert main(["attack", "generate", "--out", str(tmp_path / "world"), "--world-cache", str(cache), *small]) == 0
    assert main(["attack", "generate", "--out", str(tmp_path / "exported"), "--subject", str(export / "subject.toml"),
                 "--world-cache", str(cache), *small]) == 0
    a, b = load_attack_set(tmp_path / "world"), load_attack_set(tmp_path / "exported")
    assert a.header["model_sha256"] == b.header["model_sha256"] and len(a) == len(b) == 36
    key = [(r.source_label, r.target_label, r.rank, r.success) for r in a.records]
    assert key == [(r.source_label, r.target_label, r.rank, r.success) for r in b.records]
    assert sum(r.success for r in a.records) > 0
    np.testing.assert_array_equal(a.images(list(a.records)), b.images(list(b.records)))


def _same_tree(a, b, skip=()):
    """Every file under a is under b with the same bytes, JSON compared as data (paths in it aside)."""
    import json

    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    for name in names:
        if name.suffix == ".json":
            x, y = json.loads((a / name).read_text()), json.loads((b / name).read_text())
            for doc in (x, y):
                doc.get("attacks", {}).pop("path", None)
                doc.pop("subject", None)
            assert x == y, name
        elif name.suffix == ".safetensors":  # the same tensors and metadata (the header's key order may differ)
            from safetensors import safe_open

            x, y = safe_open(a / name, "np"), safe_open(b / name, "np")
            assert x.metadata() == y.metadata() and sorted(x.keys()) == sorted(y.keys()), name
            for key in x.keys():
                np.testing.assert_array_equal(x.get_tensor(key), y.get_tensor(key), err_msg=f"{name} {key}")
        elif name.suffix != ".png":  # figures: same data, but titles may name the subject
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def test_analyze_and_calibrate_on_the_exported_world_equal_the_embedded_world(exported, tmp_path):
    """`attack analyze` and `detector calibrate` through the subject flags on the export write what they write
    on the default world: the one subject path, whatever the assets are."""
    cache, export = exported
    small = ["--sources", "6", "--targets-per-source", "3", "--iterations", "5", "--batch-size", "18"]
    flags = {"world": ["--world-cache", str(cache)],
             "exported": ["--subject", str(export / "subject.toml"), "--world-cache", str(cache)]}
    for name, subject in flags.items():
        assert main(["attack", "generate", "--out", str(tmp_path / name / "set"), *subject, *small]) == 0
        assert main(["attack", "analyze", "--attack-set", str(tmp_path / name / "set"), "--out",
                     str(tmp_path / name / "analysis"), "--permutations", "20", "--reference-size", "20",
                     "--max-images", "400", *subject]) == 0
        assert main(["detector", "calibrate", "--out", str(tmp_path / name / "bundle"), "--method", "gaussian",
                     "--references", "20", "--max-images", "200", "--allow-few-images", "--quiet", *subject]) == 0
    assert _same_tree(tmp_path / "world" / "analysis", tmp_path / "exported" / "analysis")
    # bundle.json names its source weights file (the cache's or the export's) and the files' sha256 (safetensors
    # headers may list the same tensors in another order): the rest is identical
    _same_tree(tmp_path / "world" / "bundle", tmp_path / "exported" / "bundle", skip=("bundle.json",))
    import json

    a, b = (json.loads((tmp_path / n / "bundle" / "bundle.json").read_text()) for n in ("world", "exported"))
    differs = sorted(k for k in a if a[k] != b.get(k))
    assert set(differs) <= {"source_weights", "sha256"}, differs
    assert a["sha256"].keys() == b["sha256"].keys()
