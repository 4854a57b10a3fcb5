"""detector.significance against loop references."""
import numpy as np
import pytest
import torch

from semguard.detector.rsa import correlation_matrix, one_vs_two_margin
from semguard.detector.significance import bhy, permutation_test_one_vs_two, permutation_test_two_vs_two
from tests.detector.test_rsa import related_pair, two_vs_two_pairs_loop


def accuracy_loop(c_i, c_d):
    w = len(c_i)
    return two_vs_two_pairs_loop(c_i, c_d)[np.triu_indices(w, 1)].mean()


def test_two_vs_two_permutation_null_matches_loop_over_image_sets():
    rng = np.random.default_rng(0)
    w, n_perm, seed = 7, 12, 5
    sets = [related_pair(rng, w) for _ in range(3)]
    c_is = np.stack([s[0] for s in sets])
    c_d = sets[0][1]
    result = permutation_test_two_vs_two(c_is, c_d, n_permutations=n_perm, seed=seed, batch_size=4, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    expected_null = []
    for _ in range(n_perm):
        perm = torch.randperm(w, generator=generator).numpy()
        permuted = c_d[perm][:, perm]
        expected_null.append(np.mean([accuracy_loop(c_i, permuted) for c_i in c_is]))
    np.testing.assert_allclose(result.null, expected_null, atol=1e-12)
    assert abs(result.accuracy - np.mean([accuracy_loop(c_i, c_d) for c_i in c_is])) < 1e-12
    expected_p = (1 + np.sum(np.array(expected_null) >= result.accuracy - 1e-12)) / (1 + n_perm)
    assert result.p_value == pytest.approx(expected_p)


def test_two_vs_two_permutation_is_seeded_and_batch_size_free():
    c_i, c_d = related_pair(np.random.default_rng(1), 9)
    a = permutation_test_two_vs_two(c_i, c_d, n_permutations=30, seed=3, batch_size=1, device="cpu")
    b = permutation_test_two_vs_two(c_i, c_d, n_permutations=30, seed=3, batch_size=7, device="cpu")
    np.testing.assert_array_equal(a.null, b.null)
    assert a.p_value == b.p_value


def test_two_vs_two_permutation_detects_structure_and_not_noise():
    rng = np.random.default_rng(2)
    c_i, c_d = related_pair(rng, 30, k=40, noise=0.7)
    assert permutation_test_two_vs_two(c_i, c_d, n_permutations=200, seed=0, device="cpu").p_value < 0.01
    noise = correlation_matrix(rng.normal(size=(30, 40)))
    assert permutation_test_two_vs_two(noise, c_d, n_permutations=200, seed=0, device="cpu").p_value > 0.01


def test_p_value_is_never_zero_and_alternatives():
    c_i, c_d = related_pair(np.random.default_rng(4), 20, noise=0.1)
    r = permutation_test_two_vs_two(c_i, c_d, n_permutations=50, seed=0, device="cpu")
    assert r.p_value == pytest.approx(1 / 51)
    less = permutation_test_two_vs_two(c_i, c_d, n_permutations=50, seed=0, alternative="less", device="cpu")
    assert less.p_value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alternative"):
        permutation_test_two_vs_two(c_i, c_d, n_permutations=5, alternative="bigger", device="cpu")
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_test_two_vs_two(c_i, c_d, n_permutations=0, device="cpu")


def test_one_vs_two_permutation_matches_loop():
    rng = np.random.default_rng(5)
    n, n_perm = 40, 25
    margins = rng.normal(loc=0.1, size=n)
    margins[3] = 0.0  # a tie passes under neither labelling
    result = permutation_test_one_vs_two(margins, n_permutations=n_perm, seed=9)
    generator = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, (n_perm, n), generator=generator, dtype=torch.float64).numpy() * 2 - 1
    expected_null = [np.mean([s * m > 1e-12 for s, m in zip(row, margins)]) for row in signs]
    np.testing.assert_allclose(result.null, expected_null)
    assert result.accuracy == np.mean(margins > 1e-12)
    extreme = np.abs(np.array(expected_null) - 0.5) >= abs(result.accuracy - 0.5) - 1e-12
    assert result.p_value == pytest.approx((1 + extreme.sum()) / (1 + n_perm))


def test_one_vs_two_permutation_two_sided_catches_below_chance():
    rng = np.random.default_rng(6)
    profiles = rng.normal(size=(200, 30))
    d_pred = profiles + 0.5 * rng.normal(size=profiles.shape)  # images look like the predicted label
    d_true = rng.normal(size=profiles.shape)
    margins = one_vs_two_margin(profiles, d_true, d_pred)
    r = permutation_test_one_vs_two(margins, n_permutations=300, seed=0)
    assert r.accuracy < 0.1 and r.p_value < 0.01
    with pytest.raises(ValueError, match="non-empty"):
        permutation_test_one_vs_two(np.array([]))


def by_loop(p):
    """Benjamini-Yekutieli adjusted p-values straight from the definition."""
    m = len(p)
    c_m = sum(1.0 / i for i in range(1, m + 1))
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m * c_m / rank)
        adjusted[i] = min(running, 1.0)
    return adjusted


def test_bhy_matches_definition():
    p = np.random.default_rng(7).uniform(size=15) ** 3
    np.testing.assert_allclose(bhy(p), by_loop(list(p)), atol=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bhy([0.2, 1.5])
    with pytest.raises(ValueError, match="non-empty"):
        bhy([])
