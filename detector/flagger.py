"""Flagger: per-image features (semantic signature, optionally density scores) -> adversarial score and flag.

Features are columns with names "<kind>/<layer>": kind "fraction" (the signature), "margin"
(its continuous variant) and "mahalanobis" (per-layer scores of `detector.mahalanobis`). Every
column is standardised with the clean fitting images' mean and spread, then

  method "gaussian" (unsupervised): squared Mahalanobis distance from the clean feature mean,
      Ledoit-Wolf shrunk covariance; no assumption about the attack.
  method "logistic" (supervised): L2-regularised logistic regression, clean (0) vs attack (1),
      classes weighted equally, fitted by Newton's method; the score is the logit.
  method "ensemble" (supervised): one logistic regression per member (a subset of the feature
      kinds, e.g. all of them and the Mahalanobis scores alone); each member's logit is turned
      into its clean-tail surprise -log P_clean(logit >= s), read off the held-out clean
      images' logits (interpolated between them, an exponential tail beyond the largest), and
      the score is the largest surprise: an image is as suspicious as its most surprised member.
      A logistic fit on many features leans on what separates the training attacks; the
      Mahalanobis member keeps the density evidence that carries over to attacks not trained on.

The threshold is the (1 - target_fpr) quantile of the scores of held-out clean images (never
the fitting images); an image is flagged when its score exceeds it. The explanation of a
verdict is the set of layers whose signature fraction falls below the clean images' low
quantile at that layer (which layers disagree with the predicted label). Saved as JSON, with
the score quantiles of the calibration's clean (and attack) images, from which the service
sizes its score histogram.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from semguard.detector.mahalanobis import ledoit_wolf
from semguard.detector.signature import Signature

METHODS = ("gaussian", "logistic", "ensemble")
SUPERVISED = ("logistic", "ensemble")
FEATURE_KINDS = ("fraction", "margin", "mahalanobis")
FLAGGER_FORMAT = "semguard.flagger/1"
# levels of the calibration's score quantiles kept in flagger.json (the service's histogram buckets)
SCORE_QUANTILE_LEVELS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def feature_names(kinds: tuple[str, ...] | list[str], layers: list[str] | tuple[str, ...],
                  mahalanobis_layers: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Column names "<kind>/<layer>" in the order `assemble_features` stacks them."""
    bad = [k for k in kinds if k not in FEATURE_KINDS]
    if bad or not kinds:
        raise ValueError(f"feature kinds must be a non-empty subset of {FEATURE_KINDS}, got {list(kinds)}")
    names = []
    for kind in kinds:
        names += [f"{kind}/{n}" for n in (mahalanobis_layers or layers if kind == "mahalanobis" else layers)]
    return names


def assemble_features(kinds: tuple[str, ...] | list[str], signature: Signature,
                      mahalanobis_scores: np.ndarray | None = None) -> np.ndarray:
    """(B, F) float64 feature matrix: the chosen blocks side by side (fraction (B, L), margin (B, L), mahalanobis (B, L'))."""
    blocks = {"fraction": signature.fraction, "margin": signature.margin, "mahalanobis": mahalanobis_scores}
    if "mahalanobis" in kinds and mahalanobis_scores is None:
        raise ValueError("feature kind 'mahalanobis' needs mahalanobis_scores")
    return np.concatenate([np.asarray(blocks[k], dtype=np.float64) for k in kinds], axis=1)


