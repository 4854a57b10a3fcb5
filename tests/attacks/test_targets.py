"""attacks.targets against a loop-by-definition reference (paper section 4)."""
import numpy as np
import pytest

from semguard.attacks.targets import choose_sources, plan_targets, rank_positions, select_targets


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def select_targets_loop(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Most similar, least similar and k-2 evenly spaced between, one source at a time."""
    n = len(vectors)
    indices, sims = np.zeros((n, k), int), np.zeros((n, k))
    for s in range(n):
        others = sorted((j for j in range(n) if j != s), key=lambda j: -pearson(vectors[s], vectors[j]))
        for r in range(k):
            position = int(np.floor(r * (len(others) - 1) / (k - 1) + 0.5))
            indices[s, r] = others[position]
            sims[s, r] = pearson(vectors[s], vectors[others[position]])
    return indices, sims


@pytest.mark.parametrize("n, d, k", [(7, 5, 6), (20, 300, 6), (50, 16, 6), (13, 4, 3), (9, 3, 2)])
def test_select_targets_matches_loop(n, d, k):
    vectors = np.random.default_rng(n * d).normal(size=(n, d))
    got = select_targets(vectors, k)
    indices, sims = select_targets_loop(vectors, k)
    np.testing.assert_array_equal(got.indices, indices)
    np.testing.assert_allclose(got.similarity, sims, atol=1e-12)
    assert got.indices.shape == (n, k) and got.indices.dtype == np.int64
    assert (got.indices != np.arange(n)[:, None]).all()  # never its own target
    assert (np.diff(got.similarity, axis=1) <= 1e-12).all()  # rank 0 most similar, then decreasing


def test_rank_positions_even_spacing():
    for n_others in (6, 7, 99, 837):
        p = rank_positions(n_others, 6)
        assert p[0] == 0 and p[-1] == n_others - 1 and len(set(p)) == 6
        assert np.abs(p - np.arange(6) * (n_others - 1) / 5).max() <= 0.5
    np.testing.assert_array_equal(rank_positions(99, 6), [0, 20, 39, 59, 78, 98])


def test_most_and_least_similar_are_extremes():
    vectors = np.random.default_rng(1).normal(size=(30, 10))
    sel = select_targets(vectors)
    c = np.corrcoef(vectors)
    np.fill_diagonal(c, np.nan)
    np.testing.assert_array_equal(sel.indices[:, 0], np.nanargmax(c, axis=1))
    np.testing.assert_array_equal(sel.indices[:, -1], np.nanargmin(c, axis=1))


def test_choose_sources_seeded_and_bounded():
    a, b = choose_sources(838, 100, seed=3), choose_sources(838, 100, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a)) == 100 and (np.diff(a) > 0).all() and a.max() < 838
    assert not np.array_equal(a, choose_sources(838, 100, seed=4))
    np.testing.assert_array_equal(choose_sources(40, 100, seed=0), np.arange(40))  # fewer concepts: all of them
    assert set(choose_sources(50, 5, seed=0, eligible=[1, 3, 5, 7, 9, 11])) <= {1, 3, 5, 7, 9, 11}


def test_plan_targets_rows():
    vectors = np.random.default_rng(2).normal(size=(15, 6))
    plan = plan_targets(vectors, np.array([4, 9]))
    sel = select_targets(vectors)
    assert [(p.source, p.rank) for p in plan] == [(s, r) for s in (4, 9) for r in range(6)]
    assert all(p.target == sel.indices[p.source, p.rank] for p in plan)


@pytest.mark.parametrize("vectors, k, match", [
    (np.zeros((5, 3, 2)), 6, "word_vectors must be 2-D"),
    (np.full((8, 3), np.nan), 6, "NaN"),
    (np.random.default_rng(0).normal(size=(6, 3)), 6, "n_targets must be"),
    (np.random.default_rng(0).normal(size=(9, 3)), 0, "n_targets must be"),
])
def test_select_targets_bad_input(vectors, k, match):
    with pytest.raises(ValueError, match=match):
        select_targets(vectors, k)


def test_choose_sources_bad_input():
    with pytest.raises(ValueError, match="n_sources"):
        choose_sources(10, 0)
    with pytest.raises(ValueError, match="eligible"):
        choose_sources(10, 3, eligible=[2, 10])
