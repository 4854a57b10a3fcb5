"""detector.flagger: scores against definitions, calibrated threshold, JSON round trip."""
import json

import numpy as np
import pytest

from detector.flagger import Flagger, assemble_features, feature_names, fit_flagger
from detector.signature import Signature

LAYERS = ["l0", "l1", "l2"]


def clean_and_attack(rng, n=400):
    names = feature_names(["fraction", "mahalanobis"], LAYERS)
    clean = np.hstack([rng.beta(20, 2, size=(n, 3)), rng.chisquare(4, size=(n, 3))])
    attack = np.hstack([rng.beta(5, 5, size=(n, 3)), rng.chisquare(4, size=(n, 3)) + 3])
    return names, clean, attack


def test_gaussian_score_is_mahalanobis_distance_of_standardised_features():
    rng = np.random.default_rng(0)
    names, clean, _ = clean_and_attack(rng)
    fl = fit_flagger(clean[:200], clean[200:], names)
    z = (clean[200:] - clean[:200].mean(0)) / clean[:200].std(0)
    d = z - fl.params["mean"]
    want = np.array([row @ fl.params["precision"] @ row for row in d])
    np.testing.assert_allclose(fl.score(clean[200:]), want, rtol=1e-10)


@pytest.mark.parametrize("method", ["gaussian", "logistic"])
def test_threshold_meets_target_fpr_and_separates(method):
    rng = np.random.default_rng(1)
    names, clean, attack = clean_and_attack(rng)
    fl = fit_flagger(clean[:200], clean[200:], names, method=method, attack=attack[:200], target_fpr=0.1)
    assert fl.calibration["fpr_calib"] <= 0.1
    assert fl.calibration["fpr_calib"] >= 0.09 - 1e-12  # the quantile is as tight as the sample allows
    assert fl.flag(attack[200:]).mean() > 0.8


def test_logistic_matches_sklearn_unpenalised_limit():
    lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(2)
    names, clean, attack = clean_and_attack(rng, 300)
    fl = fit_flagger(clean, clean, names, method="logistic", attack=attack, l2=1e-6)
    z = (np.vstack([clean, attack]) - fl.center) / fl.scale
    y = np.r_[np.zeros(300), np.ones(300)]
    ref = lm.LogisticRegression(C=1e6, max_iter=5000, tol=1e-10).fit(z, y)
    np.testing.assert_allclose(fl.params["weights"], ref.coef_[0], rtol=1e-3, atol=1e-3)


def test_explanation_names_low_layers():
    rng = np.random.default_rng(3)
    names, clean, _ = clean_and_attack(rng)
    fl = fit_flagger(clean[:200], clean[200:], names)
    x = clean[:2].copy()
    x[0, 1] = 0.0  # layer l1's signature collapses
    x[1, :3] = 1.0
    got = fl.disagreeing(x[:, :3])
    assert got.tolist() == [[False, True, False], [False, False, False]]
    assert fl.explain_layers == tuple(LAYERS)
    # explanation given separately (a flagger scoring only density features keeps it)
    maha = fit_flagger(clean[:200, 3:], clean[200:, 3:], names[3:], explain=(LAYERS, clean[200:, :3]))
    assert maha.disagreeing(x[:, :3]).tolist() == got.tolist()


def test_json_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    names, clean, attack = clean_and_attack(rng)
    for method in ("gaussian", "logistic"):
        fl = fit_flagger(clean[:200], clean[200:], names, method=method, attack=attack)
        back = Flagger.load(fl.save(tmp_path / "f.json"))
        np.testing.assert_array_equal(back.score(attack), fl.score(attack))
        assert back.threshold == fl.threshold and back.feature_names == fl.feature_names
    assert json.loads((tmp_path / "f.json").read_text())["format"] == "semguard.flagger/1"


def test_assemble_features_order():
    sig = Signature(np.ones((2, 3)), np.zeros((2, 3)))
    x = assemble_features(["fraction", "margin", "mahalanobis"], sig, np.full((2, 3), 7.0))
    assert x.shape == (2, 9) and (x[:, :3] == 1).all() and (x[:, 6:] == 7).all()
    assert feature_names(["margin"], LAYERS) == ["margin/l0", "margin/l1", "margin/l2"]


def test_bad_input_raises():
    rng = np.random.default_rng(5)
    names, clean, _ = clean_and_attack(rng)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_flagger(clean, clean, names, method="forest")
    with pytest.raises(ValueError, match="needs attack features"):
        fit_flagger(clean, clean, names, method="logistic")
    with pytest.raises(ValueError, match="target_fpr"):
        fit_flagger(clean, clean, names, target_fpr=1.5)
    fl = fit_flagger(clean, clean, names)
    with pytest.raises(ValueError, match="features must be"):
        fl.score(clean[:, :2])
    with pytest.raises(ValueError, match="finite"):
        fl.score(np.full((1, 6), np.nan))
    with pytest.raises(ValueError, match="feature kinds"):
        feature_names(["words"], LAYERS)
    with pytest.raises(ValueError, match="not a semguard flagger"):
        Flagger.from_json({"format": "other"})
