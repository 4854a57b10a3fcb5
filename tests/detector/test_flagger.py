"""detector.flagger: scores against definitions, calibrated threshold, JSON round trip."""
import json

import numpy as np
import pytest

from semguard.detector.flagger import Flagger, assemble_features, feature_names, fit_flagger, tail_surprise
from semguard.detector.signature import Signature

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


@pytest.mark.parametrize("method", ["gaussian", "logistic", "ensemble"])
def test_threshold_meets_target_fpr_and_separates(method):
    rng = np.random.default_rng(1)
    names, clean, attack = clean_and_attack(rng)
    fl = fit_flagger(clean[:200], clean[200:], names, method=method, attack=attack[:200], target_fpr=0.1,
                     members=[("fraction", "mahalanobis"), ("mahalanobis",)] if method == "ensemble" else None)
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


def tail_surprise_loop(s, ref, scale):
    """By definition: -log(share of the m sorted clean scores at or above s), the rank linearly
    interpolated between neighbouring clean scores; past the largest, log(m + 1) + (s - max) / scale."""
    m = len(ref)
    if s > ref[-1]:
        return np.log(m + 1) + (s - ref[-1]) / scale
    if s <= ref[0]:
        rank = 0.0
    else:
        j = max(i for i in range(m) if ref[i] < s)  # ref[j] < s <= ref[j + 1]
        rank = j + (s - ref[j]) / (ref[j + 1] - ref[j])
    return -np.log((m - rank) / (m + 1))


def test_tail_surprise_matches_definition():
    rng = np.random.default_rng(8)
    ref = np.sort(rng.normal(size=40))
    s = np.r_[rng.normal(scale=1.5, size=60), ref[[0, 7, 39]], ref[-1] + 2.0, ref[0] - 3.0]
    want = [tail_surprise_loop(v, ref, 0.7) for v in s]
    np.testing.assert_allclose(tail_surprise(s, ref, 0.7), want, rtol=1e-12)
    assert np.all(np.diff(tail_surprise(np.sort(s), ref, 0.7)) >= 0)  # monotone: ranks are kept


def test_ensemble_scores_the_most_surprised_member():
    rng = np.random.default_rng(9)
    names, clean, attack = clean_and_attack(rng)
    members = [("fraction", "mahalanobis"), ("mahalanobis",)]
    fl = fit_flagger(clean[:200], clean[200:], names, method="ensemble", attack=attack[:200], members=members)
    want = []
    for kinds in members:  # each member is the logistic flagger on its columns, then its clean-tail surprise
        cols = [i for i, n in enumerate(names) if n.split("/")[0] in kinds]
        member = fit_flagger(clean[:200, cols], clean[200:, cols], [names[i] for i in cols], method="logistic",
                             attack=attack[:200, cols])
        ref = np.sort(member.score(clean[200:, cols]))
        top = ref[-10:]  # 5% of 200 calibration images, but at least 10
        want.append([tail_surprise_loop(v, ref, np.mean(top - top[0])) for v in member.score(attack[200:, cols])])
    np.testing.assert_allclose(fl.score(attack[200:]), np.max(want, axis=0), rtol=1e-9)
    with pytest.raises(ValueError, match="needs members"):
        fit_flagger(clean, clean, names, method="ensemble", attack=attack)
    with pytest.raises(ValueError, match="names no feature column"):
        fit_flagger(clean, clean, names, method="ensemble", attack=attack, members=[("margin",)])


def test_tail_scale_rests_on_ten_points_at_least():
    from semguard.detector.flagger import _tail

    logits = np.arange(19.0) ** 2  # 19 calibration images: 5% would be one point, whose excess is 0
    ref, scale = _tail(logits)
    assert scale == np.mean(logits[-10:] - logits[-10]) > 1  # the top 10
    assert _tail(np.full(30, 2.0))[1] == 1.0  # no spread: a unit scale, not 1e-12
    m = len(ref)
    assert tail_surprise(np.array([logits[-1] + scale]), ref, scale)[0] == pytest.approx(np.log(m + 1) + 1)


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
    for method in ("gaussian", "logistic", "ensemble"):
        fl = fit_flagger(clean[:200], clean[200:], names, method=method, attack=attack,
                         members=[("fraction", "mahalanobis"), ("mahalanobis",)])
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
