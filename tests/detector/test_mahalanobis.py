"""detector.mahalanobis against loop-by-definition references."""
import numpy as np
import pytest
import torch

from semguard.detector.mahalanobis import fit_mahalanobis, ledoit_wolf, load_mahalanobis, reduce_features, save_mahalanobis
from semguard.detector.reference import Reduction


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


@pytest.mark.parametrize("b,channels,hw", [(3, 64, 12544), (5, 7, 9), (1, 2048, 49), (2, 1, 1)])
def test_channel_means_in_float64_without_a_float64_copy_are_bit_exact(b, channels, hw):
    from semguard.detector.mahalanobis import _reduce_rows_float64

    acts = torch.relu(torch.randn(b, channels * hw, generator=torch.Generator().manual_seed(b)))
    red = Reduction("channel_pool", channels=channels)
    assert torch.equal(_reduce_rows_float64(red, acts), red.apply(acts.double()))
    with pytest.raises(ValueError, match=f"do not split into {channels * hw + 1} channels"):
        _reduce_rows_float64(Reduction("channel_pool", channels=channels * hw + 1), acts)


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


def direct_scores(det, feats):
    """The score written out per layer with nothing cached: min_c (x - mu_c)^T P (x - mu_c) over seen classes."""
    out = []
    for n in det.layers:
        mu, prec = det.means[n], det.precisions[n]
        mu = mu[np.isfinite(mu).all(1)]
        diff = feats[n][:, None, :] - mu[None]  # (B, C, d)
        out.append(np.einsum("bcd,de,bce->bc", diff, prec, diff).min(1))
    return np.stack(out, 1)


def test_cached_class_constants_give_the_direct_scores():
    # the per-class constants mu^T P mu are computed once; scores must not change across calls or batches
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 7, size=80)  # classes 7 and 8 never seen: NaN means, skipped
    feats = {"a": rng.normal(size=(80, 6)) * 3 + labels[:, None], "b": rng.normal(size=(80, 11)) + 50.0}
    det = fit_mahalanobis(feats, labels, num_classes=9)
    for batch in (1, 13):
        test = {n: rng.normal(size=(batch, v.shape[1])) * 2 + v.mean() for n, v in feats.items()}
        acts = {n: torch.from_numpy(v) for n, v in test.items()}
        want = direct_scores(det, test)
        np.testing.assert_allclose(det.layer_scores(acts), want, rtol=1e-9)
        np.testing.assert_array_equal(det.layer_scores(acts), det.layer_scores(acts))  # second call: cached constants
    assert det.layer_scores({n: torch.zeros(0, v.shape[1], dtype=torch.float64) for n, v in feats.items()}).shape == (0, 2)


def test_layers_of_one_width_are_scored_together_and_large_ones_alone():
    # small layers of one width share one batched product (a, c); a layer above _STACKED_BYTES keeps its own
    # group, a view of the stored arrays (no stacked copy); scores come back in the detector's layer order
    from semguard.detector.mahalanobis import _STACKED_BYTES

    rng = np.random.default_rng(4)
    labels = rng.permutation(np.arange(90) % 6)  # every class seen: a single layer's means are used as stored
    feats = {"a": rng.normal(size=(90, 4)) + labels[:, None], "big": rng.normal(size=(90, 600)),
             "c": rng.normal(size=(90, 4)) * 2, "b": rng.normal(size=(90, 7)) + 3.0}
    det = fit_mahalanobis(feats, labels, num_classes=6)
    assert det.means["big"].nbytes + det.precisions["big"].nbytes > _STACKED_BYTES
    groups = {tuple(det.layers[j] for j in g.columns): g for g in det._groups}
    assert set(groups) == {("a", "c"), ("big",), ("b",)}
    assert groups[("big",)].precisions.data_ptr() == torch.from_numpy(det.precisions["big"]).data_ptr()
    assert groups[("big",)].means_t.data_ptr() == torch.from_numpy(det.means["big"]).data_ptr()
    for batch in (1, 6):
        test = {n: rng.normal(size=(batch, v.shape[1])) * 2 for n, v in feats.items()}
        got = det.layer_scores({n: torch.from_numpy(v) for n, v in test.items()})
        np.testing.assert_allclose(got, direct_scores(det, test), rtol=1e-9)
    with pytest.raises(ValueError, match="acts\\['c'\\] gives 5 features, the detector was fitted on 4"):
        det.layer_scores({**{n: torch.from_numpy(v[:1]) for n, v in feats.items()}, "c": torch.zeros(1, 5, dtype=torch.float64)})
