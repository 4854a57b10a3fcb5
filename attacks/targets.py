"""Which concepts to attack and which targets to aim for (paper section 4).

For each source concept: the Pearson correlation of its word vector with every other
concept's; the targets are the most similar, the least similar, and evenly spaced ones
between, so each carries a similarity rank 0 (most similar) .. n_targets - 1 (least).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from semguard.detector.rsa import correlation_matrix


class TargetSelection(NamedTuple):
    """indices (n, k) int64 target concept per source concept and rank; similarity (n, k) float64 their correlations."""

    indices: np.ndarray
    similarity: np.ndarray


class TargetPlan(NamedTuple):
    """One planned attack: source concept, target concept, the target's similarity rank and correlation."""

    source: int
    target: int
    rank: int
    similarity: float


def rank_positions(n_others: int, n_targets: int) -> np.ndarray:
    """(n_targets,) positions in the similarity order: 0, n_others - 1 and evenly spaced between.

    Position r is round(r * (n_others - 1) / (n_targets - 1)), halves rounded up, in
    integer arithmetic so that it does not depend on float rounding.
    """
    if n_targets == 1:
        return np.zeros(1, dtype=np.int64)
    r = np.arange(n_targets, dtype=np.int64)
    return (2 * r * (n_others - 1) + (n_targets - 1)) // (2 * (n_targets - 1))


def select_targets(word_vectors: np.ndarray, n_targets: int = 6) -> TargetSelection:
    """Targets of every concept: word_vectors (n, d) -> TargetSelection((n, n_targets), (n, n_targets)).

    Column r is similarity rank r. Other concepts are ordered by decreasing correlation
    (ties: lower index first); a concept is never its own target. Needs n > n_targets.
    """
    vectors = np.asarray(word_vectors)
    if vectors.ndim != 2:
        raise ValueError(f"word_vectors must be 2-D (n, d), got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("word_vectors contain NaN or inf")
    n = len(vectors)
    if int(n_targets) != n_targets or n_targets < 1 or n_targets > n - 1:
        raise ValueError(f"n_targets must be an integer in [1, {n - 1}] (n concepts - 1), got {n_targets}")
    c = correlation_matrix(vectors)  # (n, n)
    np.fill_diagonal(c, -np.inf)  # sorts last, then dropped
    order = np.argsort(-c, axis=1, kind="stable")[:, : n - 1]  # (n, n-1) others, most similar first
    indices = order[:, rank_positions(n - 1, int(n_targets))]  # (n, k)
    return TargetSelection(indices.astype(np.int64), np.take_along_axis(c, indices, axis=1))


def choose_sources(n_concepts: int, n_sources: int = 100, seed: int = 0,
                   eligible: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Seeded choice of source concepts: (min(n_sources, len(pool)),) int64, ascending.

    pool: `eligible` concept ids (e.g. those with a correctly classified test image),
    else all n_concepts.
    """
    if int(n_sources) != n_sources or n_sources < 1:
        raise ValueError(f"n_sources must be an integer >= 1, got {n_sources}")
    pool = np.arange(n_concepts) if eligible is None else np.unique(np.asarray(eligible, dtype=np.int64))
    if len(pool) and (pool.min() < 0 or pool.max() >= n_concepts):
        raise ValueError(f"eligible must hold concept ids in [0, {n_concepts}), got {pool.min()}..{pool.max()}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(int(n_sources), len(pool)), replace=False)).astype(np.int64)


def plan_targets(word_vectors: np.ndarray, sources: np.ndarray, n_targets: int = 6) -> list[TargetPlan]:
    """The attacks to run, source-major then rank: len(sources) * n_targets TargetPlan rows."""
    selection = select_targets(word_vectors, n_targets)
    return [
        TargetPlan(int(s), int(selection.indices[s, r]), r, float(selection.similarity[s, r]))
        for s in np.asarray(sources, dtype=np.int64) for r in range(n_targets)
    ]
