"""Build a guard bundle from a model and clean images (reference bank, Mahalanobis, flagger).

Clean images are split (seeded) into a fitting part (reference prototypes, Mahalanobis
Gaussians, flagger fit) and a held-out part used only for the threshold and the per-layer
explanation quantiles, so the realised false-positive rate is measured on images nothing was
fitted on. Images (a tensor, or a Dataset such as a Subset of a subject's ImageSet, read batch by batch)
and activations are streamed batch by batch; only reduced features are kept: per fit image its
Mahalanobis features (channel means of conv maps, flat layers up to `mahalanobis_max_dim`), per image
a few flagger features, and the prototypes' activations (at most k * per_concept images).

A calibration that cannot mislead (issue 27): the report carries the held-out AUROC (the held-out clean
images, which nothing was fitted on, against the calibration attacks) beside the realised FPR. The
supervised flagger fits on every attack image, as it always has (holding some out would move every
shipped figure); for the unsupervised methods the attacks are unseen, for the supervised ones the AUROC
is in-sample on the attack side, so it is a floor check, not an estimate of deployed performance. A score that is
the same for every held-out clean image is refused (ValueError, nothing written); too few held-out
images for the target FPR (fewer than `MIN_TAIL / target_fpr`: the threshold is then the largest
clean score or close to it, not a quantile) and a held-out AUROC below `AUROC_FLOOR` are warnings
in the report (`CalibrationReport.warnings`), which the command prints.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from semguard.detector.bundle import BundleManifest, write_bundle
from semguard.models.factory import ModelSpec
from semguard.models.inputs import image_batches
from semguard.detector.features import FeatureRecipe, eligible_labels, flagger_features
from semguard.detector.flagger import FEATURE_KINDS, feature_names, fit_flagger
from semguard.detector.layers import LayerTap, iter_activations
from semguard.detector.mahalanobis import MahalanobisDetector, fit_mahalanobis
from semguard.detector.reference import (
    SPACES, Reduction, ReferenceBank, build_reference_bank, class_similarity, select_references,
    shuffled_word_similarity, word_similarity,
)


@dataclass(frozen=True)
class CalibrationConfig:
    k: int = 100  # reference concepts (all eligible ones when fewer): the paper's 100
    per_concept: int = 5  # correctly classified images averaged into each prototype
    space: str = "words"  # similarity space: "words", "class_similarity", "shuffled_words"
    features: tuple[str, ...] = ("fraction", "margin", "mahalanobis")  # what the flagger scores
    method: str = "gaussian"  # "gaussian" (clean only), "logistic" or "ensemble" (both need attack_images)
    # "ensemble": feature kinds of each logistic member (detector.flagger), each cut to `features`
    # (`ensemble_members`; one member left ranks images as that member's logistic does)
    members: tuple[tuple[str, ...], ...] = (("fraction", "margin", "mahalanobis"), ("mahalanobis",))
    target_fpr: float = 0.05
    calib_fraction: float = 0.5  # share of clean images held out for the threshold
    n_alternatives: int | None = None  # None: every other label (the paper's proposal)
    bank_max_width: int | None = None  # layers wider than this are stored reduced in the bank
    bank_reduction: str = "sketch"  # "sketch", "projection" or "channel_pool" for those layers
    # output dimension of a "sketch" or "projection" bank reduction; prime, so that a sketch's buckets (i mod dim)
    # do not line up with a feature map's channel or row period (measured on the world CNN: 251 buckets agreed
    # better with the exact bank than 256; 4093 vs 4096 on resnet50 was not measured)
    bank_projection_dim: int = 4093
    mahalanobis_max_dim: int = 2048  # flat layers wider than this are projected for the Gaussians
    penultimate_layer: str | None = None  # class_similarity source; default the last tapped layer
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bank_projection_dim < 2:  # before any work: Reduction would refuse it only once layers are reduced
            raise ValueError(f"bank_projection_dim (--bank-dim) must be >= 2, got {self.bank_projection_dim}")


MIN_TAIL = 5  # held-out clean images above the threshold for it to be a quantile estimate, not the maximum
# A held-out AUROC below this means the score barely tells the calibration attacks from clean images
# (0.5 is chance); a guard that weak should not be shipped unread.
AUROC_FLOOR = 0.6


def held_out_needed(target_fpr: float) -> int:
    """Held-out clean images the threshold needs for `target_fpr`: MIN_TAIL of them above it."""
    return math.ceil(MIN_TAIL / target_fpr - 1e-9)


class CalibrationReport(NamedTuple):
    bundle_dir: Path
    n_fit: int
    n_calib: int
    n_references: int
    clean_accuracy: float  # on all clean images
    threshold: float
    fpr_calib: float  # realised on the held-out clean images
    bank_bytes: dict[str, int]
    auroc_heldout: float | None = None  # held-out clean images vs the calibration attacks; None without attacks
    n_attack_heldout: int = 0  # calibration attack images the AUROC is measured against
    warnings: tuple[str, ...] = ()  # what makes this bundle untrustworthy (module docstring)


class FitCalibSplit(NamedTuple):
    fit: np.ndarray  # (n_fit,) sorted indices: bank, Gaussians, flagger fit
    calib: np.ndarray  # (n_calib,) sorted indices: threshold and explanation quantiles only


def fit_calib_split(n: int, calib_fraction: float, seed: int) -> FitCalibSplit:
    """The seeded split of n clean images that `calibrate_guard` makes."""
    perm = np.random.default_rng(seed).permutation(n)
    n_calib = max(2, int(round(calib_fraction * n)))
    return FitCalibSplit(np.sort(perm[n_calib:]), np.sort(perm[:n_calib]))


def ensemble_members(cfg: CalibrationConfig) -> tuple[tuple[str, ...], ...] | None:
    """The configured members, each cut to the configured features; empty and repeated members dropped.

    None unless method "ensemble". With features ("fraction", "mahalanobis") the default members
    become ("fraction", "mahalanobis") and ("mahalanobis",): "all" means all configured features.
    """
    if cfg.method != "ensemble":
        return None
    bad = [k for k in cfg.features if k not in FEATURE_KINDS]
    if bad or not cfg.features:
        raise ValueError(f"features must be a non-empty subset of {FEATURE_KINDS}, got {list(cfg.features)}")
    members = tuple(dict.fromkeys(tuple(k for k in m if k in cfg.features) for m in cfg.members))
    members = tuple(m for m in members if m)
    if not members:
        raise ValueError(f"ensemble members {list(cfg.members)} share no kind with features {list(cfg.features)}")
    return members


def layer_shapes(tap: LayerTap, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Unflattened per-image activation shape of each tapped layer (one dummy pass)."""
    with torch.no_grad():
        _, raw = tap.module(torch.zeros(1, *input_shape, device=tap.device))
    return {n: tuple(a.shape[1:]) for n, (a, _) in zip(tap.layers, raw)}


