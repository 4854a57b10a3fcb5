"""detector.guard end to end on a tiny random CNN: calibrate -> bundle -> load -> inspect, and bad input."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from semguard.detector.bundle import BundleError, read_bundle
from semguard.models.factory import ModelSpec
from semguard.detector.calibrate import CalibrationConfig, fit_calib_split, guard_features
from semguard.detector.features import FeatureRecipe, recipe_of
from semguard.detector.guard import Guard, Verdict, calibrate_guard
from semguard.detector.layers import LayerTap
from tests.tiny_cnn import LAYERS, tiny_task

N_CLASSES = 8




@pytest.fixture(scope="module")
def world():
    return tiny_task(N_CLASSES, 160)[:4]


@pytest.fixture(scope="module")
def bundle_dir(world, tmp_path_factory):
    model, images, labels, words = world
    out = tmp_path_factory.mktemp("bundle")
    report = calibrate_guard(
        model, ModelSpec("tiny_cnn_test", {"width": 6}), LAYERS, [f"c{i}" for i in range(N_CLASSES)], words,
        images, labels, out, config=CalibrationConfig(k=100, per_concept=3, target_fpr=0.1, batch_size=32),
    )
    assert report.n_references >= 4 and report.clean_accuracy == 1.0
    assert report.fpr_calib <= 0.1
    return out


def test_bundle_files_and_manifest(bundle_dir):
    names = {p.name for p in bundle_dir.iterdir()}
    assert {"bundle.json", "model.safetensors", "words.safetensors", "reference.safetensors", "flagger.json",
            "mahalanobis.safetensors"} <= names
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert manifest["layers"] == LAYERS and manifest["input_shape"] == [3, 8, 8]
    assert len(manifest["sha256"]) == 5


def test_inspect_matches_model_and_arrays(world, bundle_dir):
    model, images, labels, _ = world
    guard = Guard.load(bundle_dir)
    assert guard.info.layers == LAYERS and guard.info.input_shape == (3, 8, 8)
    verdicts = guard.inspect(images[:5])
    assert len(verdicts) == 5 and all(isinstance(v, Verdict) for v in verdicts)
    with torch.no_grad():
        logits = model(images[:5]).numpy()
    for v, row in zip(verdicts, logits):
        assert v.prediction == int(row.argmax()) and v.label == f"c{v.prediction}"
        np.testing.assert_allclose(v.logits, row, rtol=1e-5, atol=1e-6)
        assert v.top5[0][0] == v.prediction and len(v.top5) == 5
        assert v.signature.shape == (3,) and np.all((v.signature >= 0) & (v.signature <= 1))
        assert set(v.disagreeing_layers) <= set(LAYERS)
    out = guard.inspect_arrays(images[:5])
    assert out.signature.shape == (5, 3) and out.score.shape == (5,)
    assert all(t >= 0 for t in out.timings)
    np.testing.assert_array_equal(out.flagged, out.score > guard.info.threshold)


def test_inspect_is_batch_independent(bundle_dir, world):
    guard = Guard.load(bundle_dir)
    images = world[1]
    one = guard.inspect_arrays(images[3:4])
    many = guard.inspect_arrays(images[:8])
    np.testing.assert_allclose(one.signature[0], many.signature[3], atol=1e-12)
    np.testing.assert_allclose(one.score[0], many.score[3], rtol=1e-5)


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.zeros(2, 3, 16, 16), r"shape \(B, 3, 8, 8\)"),
        (torch.zeros(2, 1, 8, 8), r"shape \(B, 3, 8, 8\)"),
        (torch.zeros(0, 3, 8, 8), "empty batch"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.float64), "float32"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
        (torch.zeros(2, 3, 8, 8).index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"))), "NaN"),
        (torch.zeros(2, 3, 8, 8).index_put_((torch.tensor(0),), torch.tensor(float("inf"))), "infinite"),
        (torch.zeros(2, 3, 8, 8).index_put_((torch.tensor(1),), torch.tensor(-float("inf"))), "infinite"),
        (torch.full((2, 3, 8, 8), 255.0), r"\[0, 1\]"),
    ],
)
def test_bad_images_raise(bundle_dir, images, match):
    guard = Guard.load(bundle_dir)
    with pytest.raises(ValueError, match=match):
        guard.inspect(images)


def copy_bundle(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_missing_file_and_tampered_file(bundle_dir, tmp_path):
    b = copy_bundle(bundle_dir, tmp_path)
    (b / "flagger.json").unlink()
    with pytest.raises(BundleError, match="missing flagger.json"):
        Guard.load(b)
    b2 = copy_bundle(bundle_dir, tmp_path / "2")
    (b2 / "reference.safetensors").write_bytes((b2 / "reference.safetensors").read_bytes()[:-4] + b"    ")
    with pytest.raises(BundleError, match="sha256"):
        Guard.load(b2)
    with pytest.raises(BundleError, match="no bundle.json"):
        Guard.load(tmp_path / "nowhere")


def test_bundle_from_another_model(bundle_dir, tmp_path, world):
    """A bundle whose weights come from a model of another shape: clear error, not a crash."""
    b = copy_bundle(bundle_dir, tmp_path)
    manifest = json.loads((b / "bundle.json").read_text())
    manifest["model"]["kwargs"] = {"width": 4}
    (b / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not fit builder"):
        Guard.load(b)
    manifest["model"]["kwargs"] = {"width": 6}
    manifest["labels"] = manifest["labels"][:-1]
    (b / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="label count mismatch"):
        Guard.load(b)
    manifest["labels"] = [f"c{i}" for i in range(N_CLASSES)]
    manifest["layers"] = ["conv1", "relu1", "pool"]
    (b / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="layers"):
        Guard.load(b)
    manifest["layers"] = LAYERS
    manifest["model"]["builder"] = "no_such_model"
    (b / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not registered"):
        Guard.load(b)
    manifest["model"]["module"] = "os"
    (b / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the .semguard. package"):
        Guard.load(b)


def test_logistic_flagger_with_attack_images(world, tmp_path):
    model, images, labels, words = world
    attack = (images[:40] + 0.3 * torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    cfg = CalibrationConfig(per_concept=3, method="logistic", features=("fraction", "mahalanobis"), space="class_similarity")
    report = calibrate_guard(model, ModelSpec("tiny_cnn_test", {"width": 6}), LAYERS, [f"c{i}" for i in range(N_CLASSES)],
                             words, images, labels, tmp_path, attack_images=attack, config=cfg)
    bundle = read_bundle(report.bundle_dir)
    assert bundle.flagger.method == "logistic" and bundle.bank.space == "class_similarity"
    guard = Guard(bundle)
    assert guard.inspect_arrays(attack).score.mean() > guard.inspect_arrays(images[:40]).score.mean()


def test_ensemble_flagger_and_sketched_bank(world, tmp_path):
    # the shipped flagger (ensemble) with the large-model bank (layers wider than 100 count-sketched to 37)
    model, images, labels, words = world
    attack = (images[:40] + 0.3 * torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    cfg = CalibrationConfig(per_concept=3, method="ensemble", bank_max_width=100, bank_projection_dim=37)
    report = calibrate_guard(model, ModelSpec("tiny_cnn_test", {"width": 6}), LAYERS, [f"c{i}" for i in range(N_CLASSES)],
                             words, images, labels, tmp_path, attack_images=attack, config=cfg)
    bundle = read_bundle(report.bundle_dir)
    wide = {n for n, b in report.bank_bytes.items() if b == 4 * 37 * len(bundle.bank.concepts)}
    assert wide and {n: r.kind for n, r in bundle.bank.reductions.items()} == {n: "sketch" for n in wide}
    assert bundle.flagger.method == "ensemble" and bundle.flagger.params["weights"].shape[0] == 2
    guard = Guard(bundle)
    assert guard.inspect_arrays(attack).score.mean() > guard.inspect_arrays(images[:40]).score.mean()


def test_ensemble_members_are_cut_to_the_configured_features():
    from semguard.detector.calibrate import ensemble_members

    cfg = CalibrationConfig(method="ensemble", features=("fraction", "mahalanobis"))
    assert ensemble_members(cfg) == (("fraction", "mahalanobis"), ("mahalanobis",))
    assert ensemble_members(CalibrationConfig(method="ensemble", features=("fraction", "margin"))) == (("fraction", "margin"),)
    assert ensemble_members(CalibrationConfig(method="logistic")) is None
    with pytest.raises(ValueError, match="features must be a non-empty subset"):
        ensemble_members(CalibrationConfig(method="ensemble", features=("words",)))
    with pytest.raises(ValueError, match="share no kind"):
        ensemble_members(CalibrationConfig(method="ensemble", features=("margin",), members=(("mahalanobis",),)))


# ----------------------------------------------------------------------------- one feature function


SHIPPED = CalibrationConfig(method="ensemble")  # features and members as evaluation.detector_eval ships them
BATCH = 32


def attack_like(images: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (images[:40] + 0.3 * noise).clamp(0, 1)


@pytest.fixture(scope="module")
def ensemble_dir(world, tmp_path_factory):
    model, images, labels, words = world
    cfg = dataclasses.replace(SHIPPED, per_concept=3, target_fpr=0.1, batch_size=BATCH)
    out = tmp_path_factory.mktemp("ensemble")
    calibrate_guard(model, ModelSpec("tiny_cnn_test", {"width": 6}), LAYERS, [f"c{i}" for i in range(N_CLASSES)], words,
                    images, labels, out, attack_images=attack_like(images, 7), config=cfg)
    return out, cfg


def served_features(guard: Guard, images: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([guard.inspect_arrays(images[i : i + batch]).features for i in range(0, len(images), batch)])


def test_calibration_and_serving_compute_the_same_features(world, ensemble_dir):
    """Exact equality in the same batches: both paths are one function (features.flagger_features)
    on the same float32 activations. Another batching changes only float32 matmul rounding."""
    model, images, _, _ = world
    bundle_dir, cfg = ensemble_dir
    bundle, guard = read_bundle(bundle_dir), Guard.load(bundle_dir)
    assert bundle.flagger.method == "ensemble" and len(bundle.flagger.params["weights"]) == 2
    calibrated = guard_features(LayerTap(model, LAYERS), images, bundle.bank, bundle.mahalanobis, cfg.features,
                                cfg.n_alternatives, cfg.seed, BATCH)
    assert calibrated.features.shape == (len(images), len(bundle.flagger.feature_names))
    np.testing.assert_array_equal(served_features(guard, images, BATCH), calibrated.features)
    np.testing.assert_allclose(served_features(guard, images, 7), calibrated.features, rtol=1e-5, atol=1e-6)


def test_served_scores_reproduce_the_calibrated_threshold(world, ensemble_dir):
    """The flagger's centre and threshold, recomputed from what the served guard computes."""
    _, images, labels, _ = world
    bundle_dir, cfg = ensemble_dir
    guard = Guard.load(bundle_dir)
    fl = guard.bundle.flagger
    fit, calib = fit_calib_split(len(labels), cfg.calib_fraction, cfg.seed)
    np.testing.assert_array_equal(served_features(guard, images[fit], BATCH).mean(0), fl.center)
    scores = np.concatenate([guard.inspect_arrays(images[calib][i : i + BATCH]).score for i in range(0, len(calib), BATCH)])
    assert np.quantile(scores, 1 - cfg.target_fpr, method="higher") == fl.threshold
    assert (scores > fl.threshold).mean() == fl.calibration["fpr_calib"]


