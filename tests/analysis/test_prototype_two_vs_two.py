"""2 vs 2 on the classifier's class prototypes (its final layer's weight rows; issue 27): no image needed."""
import json

import numpy as np
import pytest
from torch import nn

from semguard.analysis.prototype_two_vs_two import classifier_prototypes, prototype_two_vs_two
from semguard.detector.rsa import correlation_matrix, two_vs_two
from semguard.too_small import TooSmall
from tests.analysis.test_subject_two_vs_two import N_CLASSES, UNMATCHED, tiny_subject


def test_prototypes_are_the_last_classifier_rows():
    model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 4), nn.Linear(4, 4))
    found = classifier_prototypes(model, 4)
    assert found.layer == "3" and found.weight.dtype == np.float64
    np.testing.assert_array_equal(found.weight, model[3].weight.detach().double().numpy())
    squeeze = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert classifier_prototypes(squeeze, 6).weight.shape == (6, 8)  # SqueezeNet's 1x1 convolution head
    with pytest.raises(ValueError, match=r"Sequential: no nn.Linear \(or 1x1 nn.Conv2d\) with 7 outputs"):
        classifier_prototypes(model, 7)


def test_prototype_two_vs_two_follows_the_definition_and_sees_aligned_words():
    subject = tiny_subject()
    matched = np.flatnonzero(subject.matched)
    rows = subject.model.fc.weight.detach().double().numpy()
    got = prototype_two_vs_two(subject, n_permutations=50, seed=0, device="cpu")
    assert got["concepts"] == len(matched) == N_CLASSES - 1 and got["layer"] == "fc"
    assert got["accuracy"] == pytest.approx(two_vs_two(correlation_matrix(rows[matched]),
                                                       correlation_matrix(subject.word_vectors[matched])))
    # word vectors equal to the prototypes (plus a little noise): the class geometry follows the words
    rng = np.random.default_rng(0)
    words = np.where(subject.matched[:, None], rows + 0.01 * rng.normal(size=rows.shape), 0)
    strong = prototype_two_vs_two(subject._replace(word_vectors=words), n_permutations=200, seed=0, device="cpu")
    assert strong["accuracy"] == 1.0 and strong["p_value"] < 0.05
    assert UNMATCHED not in matched


def test_prototypes_need_three_classes_with_a_vector():
    subject = tiny_subject()
    few = subject._replace(matched=np.arange(N_CLASSES) < 2)
    with pytest.raises(TooSmall, match="at least 3 classes with a word vector, found 2"):
        prototype_two_vs_two(few, n_permutations=10, device="cpu")


def test_cli_runs_prototypes_where_images_are_too_few(tmp_path, monkeypatch, capsys):
    import semguard.subject.core as core
    from semguard.cli import main

    monkeypatch.setattr(core, "load_subject", lambda spec, progress=True: tiny_subject())
    args = ["analyze", "two-vs-two", "--model", "tiny", "--out", str(tmp_path), "--permutations", "20", "--quiet",
            "--device", "cpu"]
    with pytest.raises(SystemExit, match="needs at least 3 matched classes with 9 image"):
        main([*args, "--image-sets", "9"])  # without --prototypes: the images' reason, as before
    assert main([*args, "--image-sets", "9", "--prototypes"]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "prototypes.json").read_text())
    assert f"class prototypes (fc weight rows, {N_CLASSES - 1} classes): {record['accuracy']:.3f}" in out
    assert "2 vs 2 on image sets skipped: 2 vs 2 needs at least 3 matched classes with 9 images" in out
    assert main([*args, "--image-sets", "2", "--prototypes"]) == 0  # enough images: both run
    assert (tmp_path / "two_vs_two.json").is_file() and "last layer" in capsys.readouterr().out
