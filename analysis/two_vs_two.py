"""The paper's 2 vs 2 analysis through a network's layers (paper section 3, Figure 1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

from semguard.detector.rsa import correlation_matrix, two_vs_two
from semguard.detector.significance import bhy, permutation_test_two_vs_two


@dataclass(frozen=True)
class LayerScores:
    """2 vs 2 accuracy per layer, in depth order."""

    layers: list[str]
    accuracy: np.ndarray  # (L,) mean over image sets
    spread: np.ndarray  # (L,) standard deviation across image sets
    p_value: np.ndarray  # (L,) permutation p-value, +1 corrected
    p_bhy: np.ndarray  # (L,) Benjamini-Hochberg-Yekutieli adjusted across layers

    def significant(self, alpha: float = 0.05) -> np.ndarray:
        return self.p_bhy < alpha

    def as_json(self) -> dict:
        return {
            "layers": list(self.layers),
            "accuracy": self.accuracy.tolist(),
            "spread": self.spread.tolist(),
            "p_value": self.p_value.tolist(),
            "p_bhy": self.p_bhy.tolist(),
        }


def image_set_indices(labels: np.ndarray, n_concepts: int, n_sets: int) -> np.ndarray:
    """(n_sets, n_concepts) indices into `labels`: set s holds the s-th image of each concept.

    Each concept contributes n_sets distinct images, one per set (paper 3.2).
    """
    sets = np.empty((n_sets, n_concepts), dtype=np.int64)
    for concept in range(n_concepts):
        where = np.flatnonzero(labels == concept)
        if len(where) < n_sets:
            raise ValueError(f"concept {concept} has {len(where)} images, n_sets={n_sets} needs that many")
        sets[:, concept] = where[:n_sets]
    return sets


def two_vs_two_by_layer(
    set_activations: Sequence[dict[str, np.ndarray]],
    word_vectors: np.ndarray,
    n_permutations: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> LayerScores:
    """2 vs 2 per layer, averaged over image sets, with permutation p-values and BHY.

    set_activations: one dict per image set, layer -> (w, k_l) representation of each
    concept (row c is concept c). word_vectors: (w, d). Layers keep the dicts' order.
    """
    if not set_activations:
        raise ValueError("set_activations is empty: need at least one image set")
    layers = list(set_activations[0])
    c_d = correlation_matrix(word_vectors)
    accuracy, spread, p_value = [], [], []
    for layer in tqdm(layers, desc="2 vs 2 by layer", disable=not progress):
        c_is = np.stack([correlation_matrix(acts[layer]) for acts in set_activations])  # (S, w, w)
        per_set = [two_vs_two(c_i, c_d) for c_i in c_is]
        result = permutation_test_two_vs_two(c_is, c_d, n_permutations=n_permutations, seed=seed)
        accuracy.append(result.accuracy)
        spread.append(float(np.std(per_set)))
        p_value.append(result.p_value)
    p = np.asarray(p_value)
    return LayerScores(layers, np.asarray(accuracy), np.asarray(spread), p, bhy(p))
