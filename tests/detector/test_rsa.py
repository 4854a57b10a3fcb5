"""detector.rsa against loop-by-definition references."""
import numpy as np
import pytest
import torch

from semguard.detector.rsa import (
    correlation_matrix,
    cross_correlation,
    one_vs_two,
    one_vs_two_margin,
    two_vs_two,
    two_vs_two_pairs,
    two_vs_two_per_concept,
)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r by the textbook formula; 0 when either side is constant (rsa's convention)."""
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denominator < 1e-12 else float((x * y).sum() / denominator)


def correlation_matrix_loop(m: np.ndarray) -> np.ndarray:
    n = len(m)
    c = np.array([[pearson(m[i], m[j]) for j in range(n)] for i in range(n)])
    np.fill_diagonal(c, 1.0)
    return c


def two_vs_two_pairs_loop(c_i: np.ndarray, c_d: np.ndarray) -> np.ndarray:
    w = len(c_i)
    out = np.zeros((w, w))
    for a in range(w):
        for b in range(a + 1, w):
            keep = [j for j in range(w) if j not in (a, b)]
            i1, i2, d1, d2 = c_i[a, keep], c_i[b, keep], c_d[a, keep], c_d[b, keep]
            diff = (pearson(i1, d1) + pearson(i2, d2)) - (pearson(i1, d2) + pearson(i2, d1))
            out[a, b] = out[b, a] = 1.0 if diff > 1e-12 else 0.0 if diff < -1e-12 else 0.5
    return out


def related_pair(rng, w, k=24, noise=1.5):
    x = rng.normal(size=(w, k))
    y = x[:, : k - 4] + noise * rng.normal(size=(w, k - 4))
    return correlation_matrix(x), correlation_matrix(y)


@pytest.mark.parametrize("n,k", [(2, 2), (3, 5), (10, 7), (40, 100)])
def test_correlation_matrix_matches_loop(n, k):
    m = np.random.default_rng(n).normal(size=(n, k)) * 3 + 1
    np.testing.assert_allclose(correlation_matrix(m), correlation_matrix_loop(m), atol=1e-12)


def test_correlation_matrix_constant_row_correlates_zero():
    m = np.random.default_rng(0).normal(size=(5, 8))
    m[2] = 4.0
    c = correlation_matrix(m)
    assert np.isfinite(c).all()
    np.testing.assert_array_equal(c[2, [0, 1, 3, 4]], 0.0)
    assert c[2, 2] == 1.0
    np.testing.assert_allclose(c, correlation_matrix_loop(m), atol=1e-12)


def test_correlation_matrix_accepts_torch_float32():
    m = np.random.default_rng(1).normal(size=(6, 9)).astype(np.float32)
    np.testing.assert_allclose(correlation_matrix(torch.from_numpy(m)), correlation_matrix(m), atol=1e-12)


@pytest.mark.parametrize("bad,match", [
    (np.zeros(5), "2-D"),
    (np.zeros((4, 1)), "at least 2 columns"),
    (np.array([[1.0, np.nan], [1.0, 2.0]]), "NaN"),
])
def test_correlation_matrix_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        correlation_matrix(bad)


@pytest.mark.parametrize("w", [3, 4, 5, 8, 17, 40])
def test_two_vs_two_matches_loop(w):
    rng = np.random.default_rng(w)
    for _ in range(3):
        c_i, c_d = related_pair(rng, w)
        expected = two_vs_two_pairs_loop(c_i, c_d)
        np.testing.assert_array_equal(two_vs_two_pairs(c_i, c_d), expected)
        assert abs(two_vs_two(c_i, c_d) - expected[np.triu_indices(w, 1)].mean()) < 1e-9
        np.testing.assert_allclose(two_vs_two_per_concept(c_i, c_d), expected.sum(1) / (w - 1))


def test_two_vs_two_with_constant_rows_is_finite_and_matches_loop():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 10))
    x[[3, 8]] = 1.0  # two concepts whose representation is constant
    y = x + rng.normal(size=x.shape)
    y[3] = rng.normal(size=10)
    c_i, c_d = correlation_matrix(x), correlation_matrix(y)
    got = two_vs_two_pairs(c_i, c_d)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, two_vs_two_pairs_loop(c_i, c_d))


