"""detector.evaluate against loop-by-definition references on seeded random scores (with ties)."""
import numpy as np
import pytest

from semguard.detector.evaluate import (
    auroc, detection_metrics, flagged_rate, roc_curve, threshold_at_fpr, tpr_at_fpr,
)


def auroc_loop(clean, adv):
    """Mann-Whitney by definition: every (adversarial, clean) pair, a win 1, a tie 1/2."""
    total = 0.0
    for a in adv:
        for c in clean:
            total += 1.0 if a > c else 0.5 if a == c else 0.0
    return total / (len(clean) * len(adv))


def tpr_at_fpr_loop(clean, adv, target):
    """Max TPR over every candidate threshold (each score, and -inf) with FPR <= target."""
    best = 0.0
    for t in [-np.inf, *clean, *adv]:
        fpr = sum(c > t for c in clean) / len(clean)
        if fpr <= target + 1e-12:
            best = max(best, sum(a > t for a in adv) / len(adv))
    return best


def scores(seed, n0, n1, rounded):
    rng = np.random.default_rng(seed)
    clean, adv = rng.normal(0, 1, n0), rng.normal(0.8, 1.3, n1)
    if rounded:  # coarse scores: many ties within and across the two sets
        clean, adv = np.round(clean * 2) / 2, np.round(adv * 2) / 2
    return clean, adv


@pytest.mark.parametrize("seed,n0,n1,rounded", [(0, 40, 30, False), (1, 57, 13, True), (2, 5, 1, True), (3, 1, 9, False)])
def test_auroc_matches_pairwise_loop(seed, n0, n1, rounded):
    clean, adv = scores(seed, n0, n1, rounded)
    assert auroc(clean, adv) == pytest.approx(auroc_loop(clean, adv), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0, 1, 2], [3, 4]) == 1.0
    assert auroc([3, 4], [0, 1, 2]) == 0.0
    assert auroc([1, 1, 1], [1, 1]) == 0.5  # all ties: chance


@pytest.mark.parametrize("seed,rounded", [(0, False), (4, True)])
def test_roc_area_is_auroc_and_points_match_definition(seed, rounded):
    clean, adv = scores(seed, 50, 35, rounded)
    roc = roc_curve(clean, adv)
    assert roc.fpr[0] == 0 and roc.tpr[0] == 0 and roc.fpr[-1] == 1 and roc.tpr[-1] == 1
    assert np.all(np.diff(roc.fpr) >= 0) and np.all(np.diff(roc.tpr) >= 0)
    area = np.sum(np.diff(roc.fpr) * (roc.tpr[1:] + roc.tpr[:-1]) / 2)
    assert area == pytest.approx(auroc(clean, adv), abs=1e-12)
    for k in range(1, len(roc.thresholds)):
        t = roc.thresholds[k]
        assert roc.fpr[k] == np.mean(clean >= t) and roc.tpr[k] == np.mean(adv >= t)


@pytest.mark.parametrize("seed,n0,rounded,target", [(0, 200, False, 0.05), (5, 37, True, 0.05), (6, 60, True, 0.2), (7, 10, False, 0.0), (8, 10, False, 1.0)])
def test_tpr_at_fpr_matches_loop(seed, n0, rounded, target):
    clean, adv = scores(seed, n0, 41, rounded)
    assert tpr_at_fpr(clean, adv, target) == pytest.approx(tpr_at_fpr_loop(clean, adv, target), abs=1e-12)
    t = threshold_at_fpr(clean, target)
    assert flagged_rate(clean, t) <= target + 1e-12


def test_threshold_exact_quantile():
    clean = np.arange(200.0)  # 10 images (5%) lie above 189
    assert threshold_at_fpr(clean, 0.05) == 189.0
    assert flagged_rate(clean, 189.0) == 0.05


def test_detection_metrics_with_and_without_threshold():
    clean, adv = scores(9, 100, 80, False)
    m = detection_metrics(clean, adv, threshold=1.0)
    assert m.fpr_realised == np.mean(clean > 1.0) and m.tpr_realised == np.mean(adv > 1.0)
    assert (m.n_clean, m.n_adversarial) == (100, 80) and m.auroc == auroc(clean, adv)
    free = detection_metrics(clean, adv)
    assert np.isnan(free.fpr_realised) and free.as_json()["fpr_realised"] is None


@pytest.mark.parametrize(
    "clean,adv,match",
    [([], [1.0], "clean_scores must be a non-empty"), ([1.0], [[1.0]], "adversarial_scores must be a non-empty 1-D"),
     ([np.nan, 1.0], [1.0], "clean_scores contains NaN"), ([1.0], [np.inf], "adversarial_scores contains NaN")],
)
def test_bad_scores_raise(clean, adv, match):
    with pytest.raises(ValueError, match=match):
        auroc(clean, adv)


def test_bad_target_and_threshold_raise():
    with pytest.raises(ValueError, match=r"target_fpr must lie in \[0, 1\]"):
        tpr_at_fpr([1.0, 2.0], [3.0], 1.5)
    with pytest.raises(ValueError, match="threshold must be a number"):
        flagged_rate([1.0], float("nan"))