def density_reductions(shapes: dict[str, tuple[int, ...]], max_dim: int, seed: int) -> dict[str, Reduction]:
    """Lee et al.: conv maps -> channel means; wide flat layers -> a sparse projection."""
    out = {}
    for n, s in shapes.items():
        if len(s) == 3:
            out[n] = Reduction("channel_pool", channels=s[0])
        elif int(np.prod(s)) > max_dim:
            out[n] = Reduction("projection", dim=max_dim, seed=seed)
    return out


def bank_reductions(shapes: dict[str, tuple[int, ...]], cfg: CalibrationConfig) -> dict[str, Reduction]:
    out = {}
    for n, s in shapes.items():
        if cfg.bank_max_width is None or int(np.prod(s)) <= cfg.bank_max_width:
            continue
        if cfg.bank_reduction == "channel_pool" and len(s) == 3:
            out[n] = Reduction("channel_pool", channels=s[0])
        elif cfg.bank_reduction == "sketch":
            out[n] = Reduction("sketch", dim=cfg.bank_projection_dim, seed=cfg.seed)
        elif cfg.bank_reduction in ("projection", "channel_pool"):  # a flat layer cannot be channel-pooled
            out[n] = Reduction("projection", dim=cfg.bank_projection_dim, seed=cfg.seed)
        else:
            raise ValueError(f"bank_reduction must be 'sketch', 'projection' or 'channel_pool', got {cfg.bank_reduction!r}")
    return out


Images = torch.Tensor | Dataset  # (N, C, H, W) float32 in [0, 1], or a Dataset of such images (or (image, label))


def take(images: Images, indices: np.ndarray) -> Images:
    """images[indices]: a tensor's rows, or a Subset (of a Subset's own dataset: never nested) read on demand."""
    if isinstance(images, torch.Tensor):
        return images[indices]
    if isinstance(images, Subset):
        return Subset(images.dataset, np.asarray(images.indices)[np.asarray(indices, np.int64)].tolist())
    return Subset(images, np.asarray(indices, np.int64).tolist())


