"""evaluation.adaptive_eval on a tiny CNN: every threat model's keys, cells decided by the exact detectors, the
gray-box attacker calibrating its own detectors without reading the real bundle."""
import json
import os
import stat
import sys

import numpy as np
import pytest
import torch

from semguard.evaluation.adaptive_eval import (
    THREAT_MODELS, AdaptiveConfig, AttackerView, attack_plan, attacker_detectors, eps_label, wilson_interval,
)
from semguard.evaluation.detector_eval import AttackSpec, DetectorEvalConfig, evaluate_detector, split_clean
from semguard.models.factory import ModelSpec
from semguard.detector.calibrate import CalibrationConfig
from tests.evaluation.test_detector_eval import N_CLASSES, tiny_world  # noqa: F401 (fixture)
from tests.tiny_cnn import LAYERS

FAST = dict(n_sources=24, batch_size=24)
SPEC = ModelSpec("tiny_cnn_test", {"width": 8, "num_classes": N_CLASSES})
NAMES = [f"c{i}" for i in range(N_CLASSES)]


def tiny_config(**adaptive) -> DetectorEvalConfig:
    return DetectorEvalConfig(
        detector=CalibrationConfig(method="ensemble", per_concept=2, target_fpr=0.1, batch_size=64),
        attacks=(AttackSpec("mifgsm_paper", "mifgsm", {"eps": 0.15, "step": 0.03, "iterations": 10}, **FAST),),
        train_attacks=(AttackSpec("train", "mifgsm", {"eps": 0.15, "step": 0.03, "iterations": 10}, **FAST),),
        variants=("signature_only", "mahalanobis"), art_layer="relu2", art_epochs=2, progress=False,
        adaptive=AdaptiveConfig(**{"eps": (0.1, 0.3), "n_images": 12, "iterations": 12,
                                   "modes": ("combined", "orthogonal"), **adaptive}))


def test_adaptive_evaluation_writes_every_threat_model(tiny_world, tmp_path):
    model, images, labels, words = tiny_world
    ev = evaluate_detector(model, SPEC, LAYERS, NAMES, words, images, labels, tmp_path, tiny_config())
    a = ev.results["adaptive"]
    assert list(a) == list(THREAT_MODELS)
    assert json.loads((tmp_path / "detector_eval.json").read_text())["adaptive"].keys() == a.keys()
    for tm in THREAT_MODELS:
        assert list(a[tm]) == ["0.1", "0.3"]
        for cells in a[tm].values():
            assert set(cells) == {"detector", "mahalanobis", "signature_only", "art_binary_activation"}
            for c in cells.values():
                assert 0 <= c["evasion"] <= c["attack_success"] <= 1
                low, high = c["evasion_ci95"]
                assert low <= c["evasion"] <= high
                assert c["mean_linf"] <= 0.3 + 1e-5 and c["attack_seconds"] >= 0
    big = a["white_box"]["0.3"]
    assert big["detector"]["attack_success"] >= 0.9  # each attack reaches its target at a large eps
    assert big["art_binary_activation"]["attack_success"] >= 0.9
    # knowing the detector helps: white-box evasion of the guard at least the naive attack's
    assert big["detector"]["evasion"] >= a["naive"]["0.3"]["detector"]["evasion"]
    assert "evasion_own_detector" in a["gray_box"]["0.3"]["detector"]
    assert (tmp_path / "adaptive_evasion.png").stat().st_size > 0 and (tmp_path / "adaptive_loss_curves.png").exists()
    assert ev.results["adaptive_settings"]["n_images"] == 12


def test_gray_box_attacker_never_reads_the_real_bundle(tiny_world, tmp_path):
    """The real bundle's secret files made unreadable (mode 000) and every open() of the process audited: the
    attacker still calibrates its own detectors and attacks them, and touches no file of the real bundle."""
    model, images, labels, words = tiny_world
    cfg = tiny_config()
    real = tmp_path / "real"
    evaluate_detector(model, SPEC, LAYERS, NAMES, words, images, labels, real,
                      __import__("dataclasses").replace(cfg, adaptive=None))
    secret = [p for p in (real / "bundle").rglob("*") if p.is_file()]
    assert secret
    opened: list[str] = []
    watching = [True]

    def audit(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(audit)  # cannot be removed: switched off by `watching` below
    modes = {p: p.stat().st_mode for p in secret}
    try:
        for p in secret:
            p.chmod(0)
        x = images
        y = np.asarray(labels)
        split = split_clean(y, cfg.eval_fraction, cfg.seed)
        sources, targets = attack_plan(y, y, split.evaluation, 8, 0)
        view = AttackerView(model, SPEC, LAYERS, NAMES, words, None)
        own = attacker_detectors(view, x, y, y, np.setdiff1d(split.evaluation, sources),
                                 ("detector", "mahalanobis", "art_binary_activation"), cfg, 1, None, tmp_path / "own")
        from semguard.evaluation.adaptive_eval import strongest, surrogate_of

        adv, runs = strongest(surrogate_of(model, own["detector"]), x[sources], torch.as_tensor(targets), 0.3,
                              cfg.adaptive)
    finally:
        watching[0] = False
        for p, m in modes.items():
            p.chmod(stat.S_IMODE(m))
    assert set(own) == {"detector", "mahalanobis", "art_binary_activation"}
    assert runs[0].reached.mean() >= 0.9 and adv.shape == x[sources].shape
    root = str(real.resolve())
    assert opened and not [p for p in opened if os.path.abspath(p).startswith(root)]


def test_plan_and_labels():
    y = np.repeat(np.arange(4), 5)
    pred = y.copy()
    pred[0] = 1
    s, t = attack_plan(y, pred, np.arange(20), 30, 0)
    assert 0 not in s and len(s) == 19 and np.all(t != y[s]) and np.all((t >= 0) & (t < 4))
    assert eps_label(8 / 255) == "8/255" and eps_label(0.15) == "0.15"


@pytest.mark.parametrize("k,n", [(0, 12), (7, 12), (12, 12), (49, 50), (86, 100)])
def test_wilson_interval_is_the_textbook_formula(k, n):
    z, p = 1.959963984540054, k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson_interval(k, n) == pytest.approx([centre - half, centre + half], abs=1e-12)


@pytest.mark.parametrize("kwargs,match", [({"threat_models": ("black_box",)}, "threat_models"),
                                          ({"detectors": ("x",)}, "detectors"), ({"modes": ("naive",)}, "modes"),
                                          ({"eps": ()}, "eps")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveConfig(**kwargs)


def test_art_surrogate_forward_is_arts_detect_and_its_gradient_reaches_the_image(tiny_world):
    from semguard.evaluation.adaptive_eval import surrogate_of
    from semguard.evaluation.detector_eval import art_binary_detector

    model, images, _, _ = tiny_world
    noisy = (images[:60] + 0.3 * torch.randn(60, 3, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    d = art_binary_detector(model, images[60:180], noisy, "relu2", epochs=1, seed=0)
    surrogate = surrogate_of(model, d)
    x = images[:16].clone().requires_grad_(True)
    out = surrogate(x)
    np.testing.assert_allclose(out.score.detach().numpy(), d.score(images[:16]), rtol=1e-5, atol=1e-5)
    assert np.array_equal(surrogate.verdict(images[:16]).flagged, d.score(images[:16]) > d.threshold)
    (g,) = torch.autograd.grad(out.score.sum(), x)
    assert (g.flatten(1).norm(dim=1) > 0).all()
