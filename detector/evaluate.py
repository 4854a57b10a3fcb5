"""Detection figures from scores: AUROC, ROC curve, TPR at a target FPR, realised rates.

Pure array functions. Convention everywhere: larger score = more suspicious; an image is
flagged at threshold t when score > t (as `detector.flagger.Flagger.flag`). "Clean" images are
the negatives, adversarial images the positives.

AUROC is the Mann-Whitney statistic (Mann & Whitney 1947; Hanley & McNeil 1982):

    AUROC = P(s_adv > s_clean) + 1/2 P(s_adv = s_clean) = U / (n_clean n_adv),
    U = R_adv - n_adv (n_adv + 1) / 2,

with R_adv the sum of the adversarial scores' ranks among all scores (ties get their average
rank, which is what counts a tie half), so it costs one sort instead of n_clean x n_adv pairs.
It equals the trapezoidal area under `roc_curve`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata


class RocCurve(NamedTuple):
    fpr: np.ndarray  # (T,) false-positive rate, non-decreasing, from 0 to 1
    tpr: np.ndarray  # (T,) true-positive rate, non-decreasing, from 0 to 1
    thresholds: np.ndarray  # (T,) point k flags score >= thresholds[k]; thresholds[0] = +inf (nothing flagged)


class DetectionMetrics(NamedTuple):
    auroc: float
    tpr_at_fpr: float  # best TPR of any threshold whose FPR on these clean images is <= target_fpr
    target_fpr: float
    fpr_realised: float  # at the given (calibrated) threshold, on these clean images; NaN without one
    tpr_realised: float  # at the given threshold, on these adversarial images; NaN without one
    n_clean: int
    n_adversarial: int

    def as_json(self) -> dict:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self._asdict().items()}


def _scores(name: str, x) -> np.ndarray:
    s = np.asarray(x, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite scores")
    return s


def _target(target_fpr: float) -> float:
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must lie in [0, 1], got {target_fpr}")
    return float(target_fpr)


def auroc(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> float:
    """Area under the ROC curve: clean (n0,) and adversarial (n1,) scores -> P(adv > clean), ties half."""
    c, a = _scores("clean_scores", clean_scores), _scores("adversarial_scores", adversarial_scores)
    ranks = rankdata(np.concatenate([c, a]))  # average ranks: a tie contributes one half
    u = ranks[len(c):].sum() - len(a) * (len(a) + 1) / 2.0
    return float(u / (len(c) * len(a)))


def roc_curve(clean_scores: np.ndarray, adversarial_scores: np.ndarray) -> RocCurve:
    """ROC points at every distinct score (flag score >= t), from (0, 0) to (1, 1)."""
    c, a = _scores("clean_scores", clean_scores), _scores("adversarial_scores", adversarial_scores)
    t = np.unique(np.concatenate([c, a]))[::-1]  # (T - 1,) descending
    c_sorted, a_sorted = np.sort(c), np.sort(a)
    # count of scores >= t: n - (number strictly below t)
    fp = len(c) - np.searchsorted(c_sorted, t, side="left")
    tp = len(a) - np.searchsorted(a_sorted, t, side="left")
    return RocCurve(np.r_[0.0, fp / len(c)], np.r_[0.0, tp / len(a)], np.r_[np.inf, t])


def threshold_at_fpr(clean_scores: np.ndarray, target_fpr: float = 0.05) -> float:
    """Smallest threshold t with mean(clean > t) <= target_fpr (-inf when every image may be flagged).

    With m = floor(target_fpr * n) clean images allowed above t, t is the (m + 1)-th largest clean
    score; ties there can only lower the realised FPR.
    """
    c = np.sort(_scores("clean_scores", clean_scores))[::-1]
    m = int(np.floor(_target(target_fpr) * len(c) + 1e-9))  # 1e-9: 0.05 * 200 must give 10, not 9
    return float(c[m]) if m < len(c) else -np.inf


def tpr_at_fpr(clean_scores: np.ndarray, adversarial_scores: np.ndarray, target_fpr: float = 0.05) -> float:
    """Best TPR over thresholds whose FPR on `clean_scores` is at most target_fpr (flag: score > t)."""
    a = _scores("adversarial_scores", adversarial_scores)
    return float((a > threshold_at_fpr(clean_scores, target_fpr)).mean())


def flagged_rate(scores: np.ndarray, threshold: float) -> float:
    """Fraction of `scores` above `threshold`: the realised FPR on clean scores, TPR on adversarial."""
    if not np.isfinite(threshold) and not np.isinf(threshold):
        raise ValueError(f"threshold must be a number, got {threshold}")
    return float((_scores("scores", scores) > threshold).mean())


def detection_metrics(
    clean_scores: np.ndarray,
    adversarial_scores: np.ndarray,
    threshold: float | None = None,
    target_fpr: float = 0.05,
) -> DetectionMetrics:
    """All figures of one detector on one attack; `threshold` is the detector's calibrated one, if any."""
    c, a = _scores("clean_scores", clean_scores), _scores("adversarial_scores", adversarial_scores)
    nan = float("nan")
    return DetectionMetrics(
        auroc=auroc(c, a),
        tpr_at_fpr=tpr_at_fpr(c, a, target_fpr),
        target_fpr=_target(target_fpr),
        fpr_realised=flagged_rate(c, threshold) if threshold is not None else nan,
        tpr_realised=flagged_rate(a, threshold) if threshold is not None else nan,
        n_clean=len(c),
        n_adversarial=len(a),
    )
