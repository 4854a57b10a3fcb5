"""`detector calibrate` reads its clean images batch by batch (issue 27): the bundle is the one calibrating on
the images held in memory writes, bit for bit at the same tapped batch size, and within float32 rounding when
--memory-budget makes the batches smaller (a convolution's output differs in the last bit with the batch size on
CPU); no read holds more than one batch."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from semguard.detector.calibrate import CalibrationConfig, calibrate_guard, take
from semguard.evaluation.detector_eval import (
    SMALL_MIFGSM, AttackSpec, DetectorEvalConfig, calibrate_subject_guard, evaluate_detector, evaluate_subject_detector,
    load_images, predict, quick_config, split_clean, subject_clean_set, training_attacks,
)
from tests.evaluation.test_detector_eval import tiny_subject, tiny_world  # noqa: F401  (the fixture)

FILES = ("reference.safetensors", "mahalanobis.safetensors", "words.safetensors", "model.safetensors")


def tensors(path) -> tuple[dict, dict]:
    """(name -> array, metadata) of a safetensors file (its bytes may order the metadata keys differently)."""
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def assert_same_bundle(a, b, rtol: float) -> None:
    """Same files, metadata and tensors (rtol 0: bit for bit), flagger figures equal (within rtol)."""
    for name in FILES:
        (ta, ma), (tb, mb) = tensors(a / name), tensors(b / name)
        assert ma.keys() == mb.keys() and ta.keys() == tb.keys(), name
        for k in ma:  # JSON figures (e.g. Ledoit-Wolf shrinkage) beside the tensors
            assert ma[k] == mb[k] if rtol == 0 else _approx_nested(_parsed(ma[k]), _parsed(mb[k]), rtol), f"{name} {k}"
        for k in ta:
            np.testing.assert_allclose(ta[k], tb[k], rtol=rtol, atol=rtol * np.abs(tb[k]).max(), err_msg=f"{name} {k}")
    fa, fb = (json.loads((d / "flagger.json").read_text()) for d in (a, b))
    assert fa == fb if rtol == 0 else _approx_nested(fa, fb, rtol)
    manifest = [json.loads((d / "bundle.json").read_text()) for d in (a, b)]
    for m in manifest:
        m.pop("sha256", None)  # file digests: the safetensors bytes order metadata keys as a hash map does
    assert manifest[0] == manifest[1]


def _parsed(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _approx_nested(a, b, rtol: float) -> bool:
    """a equals b, numbers within rtol (relative or absolute), through lists and dicts (pytest.approx does not nest)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_approx_nested(a[k], b[k], rtol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_approx_nested(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return a == pytest.approx(b, rel=rtol, abs=rtol)  # abs: near-zero entries of a precision matrix
    return a == b


@pytest.mark.parametrize("method", ["gaussian", "logistic"])
def test_streamed_calibration_equals_the_in_memory_one_at_any_budget(tiny_world, tmp_path, method):
    subject = tiny_subject(tiny_world)
    train = (AttackSpec("train", "mifgsm", SMALL_MIFGSM, n_sources=24, batch_size=8),)
    cfg = DetectorEvalConfig(detector=CalibrationConfig(method=method, per_concept=2, target_fpr=0.1, k=6),
                             train_attacks=train, progress=False)
    reports = {}
    for name, budget in (("tiny", 1e-6), ("large", 64.0)):  # 1 image per tapped pass; the default 64
        subject.images.largest = 0
        reports[name] = calibrate_subject_guard(subject, tmp_path / name, cfg, allow_few_images=True,
                                                memory_budget_gib=budget)
        # never all 360 images at once: one tapped pass, or one attacked batch (8)
        assert subject.images.largest <= (1 if name == "tiny" and method == "gaussian" else 8 if name == "tiny" else 64)
    # the computation before streaming: every clean image in one tensor
    images, y = subject_clean_set(subject, None, cfg.seed)
    x = load_images(images, np.arange(len(y)))
    split = split_clean(y, cfg.eval_fraction, cfg.seed)
    attacks = None
    if method == "logistic":
        attacks, _ = training_attacks(subject.model, x, y, predict(subject.model, x, 64), split.calibration,
                                      subject.word_vectors, cfg)
    reports["memory"] = calibrate_guard(subject.model, subject.model_spec, subject.layers, list(subject.classes),
                                        subject.word_vectors, x[split.calibration], y[split.calibration],
                                        tmp_path / "memory", model_name=subject.name, attack_images=attacks,
                                        config=cfg.detector, source_weights=subject.source_weights)
    assert_same_bundle(tmp_path / "large", tmp_path / "memory", rtol=0)
    assert reports["large"]._replace(bundle_dir=None) == reports["memory"]._replace(bundle_dir=None)
    assert_same_bundle(tmp_path / "tiny", tmp_path / "memory", rtol=1e-5)
    tiny, memory = reports["tiny"], reports["memory"]
    assert tiny.threshold == pytest.approx(memory.threshold, rel=1e-5) and tiny.fpr_calib == memory.fpr_calib
    assert (tiny.n_fit, tiny.n_calib, tiny.n_references) == (memory.n_fit, memory.n_calib, memory.n_references)
    assert reports["memory"].n_fit + reports["memory"].n_calib == len(split.calibration)


def test_take_composes_subsets_and_rows(tiny_world):
    subject = tiny_subject(tiny_world)
    from torch.utils.data import Subset

    inner = take(subject.images, np.array([5, 7, 9, 11]))
    outer = take(inner, np.array([3, 1]))
    assert isinstance(outer, Subset) and outer.dataset is subject.images and list(outer.indices) == [11, 7]
    np.testing.assert_array_equal(take(tiny_world[1], np.array([2, 0])), tiny_world[1][[2, 0]])


def test_memory_budget_flag_reaches_calibration(tiny_world, tmp_path, monkeypatch):
    import semguard.evaluation.detector_eval as de
    import semguard.subject.core as core
    from semguard.cli import main

    seen = []
    monkeypatch.setattr(core, "load_subject", lambda spec, progress=True: tiny_subject(tiny_world))
    real = de.calibrate_subject_guard
    monkeypatch.setattr(de, "calibrate_subject_guard", lambda *a: seen.append(a[-1]) or real(*a))
    flags = ["--model", "tiny", "--weights", "tiny.pth", "--method", "gaussian", "--references", "6", "--quiet",
             "--allow-few-images", "--target-fpr", "0.2"]
    assert main(["detector", "calibrate", "--out", str(tmp_path / "b"), *flags, "--memory-budget", "0.5"]) == 0
    assert seen == [0.5]
    with pytest.raises(SystemExit, match="--memory-budget must be > 0 GiB"):
        main(["detector", "calibrate", "--out", str(tmp_path / "c"), *flags, "--memory-budget", "0"])


def test_streamed_evaluation_equals_the_in_memory_one(tiny_world, tmp_path):
    """evaluate on the subject's images read batch by batch gives the figures of evaluate on them in memory."""
    subject = tiny_subject(tiny_world)
    cfg = quick_config(DetectorEvalConfig(detector=CalibrationConfig(method="gaussian", per_concept=2, target_fpr=0.1, k=6),
                                          variants=("mahalanobis_gaussian",), art_layer=None, progress=False), 12)
    subject.images.largest = 0
    streamed = evaluate_subject_detector(subject, tmp_path / "streamed", cfg, memory_budget_gib=64.0).results
    assert subject.images.largest <= cfg.batch_size < len(subject.images)
    images, y = subject_clean_set(subject, None, cfg.seed)
    held = evaluate_detector(subject.model, subject.model_spec, subject.layers, list(subject.classes),
                             np.asarray(subject.word_vectors), load_images(images, np.arange(len(y))), y,
                             tmp_path / "memory", cfg, model_name=subject.name).results
    for r in (streamed, held):
        r.pop("timings_s")
        for section in (*r["per_attack"].values(), *r["train_attacks"].values()):
            section.pop("attack_seconds", None)
    assert streamed == held
    assert_same_bundle(tmp_path / "streamed" / "bundle", tmp_path / "memory" / "bundle", rtol=0)
