"""A differentiable stand-in for a guard bundle, for adaptive (guard-aware) attacks.

    surrogate = GuardSurrogate(Guard.load("runs/quickstart/bundle"))
    out = surrogate(images)       # images (B, 3, H, W) float32 in [0, 1] -> logits (B, C), score (B,)

The forward pass is the guard's own: the model with its `LayerTap`, the reference bank's float32
profiles (`ReferenceBank.layer_profiles`, the function serving calls), the 1 vs 2 moment algebra
of `detector.signature.signature_from_profiles`, the Mahalanobis scores, standardisation, the
ensemble members' logits, their clean-tail surprise and the max over members; `tests/attacks/
test_adaptive.py` checks that `score` equals `Guard.inspect_arrays(images).score`. Three parts of
that pipeline have no useful gradient; the backward pass replaces them (BPDA, Athalye, Carlini &
Wagner, ICML 2018, "Obfuscated gradients give a false sense of security", section 4.1):

  fraction = mean_a [margin_a > tol]      step function, zero gradient almost everywhere
      backward: d/dmargin of mean_a sigmoid(margin_a / temperature)
  score = max_e surprise_e                only the largest member gets a gradient
      backward: d/ds of tau * logsumexp(surprise / tau) (a softmax-weighted mix of every member),
      so the attacker lowers every member at once instead of chasing whichever is on top
  surprise = tail_surprise(logit)         exact and piecewise linear already (np.interp + an
      exponential tail): differentiable as it is, written here in torch

Each replacement is "exact value + (smooth - smooth.detach())": the forward value is the exact
one bit for bit, the gradient the smooth one's. The predicted label (argmax) is held fixed
within a pass, as the guard does.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from semguard.detector.bundle import Bundle, read_bundle
from semguard.detector.guard import Guard
from semguard.detector.rsa import TIE_TOLERANCE
from semguard.detector.signature import alternative_table, one_vs_two_margins


class Verdict(NamedTuple):
    """What the exact detector decides about images (never the surrogate's reading)."""

    predicted: np.ndarray  # (B,) the model's label
    flagged: np.ndarray  # (B,) bool: score above the calibrated threshold
    score: np.ndarray  # (B,) float64


class SurrogateOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) the model's logits
    score: torch.Tensor  # (B,) the guard's score (exact forward; BPDA and soft-max backward)
    surprise: torch.Tensor  # (B, E) each ensemble member's clean-tail surprise (E = 1 for other methods)
    signature_logit: torch.Tensor  # (B,) the first member's logit from its fraction and margin columns only
    fraction: torch.Tensor  # (B, L) signature fraction (exact forward, sigmoid backward)
    margin: torch.Tensor  # (B, L) mean 1 vs 2 margin