def _reduced_pass(tap, images, reductions, batch_size, progress=False):
    """Predictions (N,) and {layer: (N, d)} reduced activations of every tapped layer."""
    preds, feats = [], {n: [] for n in tap.layers}
    for _, out in iter_activations(tap, images, batch_size, progress=progress):
        preds.append(out.logits.argmax(1).cpu())
        for n in tap.layers:
            feats[n].append(reductions.get(n, Reduction()).apply(out.acts[n].double()).cpu())
    return torch.cat(preds).numpy(), {n: torch.cat(v).numpy() for n, v in feats.items()}


class ImageFeatures(NamedTuple):
    features: np.ndarray  # (N, F) flagger features, columns FeatureRecipe.names
    fractions: np.ndarray  # (N, L) signature fractions over bank.layers (the explanation quantiles)


def guard_features(
    tap: LayerTap, images: torch.Tensor, bank: ReferenceBank, mahalanobis: MahalanobisDetector | None,
    kinds: tuple[str, ...], n_alternatives: int | None, seed: int, batch_size: int, eligible: np.ndarray | None = None,
) -> ImageFeatures:
    """Flagger features of images (N, C, H, W), batch by batch, by the function the served Guard calls
    (eligible: FeatureRecipe.eligible, the labels with a word vector; None: all)."""
    recipe = FeatureRecipe(bank, mahalanobis, tuple(kinds), n_alternatives, seed, eligible)
    feats, fractions = [], []
    for _, out in iter_activations(tap, images, batch_size):
        batch = flagger_features(out.acts, recipe.signature_labels(out.logits), recipe)
        feats.append(batch.features)
        fractions.append(batch.signature.fraction)
    return ImageFeatures(np.concatenate(feats), np.concatenate(fractions))


def _similarity(cfg, word_vectors, feats, labels, layers, num_classes) -> np.ndarray:
    if cfg.space == "words":
        return word_similarity(word_vectors)
    if cfg.space == "shuffled_words":
        return shuffled_word_similarity(word_vectors, cfg.seed)
    if cfg.space != "class_similarity":
        raise ValueError(f"space must be one of {SPACES}, got {cfg.space!r}")
    x = feats[cfg.penultimate_layer or layers[-1]]
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=num_classes)[:, None]
    return class_similarity(sums / np.maximum(counts, 1))  # a class never seen: zero row, correlates 0


