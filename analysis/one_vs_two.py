"""The paper's 1 vs 2 analyses (section 4): do a layer's representations of an image side with
its true label or with the label the network predicted? For adversarial and misclassified images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from semguard.too_small import TooSmall
from semguard.detector.rsa import TIE_TOLERANCE, cross_correlation, one_vs_two_margin
from semguard.detector.significance import bhy, permutation_test_one_vs_two


@dataclass(frozen=True)
class ReferenceSet:
    """One correctly predicted image per reference concept (paper: 100 concepts)."""

    concepts: np.ndarray  # (R,) label index of each reference
    image_index: np.ndarray  # (R,) index of the image that represents it


def choose_reference_set(
    labels: np.ndarray, predictions: np.ndarray, n_concepts: int, size: int = 100, seed: int = 0
) -> ReferenceSet:
    """Seeded choice of `size` concepts (all when fewer), each with one correctly predicted image."""
    rng = np.random.default_rng(seed)
    correct = labels == predictions
    candidates = [c for c in range(n_concepts) if np.any(correct & (labels == c))]
    chosen = np.sort(rng.permutation(candidates)[: min(size, len(candidates))])
    if len(chosen) < 4:
        raise TooSmall(f"only {len(chosen)} concepts have a correctly predicted image; 1 vs 2 needs at least 4",
                       len(chosen))
    images = np.array([rng.choice(np.flatnonzero(correct & (labels == c))) for c in chosen])
    return ReferenceSet(chosen, images)


@dataclass(frozen=True)
class OneVsTwoScores:
    """1 vs 2 accuracy per layer (depth order), pooled and per group (e.g. target similarity rank)."""

    layers: list[str]
    count: int
    accuracy: np.ndarray  # (L,)
    p_value: np.ndarray  # (L,) two-sided permutation p-value (labels swapped per item)
    p_bhy: np.ndarray  # (L,)
    groups: list[int]
    group_counts: list[int]
    group_accuracy: np.ndarray  # (G, L)

    def as_json(self) -> dict:
        return {
            "layers": list(self.layers),
            "count": self.count,
            "accuracy": self.accuracy.tolist(),
            "p_value": self.p_value.tolist(),
            "p_bhy": self.p_bhy.tolist(),
            "groups": self.groups,
            "group_counts": self.group_counts,
            "group_accuracy": self.group_accuracy.tolist(),
        }


def reference_profiles(
    batches: Iterable[dict[str, np.ndarray]], reference_acts: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """1 vs 2 profiles, streamed: every image's correlation with each reference, per layer.

    batches: layer -> (b, k_l) activations, batch after batch; reference_acts: layer -> (R, k_l).
    Returns layer -> (n, R). Only the (n, R) profiles are kept, never all activations.
    """
    collected: dict[str, list[np.ndarray]] = {name: [] for name in reference_acts}
    for acts in batches:
        for name, ref in reference_acts.items():
            collected[name].append(cross_correlation(acts[name], ref))
    return {name: np.concatenate(parts) if parts else np.zeros((0, len(reference_acts[name])))
            for name, parts in collected.items()}


def layer_margins(
    profiles: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    reference: ReferenceSet,
    word_profiles: np.ndarray,
) -> np.ndarray:
    """1 vs 2 margins of n items at one layer: corr(i, d_true) - corr(i, d_pred), shape (n,).

    profiles: (n, R) correlation of each image with the R references at this layer;
    word_profiles: (C, R) correlation of every label's word vector with the references'.
    References equal to either label are left out.
    """
    keep = (reference.concepts[None, :] != true[:, None]) & (reference.concepts[None, :] != predicted[:, None])
    return one_vs_two_margin(profiles, word_profiles[true], word_profiles[predicted], keep)


def one_vs_two_by_layer(
    profiles: dict[str, np.ndarray],
    true: np.ndarray,
    predicted: np.ndarray,
    reference: ReferenceSet,
    word_vectors: np.ndarray,
    groups: np.ndarray | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
) -> OneVsTwoScores:
    """1 vs 2 accuracy of true vs predicted label per layer, with p-values and BHY across layers.

    profiles: layer -> (n, R) from `reference_profiles`; true, predicted: (n,) label indices
    (they differ); word_vectors: (C, d); groups: optional (n,) int, e.g. target similarity rank.
    """
    true, predicted = np.asarray(true), np.asarray(predicted)
    if len(true) == 0:
        raise ValueError("no items: 1 vs 2 needs at least one image")
    if np.any(true == predicted):
        raise ValueError("1 vs 2 compares two different labels: true and predicted must differ for every item")
    word_profiles = cross_correlation(word_vectors, word_vectors[reference.concepts])  # (C, R)
    groups = np.zeros(len(true), int) if groups is None else np.asarray(groups)
    group_ids = sorted(set(groups.tolist()))
    layers = list(profiles)
    accuracy, p_values, by_group = [], [], []
    for layer in layers:
        margins = layer_margins(profiles[layer], true, predicted, reference, word_profiles)
        result = permutation_test_one_vs_two(margins, n_permutations=n_permutations, seed=seed)
        accuracy.append(result.accuracy)
        p_values.append(result.p_value)
        by_group.append([float(np.mean(margins[groups == g] > TIE_TOLERANCE)) for g in group_ids])
    p = np.asarray(p_values)
    return OneVsTwoScores(
        layers=layers,
        count=len(true),
        accuracy=np.asarray(accuracy),
        p_value=p,
        p_bhy=bhy(p),
        groups=group_ids,
        group_counts=[int(np.sum(groups == g)) for g in group_ids],
        group_accuracy=np.asarray(by_group).T,
    )


def mean_cosine(word_vectors: np.ndarray, true: np.ndarray, predicted: np.ndarray) -> float:
    """Mean cosine similarity of the true and predicted labels' word vectors (paper: 0.22-0.29)."""
    v = word_vectors / np.linalg.norm(word_vectors, axis=1, keepdims=True)
    return float(np.mean(np.sum(v[true] * v[predicted], axis=1)))


def block_average(scores: np.ndarray, blocks: list[str]) -> tuple[list[str], np.ndarray]:
    """Average (..., L) layer scores within each block, blocks in order of first appearance."""
    names = list(dict.fromkeys(blocks))
    idx = np.asarray(blocks)
    return names, np.stack([np.asarray(scores)[..., idx == b].mean(-1) for b in names], axis=-1)
