"""detector.mahalanobis against loop-by-definition references."""
import numpy as np
import pytest
import torch

from detector.mahalanobis import fit_mahalanobis, ledoit_wolf, load_mahalanobis, reduce_features, save_mahalanobis
from detector.reference import Reduction


def test_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(0).normal(size=(30, 8)) @ np.diag(np.arange(1, 9))
    x -= x.mean(0)
    want_cov, want_s = sk.ledoit_wolf(x, assume_centered=True)
    got = ledoit_wolf(x)
    np.testing.assert_allclose(got.covariance, want_cov, atol=1e-10)
    assert got.shrinkage == pytest.approx(want_s, abs=1e-12)


def loop_scores(x, labels, num_classes, test):
    """By definition: class means, tied covariance, min over classes of (x - mu)^T S^-1 (x - mu)."""
    mus = {c: x[labels == c].mean(0) for c in range(num_classes) if (labels == c).any()}
    centred = np.stack([x[i] - mus[labels[i]] for i in range(len(x))])
    prec = np.linalg.pinv(ledoit_wolf(centred).covariance)
    return np.array([min((t - m) @ prec @ (t - m) for m in mus.values()) for t in test])


def test_layer_scores_match_loop():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=60)  # class 5 of 6 never seen
    feats = {"a": rng.normal(size=(60, 4)) + labels[:, None], "b": rng.normal(size=(60, 7))}
    det = fit_mahalanobis(feats, labels, num_classes=6)
    test = {"a": rng.normal(size=(9, 4)) * 2, "b": rng.normal(size=(9, 7))}
    got = det.layer_scores({n: torch.from_numpy(v) for n, v in test.items()})
    assert got.shape == (9, 2)
    for j, n in enumerate(("a", "b")):
        np.testing.assert_allclose(got[:, j], loop_scores(feats[n], labels, 6, test[n]), rtol=1e-8)


def test_outliers_score_higher_and_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 20)
    maps = rng.normal(size=(80, 3, 5, 5)) + labels[:, None, None, None]  # (N, channels, H, W)
    red = {"conv": Reduction("channel_pool", channels=3)}
    acts = {"conv": torch.from_numpy(maps.reshape(80, -1))}
    det = fit_mahalanobis(reduce_features(acts, red), labels, 4, red)
    clean = det.layer_scores({"conv": torch.from_numpy(maps[:10].reshape(10, -1))})
    odd = det.layer_scores({"conv": torch.from_numpy(maps[:10].reshape(10, -1) + 5.0)})
    assert (odd > clean).all()
    back = load_mahalanobis(save_mahalanobis(det, tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(back.layer_scores(acts), det.layer_scores(acts))
    assert back.reductions == det.reductions


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        fit_mahalanobis({"a": np.zeros((3, 2))}, np.array([0, 1, 7]), num_classes=3)
    with pytest.raises(ValueError, match=r"features\['a'\]"):
        fit_mahalanobis({"a": np.zeros((4, 2))}, np.array([0, 1, 2]), num_classes=3)
    det = fit_mahalanobis({"a": np.random.default_rng(0).normal(size=(6, 2))}, np.array([0, 1, 2] * 2), 3)
    with pytest.raises(ValueError, match="lacks layers"):
        det.layer_scores({"b": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="fitted on 2"):
        det.layer_scores({"a": torch.zeros(1, 5)})
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(Exception):
        load_mahalanobis(tmp_path / "x.safetensors")