@dataclass(frozen=True)
class Flagger:
    """A fitted flagger; see the module docstring. All arrays are float64."""

    method: str
    feature_names: tuple[str, ...]
    center: np.ndarray  # (F,) clean mean, for standardising
    scale: np.ndarray  # (F,) clean standard deviation (1 where constant)
    # gaussian: mean (F,), precision (F, F); logistic: weights (F,), bias; ensemble: weights (E, F)
    # (zero outside a member's columns), bias (E,), tail_scores (E, M) sorted clean logits, tail_scale (E,)
    params: Mapping[str, np.ndarray | float]
    threshold: float
    target_fpr: float
    explain_layers: tuple[str, ...] = ()  # layers whose "fraction/<layer>" column explains a verdict
    explain_low: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (L,) clean low quantile per layer
    calibration: Mapping[str, float] = field(default_factory=dict)  # figures for the record
    # score quantiles of the calibration: "levels" (Q,), "clean" (Q,) held-out clean images, "attack" (Q,)
    # attack images (supervised methods); empty in flagger.json files written before they were kept
    score_quantiles: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        f = len(self.feature_names)
        if self.center.shape != (f,) or self.scale.shape != (f,):
            raise ValueError(f"center and scale must be ({f},)")
        if len(self.explain_low) != len(self.explain_layers):
            raise ValueError("explain_low must have one value per explain layer")
        for name, value in (("threshold", self.threshold), ("center", self.center), ("scale", self.scale),
                            ("explain_low", self.explain_low), *((f"params.{k}", v) for k, v in self.params.items())):
            if not np.all(np.isfinite(value)):
                raise ValueError(f"field {name} must be finite, got {np.ravel(value)[:3].tolist()}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"field target_fpr must be in (0, 1), got {self.target_fpr}")
        levels = np.asarray(self.score_quantiles.get("levels", ()))
        bad = [k for k, v in self.score_quantiles.items() if k not in ("levels", "clean", "attack") or np.shape(v) != levels.shape]
        if bad:
            raise ValueError(f"score_quantiles must map 'levels', 'clean' and optionally 'attack' to ({len(levels)},) "
                             f"arrays, got {bad} wrong")

    def calibration_scores(self) -> np.ndarray:
        """(n,) sorted score quantiles of the calibration's clean and attack images; (0,) for old files."""
        return np.sort(np.concatenate([np.ravel(self.score_quantiles.get(k, ())) for k in ("clean", "attack")]))

    def _check(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(f"features must be (B, {len(self.feature_names)}) with columns {list(self.feature_names)[:4]}..., got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features must be finite")
        return x

    def score(self, features: np.ndarray) -> np.ndarray:
        """(B, F) -> (B,) adversarial score, larger = more suspicious."""
        z = (self._check(features) - self.center) / self.scale
        if self.method == "gaussian":
            d = z - self.params["mean"]
            return np.einsum("bi,ij,bj->b", d, self.params["precision"], d)
        if self.method == "logistic":
            return z @ self.params["weights"] + float(self.params["bias"])
        logits = z @ np.atleast_2d(self.params["weights"]).T + self.params["bias"]  # (B, E)
        tails = np.atleast_2d(self.params["tail_scores"])
        surprise = [tail_surprise(logits[:, e], tails[e], float(np.atleast_1d(self.params["tail_scale"])[e]))
                    for e in range(len(tails))]
        return np.max(surprise, axis=0)

    def flag(self, features: np.ndarray) -> np.ndarray:
        """(B, F) -> (B,) bool: score above the calibrated threshold."""
        return self.score(features) > self.threshold

    def disagreeing(self, fractions: np.ndarray) -> np.ndarray:
        """(B, L) signature fractions over explain_layers -> (B, L) bool: below the clean low quantile.

        Independent of the features scored, so every verdict keeps its explanation even when the
        score leans on density features.
        """
        x = np.asarray(fractions, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.explain_layers):
            raise ValueError(f"fractions must be (B, {len(self.explain_layers)}), got {x.shape}")
        return x < self.explain_low

    def to_json(self) -> dict:
        def plain(v):
            return np.asarray(v).tolist() if isinstance(v, np.ndarray) else v

        d = {k: plain(v) for k, v in asdict(self).items() if k not in ("params", "score_quantiles")}
        d["params"] = {k: plain(v) for k, v in self.params.items()}
        d["score_quantiles"] = {k: plain(v) for k, v in self.score_quantiles.items()}
        return {"format": FLAGGER_FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict) -> "Flagger":
        if d.get("format") != FLAGGER_FORMAT:
            raise ValueError(f"not a semguard flagger (format {d.get('format')!r}, expected {FLAGGER_FORMAT!r})")
        params = {k: (np.asarray(v, dtype=np.float64) if isinstance(v, list) else float(v)) for k, v in d["params"].items()}
        return cls(
            method=d["method"], feature_names=tuple(d["feature_names"]),
            center=np.asarray(d["center"], dtype=np.float64), scale=np.asarray(d["scale"], dtype=np.float64),
            params=params, threshold=float(d["threshold"]), target_fpr=float(d["target_fpr"]),
            explain_layers=tuple(d["explain_layers"]), explain_low=np.asarray(d["explain_low"], dtype=np.float64),
            calibration=dict(d["calibration"]),
            score_quantiles={k: np.asarray(v, dtype=np.float64) for k, v in d.get("score_quantiles", {}).items()},
        )

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Flagger":
        from semguard.files import read_json

        try:
            return cls.from_json(read_json(path))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: malformed flagger ({type(error).__name__}: {error})") from None
        except ValueError as error:
            raise ValueError(error if str(path) in str(error) else f"{path}: {error}") from None


def tail_surprise(scores: np.ndarray, reference: np.ndarray, tail_scale: float) -> np.ndarray:
    """(B,) scores -> (B,) -log of the share of `reference` (M,) sorted clean scores at or above each.

    Continuous: the rank is interpolated between reference scores, (M - rank) / (M + 1) is the
    tail share, and beyond the largest reference score the surprise grows linearly by
    (s - max) / tail_scale (an exponential tail), so scores past every clean one stay ordered.
    """
    s, ref = np.asarray(scores, np.float64), np.asarray(reference, np.float64)
    m = len(ref)
    rank = np.interp(s, ref, np.arange(m, dtype=np.float64))  # 0 below the smallest, m - 1 at the largest
    out = -np.log((m - rank) / (m + 1))
    beyond = s > ref[-1]
    out[beyond] = np.log(m + 1) + (s[beyond] - ref[-1]) / tail_scale
    return out


def _tail(calib_logits: np.ndarray, top: float = 0.05, min_points: int = 10) -> tuple[np.ndarray, float]:
    """Sorted clean logits and the tail's scale: the mean excess of the top share (at least
    `min_points` of them) over the lowest of that share; 1 where the logits do not spread."""
    ref = np.sort(calib_logits)
    upper = ref[-max(min_points, int(np.ceil(top * len(ref)))):]
    scale = float(np.mean(upper - upper[0]))
    return ref, scale if scale > 1e-12 else 1.0


def _logistic_newton(z: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Weighted L2 logistic regression by Newton's method (bias unpenalised); classes weigh equally."""
    n, f = z.shape
    x = np.hstack([z, np.ones((n, 1))])
    w_class = np.where(y == 1, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
    penalty = np.full(f + 1, l2 / n)
    penalty[-1] = 0.0
    beta = np.zeros(f + 1)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -500, 500)))
        grad = x.T @ (w_class * (p - y)) + penalty * beta
        hess = (x * (w_class * p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-12 * np.eye(f + 1)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return beta[:-1], float(beta[-1])


def fit_flagger(
    clean_fit: np.ndarray,
    clean_calib: np.ndarray,
    names: list[str] | tuple[str, ...],
    method: str = "gaussian",
    attack: np.ndarray | None = None,
    target_fpr: float = 0.05,
    explain_quantile: float = 0.05,
    l2: float = 1.0,
    explain: tuple[list[str] | tuple[str, ...], np.ndarray] | None = None,
    members: list[tuple[str, ...]] | tuple[tuple[str, ...], ...] | None = None,
) -> Flagger:
    """Fit a flagger and calibrate its threshold.

    clean_fit: (N, F) clean features to fit on; clean_calib: (M, F) held-out clean features
    for the threshold (quantile at 1 - target_fpr) and the per-layer explanation quantile;
    attack: (A, F) attack features, required for methods "logistic" and "ensemble". names: the F
    column names. l2: logistic penalty in units of one image's loss. explain: (layers, (M, L)
    signature fractions of the calibration images) for the explanation; default the "fraction/"
    columns. members ("ensemble" only): feature kinds of each member, e.g. (("fraction", "margin",
    "mahalanobis"), ("mahalanobis",)); each must name columns present.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < target_fpr < 1.0 or not 0.0 < explain_quantile < 1.0:
        raise ValueError(f"target_fpr and explain_quantile must lie in (0, 1), got {target_fpr}, {explain_quantile}")
    fit, calib = np.asarray(clean_fit, np.float64), np.asarray(clean_calib, np.float64)
    f = len(names)
    for label, x in (("clean_fit", fit), ("clean_calib", calib)):
        if x.ndim != 2 or x.shape[1] != f or len(x) < 2 or not np.isfinite(x).all():
            raise ValueError(f"{label} must be finite (n >= 2, {f}), got shape {x.shape}")
    center = fit.mean(0)
    spread = fit.std(0)
    scale = np.where(spread > 1e-12, spread, 1.0)
    z = (fit - center) / scale
    figures: dict[str, float] = {"n_fit": len(fit), "n_calib": len(calib)}
    if method == "gaussian":
        cov = ledoit_wolf(z - z.mean(0))
        params = {"mean": z.mean(0), "precision": np.linalg.pinv(cov.covariance, hermitian=True)}
        figures["shrinkage"] = cov.shrinkage
    else:
        if attack is None or np.asarray(attack).ndim != 2 or np.asarray(attack).shape[1] != f or len(attack) < 1:
            raise ValueError(f"method {method!r} needs attack features (A >= 1, {f})")
        za = (np.asarray(attack, np.float64) - center) / scale
        y = np.r_[np.zeros(len(z)), np.ones(len(za))]
        zz = np.vstack([z, za])
        if method == "logistic":
            weights, bias = _logistic_newton(zz, y, l2)
            params = {"weights": weights, "bias": bias}
        else:
            params = _fit_ensemble(zz, y, (calib - center) / scale, names, members, l2)
        figures["n_attack"] = len(za)
    if explain is None:
        layers = tuple(n.split("/", 1)[1] for n in names if n.startswith("fraction/"))
        fractions = calib[:, [list(names).index(f"fraction/{n}") for n in layers]]
    else:
        layers, fractions = tuple(explain[0]), np.asarray(explain[1], np.float64)
        if fractions.shape != (len(calib), len(layers)):
            raise ValueError(f"explain fractions must be ({len(calib)}, {len(layers)}), got {fractions.shape}")
    flagger = Flagger(method, tuple(names), center, scale, params, 0.0, target_fpr)
    calib_scores = flagger.score(calib)
    threshold = float(np.quantile(calib_scores, 1.0 - target_fpr, method="higher"))
    low = np.quantile(fractions, explain_quantile, axis=0) if layers else np.zeros(0)
    figures["fpr_calib"] = float((calib_scores > threshold).mean())
    quantiles = {"levels": np.array(SCORE_QUANTILE_LEVELS), "clean": np.quantile(calib_scores, SCORE_QUANTILE_LEVELS)}
    if attack is not None and method in SUPERVISED:
        quantiles["attack"] = np.quantile(flagger.score(attack), SCORE_QUANTILE_LEVELS)
    return Flagger(method, tuple(names), center, scale, params, threshold, target_fpr, layers, low, figures, quantiles)


def member_columns(names: list[str] | tuple[str, ...], kinds: tuple[str, ...]) -> np.ndarray:
    """(F,) bool: the columns whose kind ("<kind>/<layer>") is among `kinds`."""
    cols = np.array([n.split("/", 1)[0] in kinds for n in names])
    if not cols.any():
        raise ValueError(f"ensemble member {list(kinds)} names no feature column (columns are kinds {sorted({n.split('/', 1)[0] for n in names})})")
    return cols


def _fit_ensemble(zz: np.ndarray, y: np.ndarray, z_calib: np.ndarray, names, members, l2: float) -> dict:
    """One logistic per member on its columns; its tail from the held-out clean images' logits."""
    if not members:
        raise ValueError("method 'ensemble' needs members: feature kinds of each logistic member")
    weights, biases, tails, scales = [], [], [], []
    for kinds in members:
        cols = member_columns(names, tuple(kinds))
        w_sub, b = _logistic_newton(zz[:, cols], y, l2)
        w = np.zeros(len(names))
        w[cols] = w_sub
        ref, scale = _tail(z_calib @ w + b)
        weights.append(w)
        biases.append(b)
        tails.append(ref)
        scales.append(scale)
    return {"weights": np.array(weights), "bias": np.array(biases), "tail_scores": np.array(tails),
            "tail_scale": np.array(scales)}
