"""1 vs 2 through the layers for adversarial and for naturally misclassified images
(paper section 4, Figures 4-6): which layers still side with the true label?"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from semguard.analysis.one_vs_two import (
    OneVsTwoScores,
    ReferenceSet,
    choose_reference_set,
    mean_cosine,
    one_vs_two_by_layer,
    reference_profiles,
)
from semguard.attacks.store import AttackSet
from semguard.detector.layers import LayerTap, iter_activations
from semguard.models.inputs import as_model_input


@dataclass(frozen=True)
class CleanSet:
    """Labelled clean test images and the model's predictions on them."""

    images: np.ndarray  # uint8 (N, H, W, 3) or float32 (N, 3, H, W) in [0, 1]
    labels: np.ndarray  # (N,)
    predictions: np.ndarray  # (N,)


def tapped(tap: LayerTap, images: np.ndarray, batch_size: int = 128) -> Iterator[dict[str, np.ndarray]]:
    """layer -> (b, k) activations, one batch at a time."""
    for _, out in iter_activations(tap, as_model_input(images), batch_size):
        yield {name: a.cpu().numpy() for name, a in out.acts.items()}


@dataclass(frozen=True)
class References:
    """The reference set and, per layer, the representation of each reference concept (R, k)."""

    concepts: ReferenceSet
    acts: dict[str, np.ndarray]


def build_references(tap: LayerTap, clean: CleanSet, n_concepts: int, size: int = 100, seed: int = 0) -> References:
    """Paper 4: `size` correctly predicted concepts (all when fewer), one clean image each, tapped."""
    reference = choose_reference_set(clean.labels, clean.predictions, n_concepts, size, seed)
    with torch.no_grad():
        batches = list(tapped(tap, clean.images[reference.image_index]))
    return References(reference, {name: np.concatenate([b[name] for b in batches]) for name in tap.layers})


def _one_vs_two(tap: LayerTap, images: np.ndarray, references: References, word_vectors: np.ndarray,
                true: np.ndarray, predicted: np.ndarray, ranks: np.ndarray | None, n_permutations: int,
                seed: int) -> OneVsTwoScores:
    """1 vs 2 by layer of `true` vs `predicted` for the images' activations against the references."""
    with torch.no_grad():
        profiles = reference_profiles(tapped(tap, images), references.acts)
    return one_vs_two_by_layer(profiles, true, predicted, references.concepts, word_vectors, ranks, n_permutations, seed)


def adversarial_one_vs_two(
    attack_set: AttackSet,
    tap: LayerTap,
    word_vectors: np.ndarray,
    references: References,
    n_permutations: int = 1000,
    seed: int = 0,
) -> OneVsTwoScores:
    """1 vs 2 of source (true) vs target (predicted) label for the successful attacks, by target rank.

    Failed attacks are excluded (paper: 4 of 600). References equal to either label are left
    out per item.
    """
    kept = attack_set.successful().records
    if not kept:
        raise ValueError(f"attack set {attack_set.path} has no successful attack to analyse")
    true = np.array([r.source_class for r in kept])
    predicted = np.array([r.target_class for r in kept])
    ranks = np.array([r.rank for r in kept])
    return _one_vs_two(tap, attack_set.images(kept), references, word_vectors, true, predicted, ranks, n_permutations, seed)


@dataclass(frozen=True)
class MisclassifiedResult:
    scores: OneVsTwoScores
    mean_cosine: float  # of true and predicted word vectors (paper: 0.22 VGG-16 .. 0.29 ResNet-50)


def misclassified_one_vs_two(
    tap: LayerTap,
    clean: CleanSet,
    word_vectors: np.ndarray,
    references: References,
    n_permutations: int = 1000,
    seed: int = 0,
) -> MisclassifiedResult:
    """1 vs 2 of true vs predicted label for the clean test images the model gets wrong (Figures 4, 5)."""
    wrong = np.flatnonzero(clean.labels != clean.predictions)
    if len(wrong) == 0:
        raise ValueError("the model misclassifies no test image: nothing to analyse")
    true, predicted = clean.labels[wrong], clean.predictions[wrong]
    scores = _one_vs_two(tap, clean.images[wrong], references, word_vectors, true, predicted, None, n_permutations, seed)
    return MisclassifiedResult(scores, mean_cosine(word_vectors, true, predicted))
