"""A calibration that cannot mislead (issue 27): a constant score refused, weak or small calibrations warned."""
import numpy as np
import pytest

from semguard.detector.calibrate import AUROC_FLOOR, MIN_TAIL, check_calibration, held_out_needed
from semguard.detector.flagger import fit_flagger

NAMES = ["fraction/a", "mahalanobis/a"]


def test_held_out_needed_is_min_tail_over_the_rate():
    assert held_out_needed(0.05) == 100 and held_out_needed(0.1) == 50 and held_out_needed(0.3) == 17
    assert MIN_TAIL == 5


def test_constant_score_is_refused():
    """The issue's bundle: every image got the same score (ln 11), the threshold equal to it."""
    same = np.ones((10, 2))
    flagger = fit_flagger(same, same, NAMES, "gaussian")
    with pytest.raises(ValueError, match=r"the fitted score is the constant .* on all 10 held-out clean images"):
        check_calibration(flagger, same, None)


def test_separating_score_passes_and_a_chance_score_is_warned():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(400, 2))
    flagger = fit_flagger(clean[:200], clean[200:], NAMES, "gaussian", target_fpr=0.05)
    far = rng.normal(size=(50, 2)) + 6.0
    auroc, warnings = check_calibration(flagger, clean[200:], far)
    assert auroc > 0.99 and warnings == ()
    auroc, warnings = check_calibration(flagger, clean[200:], rng.normal(size=(50, 2)))
    assert auroc < AUROC_FLOOR and len(warnings) == 1 and "below 0.6 (0.5 is chance)" in warnings[0]
    small = fit_flagger(clean[:20], clean[20:30], NAMES, "gaussian", target_fpr=0.05)
    _, warnings = check_calibration(small, clean[20:30], far)
    assert len(warnings) == 1 and "10 held-out clean images set the threshold and 0 of them lie above it" in warnings[0] and ">= 100" in warnings[0]