def test_two_vs_two_w3_is_all_ties():
    # w = 3 leaves one column per pair: every correlation is undefined, defined 0, a tie.
    c_i, c_d = related_pair(np.random.default_rng(0), 3)
    assert two_vs_two(c_i, c_d) == 0.5


def test_two_vs_two_identical_spaces_is_perfect_and_unrelated_near_chance():
    rng = np.random.default_rng(3)
    c = correlation_matrix(rng.normal(size=(30, 50)))
    assert two_vs_two(c, c) == 1.0
    c_other = correlation_matrix(rng.normal(size=(30, 50)))
    assert 0.35 < two_vs_two(c, c_other) < 0.65


def test_two_vs_two_rejects_bad_input():
    c = np.eye(4)
    with pytest.raises(ValueError, match="same size"):
        two_vs_two(c, np.eye(5))
    with pytest.raises(ValueError, match="at least 3"):
        two_vs_two(np.eye(2), np.eye(2))
    with pytest.raises(ValueError, match="finite"):
        two_vs_two(np.full((4, 4), np.nan), c)


def test_one_vs_two_matches_loop():
    rng = np.random.default_rng(11)
    n, k = 50, 30
    profiles = rng.normal(size=(n, k))
    d_true = profiles + rng.normal(size=(n, k))
    d_pred = rng.normal(size=(n, k))
    d_pred[0] = d_true[0]  # exact tie fails (strictly greater)
    profiles[1] = 2.0  # constant profile: both correlations 0, a tie
    margins = one_vs_two_margin(profiles, d_true, d_pred)
    expected = np.array([pearson(profiles[j], d_true[j]) - pearson(profiles[j], d_pred[j]) for j in range(n)])
    np.testing.assert_allclose(margins, expected, atol=1e-12)
    np.testing.assert_array_equal(one_vs_two(profiles, d_true, d_pred), expected > 1e-12)
    assert not one_vs_two(profiles, d_true, d_pred)[:2].any()


def test_one_vs_two_broadcasts_shared_word_profiles():
    rng = np.random.default_rng(12)
    profiles, d_true, d_pred = rng.normal(size=(7, 9)), rng.normal(size=9), rng.normal(size=9)
    np.testing.assert_array_equal(
        one_vs_two(profiles, d_true, d_pred),
        one_vs_two(profiles, np.tile(d_true, (7, 1)), np.tile(d_pred, (7, 1))),
    )


def test_one_vs_two_rejects_bad_input():
    with pytest.raises(ValueError, match="profiles must be"):
        one_vs_two(np.zeros(5), np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        one_vs_two(np.full((2, 3), np.nan), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="d_true"):
        one_vs_two(np.zeros((2, 3)), np.zeros(4), np.zeros(3))


def test_one_vs_two_keep_leaves_reference_columns_out_like_the_loop():
    rng = np.random.default_rng(13)
    n, k = 20, 12
    profiles, d_true, d_pred = rng.normal(size=(n, k)), rng.normal(size=(n, k)), rng.normal(size=(n, k))
    keep = np.ones((n, k), bool)
    for j in range(n):
        keep[j, rng.choice(k, size=2, replace=False)] = False
    expected = np.array([
        pearson(profiles[j, keep[j]], d_true[j, keep[j]]) - pearson(profiles[j, keep[j]], d_pred[j, keep[j]])
        for j in range(n)
    ])
    np.testing.assert_allclose(one_vs_two_margin(profiles, d_true, d_pred, keep), expected, atol=1e-12)
    with pytest.raises(ValueError, match="keep must be"):
        one_vs_two_margin(profiles, d_true, d_pred, keep[:, :3])
    keep[0, 1:] = False
    with pytest.raises(ValueError, match="at least 2 reference"):
        one_vs_two_margin(profiles, d_true, d_pred, keep)


def test_cross_correlation_matches_loop():
    rng = np.random.default_rng(14)
    x, y = rng.normal(size=(6, 9)), rng.normal(size=(4, 9))
    y[2] = 5.0
    expected = np.array([[pearson(a, b) for b in y] for a in x])
    np.testing.assert_allclose(cross_correlation(x, y), expected, atol=1e-12)
    with pytest.raises(ValueError, match="same number of columns"):
        cross_correlation(x, y[:, :4])