def straight_through(exact: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """`exact`'s value with `smooth`'s gradient (BPDA): exact + (smooth - smooth.detach())."""
    return exact.detach() + (smooth - smooth.detach())


def tail_surprise_torch(scores: torch.Tensor, reference: torch.Tensor, tail_scale: float) -> torch.Tensor:
    """Torch version of `detector.flagger.tail_surprise`, differentiable in `scores` (B,).

    rank = np.interp(s, ref, 0..m-1) (flat below ref[0]); surprise = -log((m - rank) / (m + 1));
    beyond ref[-1] it is log(m + 1) + (s - ref[-1]) / tail_scale.
    """
    m = len(reference)
    idx = torch.searchsorted(reference, scores.detach().contiguous(), right=True).clamp(1, m - 1)  # segment [idx-1, idx]
    lo, hi = reference[idx - 1], reference[idx]
    rank = (idx - 1).to(scores.dtype) + (scores - lo) / (hi - lo).clamp_min(1e-300)
    rank = torch.where(scores <= reference[0], torch.zeros_like(rank), rank.clamp(max=m - 1))
    inside = -torch.log((m - rank) / (m + 1))
    beyond = np.log(m + 1) + (scores - reference[-1]) / tail_scale
    return torch.where(scores > reference[-1], beyond, inside)


class GuardSurrogate:
    """images (B, 3, H, W) in [0, 1] -> SurrogateOutput, differentiable, for any bundle (CPU): flagger
    methods ensemble (above), logistic (its logit is the score) and gaussian (d' P d, smooth already).

    temperature: of the sigmoid that stands in for the step (margin > tol) in the backward pass;
    margins are differences of correlations, ~0.01-0.3 on the world CNN, so 0.02 keeps the
    sigmoid's slope where the margins are. max_temperature: of the logsumexp standing in for the
    max over members, in surprise units (nats): members within ~1 nat of the top share the gradient.
    """

    def __init__(self, guard: Guard | Bundle | str | Path, temperature: float = 0.02, max_temperature: float = 1.0):
        if not isinstance(guard, Guard):
            guard = Guard(guard if isinstance(guard, Bundle) else read_bundle(guard))
        if temperature <= 0 or max_temperature <= 0:
            raise ValueError(f"temperature and max_temperature must be > 0, got {temperature}, {max_temperature}")
        self.guard, self.temperature, self.max_temperature = guard, temperature, max_temperature
        self.recipe, self.flagger = guard.recipe, guard.bundle.flagger
        fl, bank = self.flagger, self.recipe.bank
        self.threshold = float(fl.threshold)
        self._label_terms = bank.label_terms()
        self._alternatives = torch.as_tensor(alternative_table(bank.num_labels, self.recipe.n_alternatives, self.recipe.seed,
                                                               self.recipe.eligible))
        self._center = torch.as_tensor(fl.center)
        self._scale = torch.as_tensor(fl.scale)
        names = list(fl.feature_names)
        self._signature_cols = torch.tensor([n.split("/", 1)[0] in ("fraction", "margin") for n in names])
        if fl.method not in ("ensemble", "logistic", "gaussian"):
            raise ValueError(f"GuardSurrogate supports flagger methods 'ensemble', 'logistic' and 'gaussian', got {fl.method!r}")
        kinds = [n.split("/", 1)[0] for n in names]
        if fl.method == "gaussian":  # d' P d of the standardised features: one member weighing every column
            self._mean, self._precision = torch.as_tensor(fl.params["mean"]), torch.as_tensor(fl.params["precision"])
            self.members = [tuple(dict.fromkeys(kinds))]
            return
        self._weights = torch.as_tensor(np.atleast_2d(fl.params["weights"]))  # (E, F)
        self._bias = torch.as_tensor(np.atleast_1d(fl.params["bias"]), dtype=torch.float64)  # (E,)
        if fl.method == "ensemble":
            self._tails = torch.as_tensor(np.atleast_2d(fl.params["tail_scores"]))  # (E, M)
            self._tail_scale = [float(s) for s in np.atleast_1d(fl.params["tail_scale"])]
        # feature kinds each member weighs, e.g. [("fraction", "margin", "mahalanobis"), ("mahalanobis",)]
        self.members = [tuple(dict.fromkeys(k for k, w in zip(kinds, row) if w != 0)) for row in self._weights.tolist()]

    def verdict(self, images: torch.Tensor) -> Verdict:
        """The exact guard's reading of images (B, 3, H, W): `Guard.inspect_arrays`."""
        out = self.guard.inspect_arrays(images.detach().float())
        return Verdict(out.predicted, out.flagged, out.score)

    def _fraction(self, margins: torch.Tensor) -> torch.Tensor:
        """(L, B, M) margins -> (B, L) fraction, exact forward, sigmoid(margin / T) backward."""
        exact = (margins > TIE_TOLERANCE).double().mean(-1)
        smooth = torch.sigmoid(margins / self.temperature).mean(-1)
        return straight_through(exact, smooth).T

    def __call__(self, images: torch.Tensor) -> SurrogateOutput:
        tap_out = self.guard.tap(images)
        predicted = self.recipe.signature_labels(tap_out.logits).detach()  # the label the exact signature judges
        profiles = self.recipe.bank.layer_profiles(tap_out.acts, dtype=torch.float32).double()  # (L, B, K)
        margins = one_vs_two_margins(profiles, predicted, self._label_terms, self._alternatives[predicted])
        fraction, margin = self._fraction(margins), margins.mean(-1).T  # (B, L)
        blocks = {"fraction": fraction, "margin": margin}
        if "mahalanobis" in self.recipe.kinds:
            blocks["mahalanobis"] = self.recipe.mahalanobis.distances(self.recipe.mahalanobis.features(tap_out.acts))
        features = torch.cat([blocks[k] for k in self.recipe.kinds], 1)  # (B, F), the bundle's column order
        z = (features - self._center) / self._scale
        if self.flagger.method == "gaussian":
            d = z - self._mean
            score = ((d @ self._precision) * d).sum(1)
            ds = d * self._signature_cols  # the signature's columns only
            return SurrogateOutput(tap_out.logits, score, score[:, None], ((ds @ self._precision) * ds).sum(1),
                                   fraction, margin)
        logits = z @ self._weights.T + self._bias  # (B, E)
        signature_logit = (z * self._signature_cols) @ self._weights[0] + self._bias[0]
        if self.flagger.method == "logistic":
            surprise = logits
            score = logits[:, 0]
        else:
            surprise = torch.stack([tail_surprise_torch(logits[:, e], self._tails[e], self._tail_scale[e])
                                    for e in range(len(self._tail_scale))], 1)  # (B, E)
            smooth = self.max_temperature * torch.logsumexp(surprise / self.max_temperature, 1)
            score = straight_through(surprise.max(1).values, smooth)
        return SurrogateOutput(tap_out.logits, score, surprise, signature_logit, fraction, margin)


class ActivationDetectorSurrogate:
    """ART's BinaryActivationDetector made differentiable: images -> SurrogateOutput, and its exact verdict.

    ART (1.20) reads the layer with a forward hook on `dict(model.named_modules())[layer]` during a plain
    forward pass and feeds the activations to its detector network; this does the same in one torch graph,
    so the forward is ART's computation (float32, same modules) and the gradient is exact (no BPDA needed:
    nothing in it is a step function). `detect(images) -> (B,) score` is ART's own `detect` call (the logit
    difference adversarial - clean); the image is flagged when it exceeds `threshold` (0: ART's argmax).
    """

    def __init__(self, model: torch.nn.Module, layer: str, head: torch.nn.Module, detect, threshold: float = 0.0):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"layer {layer!r} is not a module of the model; it has {sorted(modules)[:8]}...")
        self.model, self.layer, self.head, self.detect = model.eval(), modules[layer], head.eval(), detect
        self.threshold = float(threshold)
        self.members = [("activations",)]

    def __call__(self, images: torch.Tensor) -> SurrogateOutput:
        seen: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        two = self.head(seen[-1])  # (B, 2): clean, adversarial
        score = (two[:, 1] - two[:, 0]).double()
        empty = score.new_zeros(len(score), 0)
        return SurrogateOutput(logits, score, score[:, None], score, empty, empty)

    def verdict(self, images: torch.Tensor) -> Verdict:
        x = images.detach().float()
        with torch.no_grad():
            predicted = self.model(x).argmax(1).numpy()
        score = np.asarray(self.detect(x), dtype=np.float64)
        return Verdict(predicted, score > self.threshold, score)