def test_served_feature_columns_follow_the_configured_order(world, tmp_path):
    # the guard once rebuilt the column order from a fixed list of kinds, not from the flagger's columns
    model, images, labels, words = world
    cfg = CalibrationConfig(per_concept=3, target_fpr=0.1, batch_size=BATCH, features=("mahalanobis", "fraction"))
    calibrate_guard(model, ModelSpec("tiny_cnn_test", {"width": 6}), LAYERS, [f"c{i}" for i in range(N_CLASSES)], words,
                    images, labels, tmp_path, config=cfg)
    guard = Guard.load(tmp_path)
    assert guard.recipe.kinds == ("mahalanobis", "fraction")
    _, calib = fit_calib_split(len(labels), cfg.calib_fraction, cfg.seed)
    scores = np.concatenate([guard.inspect_arrays(images[calib][i : i + BATCH]).score for i in range(0, len(calib), BATCH)])
    assert np.quantile(scores, 1 - cfg.target_fpr, method="higher") == guard.info.threshold


def test_feature_recipe_checks_its_parts(bundle_dir):
    bundle = read_bundle(bundle_dir)
    with pytest.raises(ValueError, match="feature kinds must be a non-empty subset"):
        FeatureRecipe(bundle.bank, bundle.mahalanobis, ("words",))
    with pytest.raises(ValueError, match="mahalanobis: .* needs a fitted MahalanobisDetector"):
        FeatureRecipe(bundle.bank, None, ("fraction", "mahalanobis"))
    shuffled = dataclasses.replace(bundle.flagger, feature_names=bundle.flagger.feature_names[::-1])
    with pytest.raises(BundleError, match="feature columns"):
        recipe_of(dataclasses.replace(bundle, flagger=shuffled))
