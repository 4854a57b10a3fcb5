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
