"""Mahalanobis detector baseline (Lee, Lee, Lee & Shin, NeurIPS 2018, "A simple unified framework
for detecting out-of-distribution samples and adversarial attacks").

Per tapped layer: class-conditional Gaussians with one tied covariance over the layer's
features (conv maps reduced to their channel means, as Lee et al. do, via `Reduction`). An
image's layer score is its Mahalanobis distance to the closest class mean,

    M_l(x) = min_c (f_l(x) - mu_c)^T Sigma_l^{-1} (f_l(x) - mu_c),

large for inputs unlike the training data. Lee et al. combine the per-layer scores with a
logistic regression on validation data; here the (B, L) scores are features for
`detector.flagger` (supervised = their combination, unsupervised = a Gaussian on clean scores).
Lee et al.'s input pre-processing (a gradient step on the input) is left out: it needs
gradients at serving time. The covariance is Ledoit-Wolf shrunk so that wide layers with few
images stay invertible.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file

from semguard.detector.reference import Reduction, read_checked
from semguard.detector.rsa import ArrayLike, as_float64
from semguard.files import loads_json

MAHALANOBIS_FORMAT = "semguard.mahalanobis/1"


class ShrunkCovariance(NamedTuple):
    covariance: np.ndarray  # (d, d) (1 - s) S + s mu I
    shrinkage: float  # s in [0, 1]


def ledoit_wolf(centred: ArrayLike) -> ShrunkCovariance:
    """Ledoit & Wolf (2004) shrinkage of the empirical covariance towards mu I.

    centred: (n, d) rows already centred (here: minus their class mean). Same estimator as
    sklearn.covariance.ledoit_wolf(assume_centered=True).
    """
    x = as_float64(centred)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"centred must be (n >= 1, d >= 1), got {tuple(x.shape)}")
    n, d = x.shape
    emp = x.T @ x / n  # (d, d)
    mu = torch.trace(emp) / d
    x2 = x * x
    beta_sum = (x2.T @ x2).sum()  # sum_ij sum_k x_ki^2 x_kj^2
    delta_sum = (emp * emp).sum()  # ||S||_F^2
    beta = (beta_sum / n - delta_sum) / n / d
    delta = (delta_sum - 2 * mu * torch.trace(emp) + d * mu * mu) / d  # ||S - mu I||_F^2 / d
    beta = torch.minimum(beta, delta)
    s = 0.0 if float(delta) <= 0 else float(beta / delta)
    cov = (1 - s) * emp + s * mu * torch.eye(d, dtype=emp.dtype)
    return ShrunkCovariance(cov.numpy(), s)


class _LayerGroup(NamedTuple):
    """Layers of one width scored together: the constants of G > 1 layers stacked, or one layer's as they are
    (2-D views of the stored arrays: no copy, and a plain GEMM reads the transposed means in place)."""

    columns: list[int]  # the layers' positions in MahalanobisDetector.layers
    means_t: torch.Tensor  # (G, d, C') or (d, C') float64 means of the classes seen in fitting, transposed
    precisions: torch.Tensor  # (G, d, d) or (d, d) float64
    mean_norms: torch.Tensor  # (G, 1, C') or (1, C') mu_c^T P mu_c


_STACKED_BYTES = 1 << 21  # a layer's means and precision up to this size are stacked with the others of its width


@dataclass(frozen=True)
class MahalanobisDetector:
    """Fitted per-layer class means (C, d_l) and tied precision matrices (d_l, d_l)."""

    layers: tuple[str, ...]
    means: Mapping[str, np.ndarray]
    precisions: Mapping[str, np.ndarray]
    reductions: Mapping[str, Reduction] = field(default_factory=dict)
    shrinkage: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.layers:
            m, p = self.means.get(name), self.precisions.get(name)
            if m is None or p is None or m.ndim != 2 or p.shape != (m.shape[1], m.shape[1]):
                raise ValueError(f"layer {name!r} needs means (C, d) and precision (d, d)")

    def reduction(self, layer: str) -> Reduction:
        return self.reductions.get(layer, Reduction())

    def features(self, acts: Mapping[str, torch.Tensor],
                 reduced: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{layer: (B, k_l)} tapped activations -> {layer: (B, d_l)} the features the Gaussians model.

        reduced: {layer: (B, d_l)} float64 features already made (the guard's native pass), taken as given.
        """
        reduced = reduced or {}
        missing = [n for n in self.layers if n not in acts and n not in reduced]
        if missing:
            raise ValueError(f"acts lacks layers {missing}; the detector uses {list(self.layers)}")
        return {n: reduced[n] if n in reduced else _reduce_rows_float64(self.reduction(n), torch.as_tensor(acts[n]))
                for n in self.layers}

    @cached_property
    def _groups(self) -> list[_LayerGroup]:
        """The input-independent parts of the score, computed once (first call), layers grouped by width.

        Recomputing mu_c^T P mu_c for every class at every call cost ~1 s per call on resnet50
        (1000 classes); here it is paid once per detector. Small layers of one width are stacked so
        that they are scored by one batched product instead of a Python loop over layers (the world
        CNN's 14 layers: 3 groups); a large layer keeps its own group, a view of the stored arrays,
        so stacking costs at most `_STACKED_BYTES` of extra memory per layer. Memory otherwise: one
        more (C, d) copy of the seen class means only when some class was never seen.
        """
        by_key: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for j, name in enumerate(self.layers):
            mu = torch.from_numpy(self.means[name])  # (C, d); NaN rows: classes never seen
            prec = torch.from_numpy(self.precisions[name])  # (d, d)
            seen = torch.isfinite(mu).all(1)
            mu = mu if bool(seen.all()) else mu[seen]
            small = self.means[name].nbytes + self.precisions[name].nbytes <= _STACKED_BYTES
            by_key.setdefault(tuple(mu.shape) if small else (name,), []).append((j, mu, prec))
        groups = []
        for members in by_key.values():
            columns, mus, precs = zip(*members)
            if len(members) == 1:
                mu, prec = mus[0], precs[0]
                groups.append(_LayerGroup(list(columns), mu.T, prec, ((mu @ prec) * mu).sum(-1)[None]))
                continue
            mu, prec = torch.stack(mus), torch.stack(precs)  # (G, C', d), (G, d, d)
            groups.append(_LayerGroup(list(columns), mu.transpose(1, 2).contiguous(), prec,
                                      ((mu @ prec) * mu).sum(-1)[:, None]))  # batched GEMMs read operands in place
        return groups

    def distances(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{layer: (B, d_l)} float64 features (`features`) -> (B, L) squared Mahalanobis distance to the
        closest class mean; differentiable in the features (attacks.adaptive backpropagates through it)."""
        f = [features[n] for n in self.layers]
        out = [None] * len(self.layers)
        for g in self._groups:
            mu_t, prec, mpm = (t.to(f[0].device) for t in (g.means_t, g.precisions, g.mean_norms))
            for j in g.columns:
                if f[j].shape[1] != mu_t.shape[-2]:
                    raise ValueError(f"acts[{self.layers[j]!r}] gives {f[j].shape[1]} features, the detector was fitted on {mu_t.shape[-2]}")
            # one layer: plain GEMMs on (B, d) (a batched GEMM would copy its transposed means, and mu @ (xP)^T
            # measured 4% slower at batch 1 on resnet50)
            x = torch.stack([f[j] for j in g.columns]) if len(g.columns) > 1 else f[g.columns[0]]  # (G, B, d) or (B, d)
            # (x - mu)^T P (x - mu) = x P x - 2 x P mu + mu P mu, for all classes at once
            xp = x @ prec
            dist = (xp * x).sum(-1, keepdim=True) - 2 * xp @ mu_t + mpm  # (G, B, C') or (B, C')
            closest = dist.min(-1).values
            for j, column in zip(g.columns, closest if len(g.columns) > 1 else closest[None]):
                out[j] = column
        return torch.stack(out, 1)

    def layer_scores(self, acts: Mapping[str, torch.Tensor], reduced: Mapping[str, torch.Tensor] | None = None) -> np.ndarray:
        """(B, L) float64: per layer, squared Mahalanobis distance to the closest class mean (reduced: `features`)."""
        return self.distances(self.features(acts, reduced)).cpu().numpy() if self.layers else np.zeros((0, 0))

    def bytes_per_layer(self) -> dict[str, int]:
        return {n: int(self.means[n].nbytes + self.precisions[n].nbytes) for n in self.layers}


_CHUNK_ELEMENTS = 1 << 18  # float64 staging buffer per step: 2 MiB, stays in a core's L2 cache


def _reduce_rows_float64(reduction: Reduction, acts: torch.Tensor) -> torch.Tensor:
    """reduction.apply(acts.double()) for (B, k) acts, without a float64 copy of the batch.

    A channel mean only depends on its own channel, so channels are converted a few at a time
    into one reused L2-sized buffer and averaged there: the same float64 means, bit for bit, as
    converting the whole batch (5 GB for resnet50's 49 ReLUs at batch 32, ~65% of the density
    stage when it was made in 32 MiB row chunks). Other reductions (identity, projection: small
    layers) go in one piece.
    """
    if reduction.kind != "channel_pool" or acts.ndim != 2 or acts.dtype == torch.float64 or acts.numel() <= _CHUNK_ELEMENTS:
        return reduction.apply(acts.double())  # small enough to convert at once: fewer ops (the world CNN's layers)
    b, k = acts.shape
    if k % reduction.channels:
        reduction.apply(acts[:1])  # raises its ValueError naming the mismatch
    hw = k // reduction.channels
    rows = acts.reshape(b * reduction.channels, hw)  # (B * channels, H * W): one row per channel
    step = max(1, _CHUNK_ELEMENTS // hw)
    staging = torch.empty(min(step, len(rows)), hw, dtype=torch.float64, device=acts.device)
    out = torch.empty(len(rows), dtype=torch.float64, device=acts.device)
    for i in range(0, len(rows), step):
        n = min(step, len(rows) - i)
        out[i : i + n] = staging[:n].copy_(rows[i : i + n]).mean(-1)
    return out.reshape(b, reduction.channels)


def fit_mahalanobis(
    features: Mapping[str, ArrayLike],
    labels: ArrayLike,
    num_classes: int,
    reductions: Mapping[str, Reduction] | None = None,
) -> MahalanobisDetector:
    """Fit class means and a Ledoit-Wolf tied covariance per layer.

    features: {layer: (N, d_l)} already reduced features of clean training images (use
    `reduce_features` on tapped activations); labels: (N,) their true labels. `reductions`
    is stored so that `layer_scores` reduces tapped activations the same way.
    """
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if y.ndim != 1 or y.numel() < 2 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be (N >= 2,) in [0, {num_classes}), got shape {tuple(y.shape)}")
    means, precisions, shrink = {}, {}, {}
    for name, a in features.items():
        x = as_float64(a)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features[{name!r}] must be (N={y.shape[0]}, d), got {tuple(x.shape)}")
        counts = torch.bincount(y, minlength=num_classes).double()
        sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
        mu = sums / counts.unsqueeze(1)  # NaN rows for unseen classes: skipped when scoring
        cov = ledoit_wolf(x - mu[y])
        means[name] = mu.numpy()
        precisions[name] = np.linalg.pinv(cov.covariance, hermitian=True)
        shrink[name] = cov.shrinkage
    return MahalanobisDetector(tuple(features), means, precisions, dict(reductions or {}), shrink)


def reduce_features(acts: Mapping[str, torch.Tensor], reductions: Mapping[str, Reduction]) -> dict[str, np.ndarray]:
    """{layer: (B, k_l)} -> {layer: (B, d_l)} float64 numpy, each through its Reduction (default exact)."""
    return {n: reductions.get(n, Reduction()).apply(torch.as_tensor(a).double()).cpu().numpy() for n, a in acts.items()}


def save_mahalanobis(detector: MahalanobisDetector, path: str | Path) -> Path:
    tensors = {}
    for n in detector.layers:
        tensors[f"means/{n}"] = torch.from_numpy(np.ascontiguousarray(detector.means[n]))
        tensors[f"precisions/{n}"] = torch.from_numpy(np.ascontiguousarray(detector.precisions[n]))
    meta = {
        "format": MAHALANOBIS_FORMAT,
        "layers": json.dumps(list(detector.layers)),
        "reductions": json.dumps({n: r.to_json() for n, r in detector.reductions.items()}),
        "shrinkage": json.dumps(dict(detector.shrinkage)),
    }
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_mahalanobis(path: str | Path) -> MahalanobisDetector:
    t, meta = read_checked(path, MAHALANOBIS_FORMAT, "Mahalanobis detector")
    layers = tuple(loads_json(meta["layers"], f"{path}: metadata layers"))
    return MahalanobisDetector(
        layers,
        {n: t[f"means/{n}"].numpy() for n in layers},
        {n: t[f"precisions/{n}"].numpy() for n in layers},
        {n: Reduction(**r) for n, r in loads_json(meta["reductions"], f"{path}: metadata reductions").items()},
        loads_json(meta["shrinkage"], f"{path}: metadata shrinkage"),
    )
