"""The guard: one object that runs the model with taps and turns each image into a verdict.

    guard = Guard.load("runs/quickstart/bundle")
    verdicts = guard.inspect(images)          # images (B, C, H, W) float32 in [0, 1]
    out = guard.inspect_arrays(images)        # batched arrays + per-stage timings (for the service)

Stages: forward (model + layer taps), signature (1 vs 2 profiles against the reference bank),
flagger (density features if used, score, flag, explanation). `calibrate_guard` builds a
bundle from a model and clean images (see detector.bundle for the files).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.profiler import record_function

from semguard.detector.bundle import Bundle, BundleError, read_bundle
from semguard.detector.calibrate import CalibrationConfig, CalibrationReport, calibrate_guard  # noqa: F401 (public here too)
from semguard.detector.errors import InputError
from semguard.detector.features import flagger_features, recipe_of
from semguard.detector.flagger import Flagger
from semguard.detector.layers import LayerTap
from semguard.detector.native import load_kernels

PIXEL_TOLERANCE = 1e-4  # images a resize or colour conversion pushed just past [0, 1] are still accepted


@dataclass(frozen=True)
class GuardInfo:
    model_name: str
    labels: list[str]
    layers: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W)
    threshold: float
    flagger_method: str
    # sorted score quantiles of the calibration's clean (and attack) images; () for bundles older than them
    calibration_scores: tuple[float, ...] = ()


@dataclass(frozen=True)
class Verdict:
    prediction: int
    label: str
    top5: list[tuple[int, float]]  # (class, probability), most probable first
    logits: np.ndarray  # (C,)
    signature: np.ndarray  # (L,) fraction of alternatives the prediction beats, per layer
    score: float
    flagged: bool
    disagreeing_layers: list[str]  # layers whose signature is below the clean low quantile


class StageTimings(NamedTuple):
    forward_s: float  # model forward pass with taps
    signature_s: float  # profiles and 1 vs 2 signature
    flagger_s: float  # density features, score, flag, explanation


class GuardOutput(NamedTuple):
    logits: np.ndarray  # (B, C) float32
    predicted: np.ndarray  # (B,) int64
    top_classes: np.ndarray  # (B, min(5, C)) int64
    top_probabilities: np.ndarray  # (B, min(5, C)) float64
    signature: np.ndarray  # (B, L) fraction
    margin: np.ndarray  # (B, L) mean margin
    features: np.ndarray  # (B, F) float64, what the flagger scored (columns bundle.flagger.feature_names)
    score: np.ndarray  # (B,)
    flagged: np.ndarray  # (B,) bool
    disagreeing: np.ndarray  # (B, L) bool, over info.layers
    timings: StageTimings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so a stage's time is its own, not the queue's


class Guard:
    """Model + taps + reference bank + flagger, from a bundle (`Guard.load`) or parts."""

    def __init__(self, bundle: Bundle, device: torch.device | str | None = None, native_kernels: bool = False) -> None:
        self.bundle = bundle
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        m = bundle.manifest
        taps = list(dict.fromkeys([*m.layers, *(bundle.mahalanobis.layers if bundle.mahalanobis else ())]))
        self.tap = LayerTap(bundle.model.to(self.device), taps)
        self.info = GuardInfo(m.model_name, list(m.labels), list(m.layers), tuple(m.input_shape),
                              bundle.flagger.threshold, bundle.flagger.method,
                              tuple(float(v) for v in bundle.flagger.calibration_scores()))
        self.recipe = recipe_of(bundle)  # the features calibration computed, and in its column order
        if native_kernels:  # sketches, channel means and margins by the C kernels (detector/native.py)
            if self.device.type != "cpu":
                raise ValueError(f"native_kernels: the C kernels run on the CPU, this guard on {self.device}")
            self.recipe = dataclasses.replace(self.recipe, kernels=load_kernels())
        self.stage_timings: StageTimings | None = None
        self._check_model()

    @classmethod
    def load(cls, bundle_dir: str | Path, device: torch.device | str | None = None, native_kernels: bool = False) -> "Guard":
        """Read, hash-check and cross-check a bundle (BundleError, a ValueError, on any mismatch)."""
        return cls(read_bundle(bundle_dir), device, native_kernels)

    def _check_model(self) -> None:
        """One dummy pass: the model's output and layer widths must be the ones the bundle was built on."""
        c, h, w = self.info.input_shape
        with torch.no_grad():
            out = self.tap(torch.full((1, c, h, w), 0.5, device=self.device))
        if out.logits.shape[-1] != len(self.info.labels):
            raise BundleError(f"model gives {out.logits.shape[-1]} classes, bundle.json lists {len(self.info.labels)} labels")
        bank = self.bundle.bank
        for name in bank.layers:
            try:
                width = bank.reduction(name).output_dim(out.acts[name].shape[1])
            except ValueError as e:
                raise BundleError(f"layer {name!r}: {e}") from None
            if width != bank.prototypes[name].shape[1]:
                raise BundleError(f"layer {name!r} gives {width} features, the reference bank holds {bank.prototypes[name].shape[1]}")

    def validate_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1], finite, B >= 1, the bundle's size -> tensor on the guard's device.

        InputError (a ValueError) naming what is wrong otherwise: the caller's fault, unlike any
        other error of `inspect`.
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
        c, h, w = self.info.input_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, h, w):
            raise InputError(f"images must have shape (B, {c}, {h}, {w}), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise InputError("images: empty batch (B = 0)")
        if images.dtype != torch.float32:
            raise InputError(f"images must be float32 in [0, 1], got dtype {images.dtype}")
        lo, hi = (float(v) for v in torch.aminmax(images))  # one pass over the batch; a NaN pixel makes both NaN
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError("images contain NaN or infinite pixels")
        if lo < -PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
            raise InputError(f"images must lie in [0, 1] (the model normalises inside), got range [{lo:.3g}, {hi:.3g}]")
        return images.to(self.device)

    @torch.no_grad()
    def inspect_arrays(self, images: torch.Tensor | np.ndarray) -> GuardOutput:
        """Batched verdict arrays and per-stage timings; see GuardOutput."""
        x = self.validate_images(images)
        fl = self.bundle.flagger
        t0 = time.perf_counter()
        with record_function("guard.forward"):  # stage names for benchmarks/profile_guard.py
            out = self.tap(x)
            predicted = out.logits.argmax(1)
            _sync(self.device)
        t1 = time.perf_counter()
        feats = flagger_features(out.acts, self.recipe.signature_labels(out.logits), self.recipe)
        with record_function("guard.flagger"):
            score = fl.score(feats.features)
            disagree = _explanation(fl, feats.signature.fraction, self.info.layers)
        flagger_s = time.perf_counter() - t1 - feats.signature_s  # density features, score, explanation
        probs = torch.softmax(out.logits.double(), 1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        self.stage_timings = StageTimings(t1 - t0, feats.signature_s, flagger_s)  # of the last call, read by the service's metrics
        return GuardOutput(
            out.logits.float().cpu().numpy(), predicted.cpu().numpy(), top.indices.cpu().numpy(),
            top.values.cpu().numpy(), feats.signature.fraction, feats.signature.margin, feats.features, score,
            score > fl.threshold, disagree, self.stage_timings,
        )

    def inspect(self, images: torch.Tensor | np.ndarray) -> list[Verdict]:
        """One Verdict per image; InputError for a wrong shape, dtype, range, NaN or empty batch."""
        o = self.inspect_arrays(images)
        layers = self.info.layers
        return [
            Verdict(
                prediction=int(o.predicted[b]), label=self.info.labels[int(o.predicted[b])],
                top5=[(int(c), float(p)) for c, p in zip(o.top_classes[b], o.top_probabilities[b])],
                logits=o.logits[b], signature=o.signature[b], score=float(o.score[b]), flagged=bool(o.flagged[b]),
                disagreeing_layers=[layers[j] for j in np.flatnonzero(o.disagreeing[b])],
            )
            for b in range(len(o.predicted))
        ]


def _explanation(flagger: Flagger, fractions: np.ndarray, layers: list[str]) -> np.ndarray:
    """(B, L) bool over `layers`; layers the flagger has no clean quantile for never disagree."""
    out = np.zeros(fractions.shape, dtype=bool)
    if flagger.explain_layers:
        cols = [layers.index(n) for n in flagger.explain_layers]
        out[:, cols] = flagger.disagreeing(fractions[:, cols])
    return out
