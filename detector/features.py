"""The guard's flagger features, computed by one function for calibration and for serving.

A calibrated threshold keeps its false-positive rate only if the served guard computes its
features exactly as calibration did: the same signature (float32 serving profiles, the
manifest's alternatives and seed), the same Mahalanobis scores, the same column order.
`calibrate.guard_features` (clean and attack images, batch by batch) and
`Guard.inspect_arrays` (one request batch) both call `flagger_features`.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.profiler import record_function

from semguard.detector.bundle import Bundle, BundleError
from semguard.detector.flagger import assemble_features, feature_names
from semguard.detector.mahalanobis import MahalanobisDetector
from semguard.detector.native import NativeKernels
from semguard.detector.reference import ReferenceBank, sketch_signs
from semguard.detector.signature import Signature, labels_with_vector, semantic_prediction, signature_parts


@dataclass(frozen=True)
class FeatureRecipe:
    """What turns tapped activations into flagger features (a bundle holds one: `recipe_of`)."""

    bank: ReferenceBank
    mahalanobis: MahalanobisDetector | None
    kinds: tuple[str, ...]  # feature blocks in column order, e.g. ("fraction", "margin", "mahalanobis")
    n_alternatives: int | None = None  # None: every other label
    seed: int = 0  # of the alternatives' seeded subset
    # (C,) bool: labels with a word vector, the only ones the signature judges against (semantic_prediction,
    # alternative_table); None: every label (the bundle's word vectors have no zero row)
    eligible: np.ndarray | None = None
    # the one-pass C kernel (`detector.native`, `Guard(native_kernels=True)`); None: eager torch, as calibration runs
    kernels: NativeKernels | None = None

    def signature_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) logits -> (B,) the label each image's signature is computed for (`semantic_prediction`)."""
        return semantic_prediction(logits, self.eligible)

    def __post_init__(self) -> None:
        feature_names(self.kinds, self.bank.layers)  # ValueError naming `kinds` when unknown or empty
        if "mahalanobis" in self.kinds and self.mahalanobis is None:
            raise ValueError("mahalanobis: feature kind 'mahalanobis' needs a fitted MahalanobisDetector, got None")

    @property
    def names(self) -> list[str]:
        """Column names "<kind>/<layer>" of the features, in order."""
        density_layers = self.mahalanobis.layers if "mahalanobis" in self.kinds else None
        return feature_names(self.kinds, self.bank.layers, density_layers)


class FlaggerFeatures(NamedTuple):
    features: np.ndarray  # (B, F) float64, columns FeatureRecipe.names
    signature: Signature  # fraction and margin (B, L) over bank.layers
    signature_s: float  # seconds in the profiles and the 1 vs 2 signature
    density_s: float  # seconds in the Mahalanobis scores and assembling the columns


def flagger_features(acts: Mapping[str, torch.Tensor], predicted: torch.Tensor, recipe: FeatureRecipe) -> FlaggerFeatures:
    """Flagger features of one batch.

    acts: {layer: (B, k_l)} float32 as `LayerTap` gives them (every bank and Mahalanobis layer).
    predicted: (B,) the labels the signature judges (`FeatureRecipe.signature_labels`: the model's argmax
    among the labels with a word vector). The profiles are float32 matmuls against the
    stored prototypes (`ReferenceBank._serving_profiles`: no float64 copy of the activations) and
    the Mahalanobis reduction goes a few rows at a time, so serving keeps its memory bound. With
    `recipe.kernels` the sketches and channel means come from one read of each activation
    (`one_pass_reductions`, timed with the signature).
    """
    start = time.perf_counter()
    maha = recipe.mahalanobis if "mahalanobis" in recipe.kinds else None
    with record_function("guard.signature"):  # stage names for benchmarks/profile_guard.py
        bank_in, maha_in = one_pass_reductions(acts, recipe.bank, maha, recipe.kernels) if recipe.kernels else ({}, {})
        sig = signature_parts(acts, predicted, recipe.bank, recipe.n_alternatives, recipe.seed, eligible=recipe.eligible,
                              reduced=bank_in, kernels=recipe.kernels)
    signed = time.perf_counter()  # signature_parts returns numpy: the device has finished
    with record_function("guard.density"):
        density = maha.layer_scores(acts, reduced=maha_in) if maha is not None else None
        features = assemble_features(recipe.kinds, sig, density)
    return FlaggerFeatures(features, sig, signed - start, time.perf_counter() - signed)