def calibrate_guard(
    model: nn.Module,
    model_spec: ModelSpec,
    layers: list[str],
    label_names: list[str],
    word_vectors: np.ndarray,
    clean_images: Images,
    clean_labels: np.ndarray,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    attack_images: torch.Tensor | None = None,
    config: CalibrationConfig = CalibrationConfig(),
    source_weights: str | None = None,
    progress: bool = False,
) -> CalibrationReport:
    """Build reference bank, Mahalanobis detector and flagger for `model`, and write the bundle.

    model: takes (B, C, H, W) [0, 1] images (normalises inside); model_spec rebuilds it from the
    bundle. word_vectors: (C, d), row c for label_names[c]; an all-zero row is a label without a word
    vector (semguard.subject: unmatched classes), never a reference concept nor an alternative, and an
    image predicted as one is judged as the top label that has a vector. clean_images: (N, C, H, W) float32,
    or a Dataset of N such images read batch by batch (`config.batch_size` per tapped pass: what bounds
    memory); clean_labels: (N,). attack_images: adversarial images, required for the supervised methods
    ("logistic", "ensemble").
    """
    cfg = config
    y = np.asarray(clean_labels).astype(np.int64)
    c = len(label_names)
    first = next(image_batches(clean_images, 1), None) if len(clean_images) else None  # (1, C, H, W)
    if first is None or first.ndim != 4 or len(clean_images) != len(y) or len(y) < 4:
        got = tuple(clean_images.shape) if isinstance(clean_images, torch.Tensor) else f"{len(clean_images)} images"
        raise ValueError(f"clean_images must be (N >= 4, C, H, W) matching clean_labels, got {got} and {y.shape}")
    if np.asarray(word_vectors).shape[0] != c or y.min() < 0 or y.max() >= c:
        raise ValueError(f"word_vectors must have one row per label ({c}) and clean_labels lie in [0, {c})")
    tap = LayerTap(model, layers)
    input_shape = tuple(int(v) for v in first.shape[1:])
    shapes = layer_shapes(tap, input_shape)
    fit_idx, calib_idx = fit_calib_split(len(y), cfg.calib_fraction, cfg.seed)

    dens_red = density_reductions(shapes, cfg.mahalanobis_max_dim, cfg.seed)
    fit_pred, fit_feats = _reduced_pass(tap, take(clean_images, fit_idx), dens_red, cfg.batch_size, progress)
    similarity = _similarity(cfg, word_vectors, fit_feats, y[fit_idx], layers, c)
    eligible = eligible_labels(word_vectors)  # labels without a word vector: never references nor judged against
    selection = select_references(y[fit_idx], fit_pred, cfg.k, cfg.per_concept, cfg.seed, eligible)
    chosen = fit_idx[np.concatenate(selection.images)]
    red = bank_reductions(shapes, cfg)
    _, proto_acts = _reduced_pass(tap, take(clean_images, chosen), red, cfg.batch_size)
    bank = build_reference_bank(proto_acts, selection, similarity, cfg.space)
    # prototypes were reduced batch by batch above; label profiles in C order as a loaded bundle holds them
    # (a column selection is Fortran-ordered, and the signature's float64 sums then round differently)
    bank = dataclasses.replace(bank, reductions=red, label_profiles=np.ascontiguousarray(bank.label_profiles))
    maha = fit_mahalanobis(fit_feats, y[fit_idx], c, dens_red) if "mahalanobis" in cfg.features else None

    kinds = tuple(cfg.features)
    args = (tap, bank, maha, kinds, cfg.n_alternatives, cfg.seed, cfg.batch_size, eligible)
    fit_x, _ = guard_features(args[0], take(clean_images, fit_idx), *args[1:])
    calib_x, calib_frac = guard_features(args[0], take(clean_images, calib_idx), *args[1:])
    attack_x = guard_features(args[0], attack_images, *args[1:])[0] if attack_images is not None else None
    names = feature_names(kinds, layers)
    flagger = fit_flagger(fit_x, calib_x, names, cfg.method, attack_x, cfg.target_fpr, explain=(layers, calib_frac),
                          members=ensemble_members(cfg))
    held_auroc, warnings = check_calibration(flagger, calib_x, attack_x)

    manifest = BundleManifest(
        model_name=model_name or model_spec.builder, model=model_spec, input_shape=input_shape, layers=tuple(layers),
        labels=tuple(label_names), source_weights=source_weights, n_alternatives=cfg.n_alternatives, signature_seed=cfg.seed,
    )
    out = write_bundle(out_dir, manifest, model, np.asarray(word_vectors, np.float32), bank, flagger, maha)
    with torch.no_grad():
        all_pred = np.concatenate([o.logits.argmax(1).cpu().numpy() for _, o in iter_activations(tap, clean_images, cfg.batch_size)])
    return CalibrationReport(
        out, len(fit_idx), len(calib_idx), len(bank.concepts), float((all_pred == y).mean()),
        flagger.threshold, flagger.calibration["fpr_calib"], bank.bytes_per_layer(), held_auroc,
        0 if attack_x is None else len(attack_x), warnings,
    )


def check_calibration(flagger, calib_x: np.ndarray, attacks: np.ndarray | None) -> tuple[float | None, tuple[str, ...]]:
    """(held-out AUROC or None, warnings) of a fitted flagger; ValueError when its score is degenerate
    (the same value for every held-out clean image: it could never rank one image above another)."""
    clean = flagger.score(calib_x)
    if np.ptp(clean) <= 1e-9 * max(1.0, float(np.abs(clean).max())):
        raise ValueError(f"calibration: the fitted score is the constant {float(clean[0]):.4g} on all {len(clean)} "
                         f"held-out clean images, so its threshold ({flagger.threshold:.4g}) can never separate "
                         "anything; calibrate on more clean images (nothing was written)")
    warnings = []
    needed = held_out_needed(flagger.target_fpr)
    if len(clean) < needed:
        above = int(np.floor(len(clean) * flagger.target_fpr))
        warnings.append(f"{len(clean)} held-out clean images set the threshold and {above} of them lie above it; a "
                        f"false-positive rate of {flagger.target_fpr:g} needs >= {needed} ({MIN_TAIL} above it), so "
                        "the realised FPR on new clean images may be far from the target")
    held = None
    if attacks is not None and len(attacks):
        from semguard.detector.evaluate import auroc  # scipy: the batch toolkit (serving imports this module)

        held = auroc(clean, flagger.score(attacks))
        if held < AUROC_FLOOR:
            warnings.append(f"held-out AUROC {held:.3f} against {len(attacks)} calibration attacks is below "
                            f"{AUROC_FLOOR} (0.5 is chance): this guard barely tells those attacks from clean images")
    return held, tuple(warnings)