def one_pass_reductions(acts: Mapping[str, torch.Tensor], bank: ReferenceBank, mahalanobis: MahalanobisDetector | None,
                        kernels: NativeKernels) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({layer: (B, dim) float32 count sketch}, {layer: (B, C) float64 channel means}) of the layers the bank
    sketches and the Mahalanobis member channel-pools, each activation read once by the native kernel.

    The same values as `count_sketch` and the eager channel means up to float32 rounding: the row mean
    behind the sketch's centring is summed in float64 here. Layers with other reductions (exact,
    projection), non-float32 or non-CPU activations, and calls that need gradients are left out: the
    eager path reduces them.
    """
    if torch.is_grad_enabled():
        return {}, {}
    bank_layers = set(bank.layers)
    maha_layers = set(mahalanobis.layers) if mahalanobis is not None else set()
    jobs = []  # (name, x, the bank's sketch or None, the Mahalanobis channel pool or None, (signs, folded) or None)
    for name in dict.fromkeys([*bank.layers, *(mahalanobis.layers if mahalanobis is not None else ())]):
        x = acts[name]
        sketch = bank.reduction(name) if name in bank_layers else None
        sketch = sketch if sketch is not None and sketch.kind == "sketch" else None
        pool = mahalanobis.reduction(name) if name in maha_layers else None
        pool = pool if pool is not None and pool.kind == "channel_pool" else None
        if (sketch is None and pool is None) or x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 2:
            continue
        signs = sketch_signs(x.shape[1], sketch.dim, sketch.seed, x.dtype) if sketch else None  # made here, not in threads
        jobs.append((name, x, sketch, pool, signs))

    def one(job):
        _, x, sketch, pool, signs = job
        return kernels.sketch_and_channel_means(x, signs[0] if signs else None, sketch.dim if sketch else 0,
                                                pool.channels if pool else 0)
    sketched, pooled = {}, {}
    for (name, _, sketch, pool, signs), (fold, mean, channels) in zip(jobs, kernels.map(one, jobs)):
        if sketch is not None:
            sketched[name] = fold - mean.float()[:, None] * signs[1]  # count_sketch's centring
        if pool is not None:
            pooled[name] = channels
    return sketched, pooled


def eligible_labels(word_vectors: np.ndarray) -> np.ndarray | None:
    """FeatureRecipe.eligible of a label table: the labels with a word vector, None when that is all of them."""
    eligible = labels_with_vector(word_vectors)
    return None if eligible.all() else eligible


def recipe_of(bundle: Bundle) -> FeatureRecipe:
    """The recipe a bundle's flagger was calibrated with; BundleError if its columns cannot be rebuilt."""
    names = bundle.flagger.feature_names
    kinds = tuple(dict.fromkeys(n.split("/", 1)[0] for n in names))  # column order, as calibration stacked them
    m = bundle.manifest
    try:
        recipe = FeatureRecipe(bundle.bank, bundle.mahalanobis, kinds, m.n_alternatives, m.signature_seed,
                               eligible_labels(bundle.words))
    except ValueError as e:
        raise BundleError(f"flagger.json: {e}") from None
    if tuple(recipe.names) != tuple(names):
        raise BundleError(f"flagger.json: feature columns {list(names)[:4]}... are not the ones the bundle's bank and "
                          f"Mahalanobis layers give ({recipe.names[:4]}...)")
    return recipe
