"""The guard's feature and score computation as it was before issue 24's speed work (commit 0be8ea3),
its arithmetic kept op for op (per-layer Python loops, float64 Mahalanobis one layer at a time, the
16 MB-chunked sketch; caches dropped: signs and row statistics are recomputed per call) as a slow
reference: `frozen_verdicts(guard, images)` must give what `Guard.inspect_arrays` gives.

Only the computation is frozen; the bundle's parts (bank, detector, flagger parameters, alternative
table, the projection matrix generator) are read from the guard, so a bundle written by any version
is scored the old way.
"""
from typing import NamedTuple

import numpy as np
import torch

from semguard.detector.flagger import tail_surprise
from semguard.detector.guard import Guard
from semguard.detector.reference import Reduction, ReferenceBank, _sparse_projection
from semguard.detector.signature import alternative_table

TIE_TOLERANCE = 1e-12
_ZERO_VARIANCE = 1e-12
FLOAT32_CONSTANT_ROW = 1e-6


class FrozenVerdicts(NamedTuple):
    fraction: np.ndarray  # (B, L)
    margin: np.ndarray  # (B, L)
    features: np.ndarray  # (B, F)
    score: np.ndarray  # (B,)
    flagged: np.ndarray  # (B,) bool


# ----------------------------------------------------------------------------- reductions


def _fold(x: torch.Tensor, dim: int) -> torch.Tensor:
    b, k = x.shape
    q, r = divmod(k, dim)
    out = x[:, : q * dim].reshape(b, q, dim).sum(1) if q else x.new_zeros(b, dim)
    if r:
        out[:, :r] += x[:, q * dim :]
    return out


def _count_sketch(acts: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    b, k = acts.shape
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(dtype=acts.dtype)
    folded = _fold(signs[None], dim)
    rows = max(1, (1 << 22) // max(k, 1))
    sketched = torch.cat([_fold(acts[i : i + rows] * signs, dim) for i in range(0, b, rows)])
    return sketched - acts.mean(1, keepdim=True) * folded


def _apply(r: Reduction, acts: torch.Tensor) -> torch.Tensor:
    if r.kind == "exact":
        return acts
    b, k = acts.shape
    if r.kind == "channel_pool":
        return acts.reshape(b, r.channels, k // r.channels).mean(-1)
    if r.kind == "sketch":
        return _count_sketch(acts, r.dim, r.seed)
    centred = acts - acts.mean(-1, keepdim=True)
    p = _sparse_projection(k, r.dim, r.seed).to(dtype=acts.dtype)
    return (p @ centred.T).T


# ----------------------------------------------------------------------------- profiles and signature


def _serving_profiles(bank: ReferenceBank, name: str, x: torch.Tensor) -> torch.Tensor:
    p = torch.from_numpy(bank.prototypes[name]).double()
    mean_p = p.mean(-1)
    norm_p = torch.linalg.vector_norm(p - mean_p[:, None], dim=-1)
    constant_p = norm_p <= 1e-12 * torch.linalg.vector_norm(p, dim=-1).clamp_min(1e-300)
    inv_p = torch.where(constant_p, 0.0, 1.0 / norm_p.clamp_min(1e-300))
    centred = x - x.mean(1, keepdim=True)
    norm = torch.linalg.vector_norm(centred, dim=1, keepdim=True).double()
    constant = norm <= FLOAT32_CONSTANT_ROW * torch.linalg.vector_norm(x, dim=1, keepdim=True).double().clamp_min(1e-300)
    inv_x = torch.where(constant, 0.0, 1.0 / norm.clamp_min(1e-300))
    proto = torch.from_numpy(bank.prototypes[name])
    dots = (centred @ proto.T).double() - centred.sum(1, keepdim=True).double() * mean_p
    return (dots * inv_x * inv_p).float()


def _layer_profiles(bank: ReferenceBank, acts: dict) -> torch.Tensor:
    out = [_serving_profiles(bank, n, _apply(bank.reduction(n), acts[n].float())) for n in bank.layers]
    return torch.stack(out).clamp(-1.0, 1.0)  # (L, B, K)


def _pearson_from_moments(n, sx, sxx, sy, syy, sxy) -> torch.Tensor:
    vx = sxx - sx * sx / n
    vy = syy - sy * sy / n
    cov = sxy - sx * sy / n
    degenerate = (vx <= _ZERO_VARIANCE * sxx.abs().clamp_min(1e-300)) | (vy <= _ZERO_VARIANCE * syy.abs().clamp_min(1e-300))
    r = cov / torch.sqrt((vx * vy).clamp_min(1e-300))
    return torch.where(degenerate, torch.zeros_like(r), r)


def _gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, index.expand(*x.shape[:-2], *index.shape))


def _one_vs_two_margins(i, p, d, concepts, a) -> torch.Tensor:
    c, k = d.shape
    pos = torch.full((c,), k, dtype=torch.long)
    pos[concepts] = torch.arange(k)
    ipad = torch.cat([i, i.new_zeros(*i.shape[:-1], 1)], -1)
    dpad = torch.cat([d, d.new_zeros(c, 1)], -1)
    pp, pa = pos[p][:, None], pos[a]
    n = k - (pp < k).double() - (pa < k).double()
    i_pp, i_pa = _gather_last(ipad, pp), _gather_last(ipad, pa)
    si = i.sum(-1, keepdim=True) - i_pp - i_pa
    sii = (i * i).sum(-1, keepdim=True) - i_pp**2 - i_pa**2
    g = i @ d.T
    dp_pp, dp_pa = dpad[p[:, None], pp], dpad[p[:, None], pa]
    sy = d.sum(1)[p][:, None] - dp_pp - dp_pa
    syy = (d * d).sum(1)[p][:, None] - dp_pp**2 - dp_pa**2
    siy = _gather_last(g, p[:, None]) - i_pp * dp_pp - i_pa * dp_pa
    r_pred = _pearson_from_moments(n, si, sii, sy, syy, siy)
    da_pp, da_pa = dpad[a, pp], dpad[a, pa]
    sz = d.sum(1)[a] - da_pp - da_pa
    szz = (d * d).sum(1)[a] - da_pp**2 - da_pa**2
    siz = _gather_last(g, a) - i_pp * da_pp - i_pa * da_pa
    return r_pred - _pearson_from_moments(n, si, sii, sz, szz, siz)


# ----------------------------------------------------------------------------- density and flagger


def _mahalanobis_scores(detector, acts: dict) -> np.ndarray:
    out = []
    for name in detector.layers:
        f = _apply(detector.reduction(name), acts[name].double())
        mu = torch.from_numpy(detector.means[name])
        prec = torch.from_numpy(detector.precisions[name])
        seen = torch.isfinite(mu).all(1)
        mu = mu if bool(seen.all()) else mu[seen]
        mpm = ((mu @ prec) * mu).sum(1)
        fp = f @ prec
        dist = (fp * f).sum(1, keepdim=True) - 2 * fp @ mu.T + mpm
        out.append(dist.min(1).values)
    return torch.stack(out, 1).numpy()


def _flagger_score(fl, x: np.ndarray) -> np.ndarray:
    z = (x - fl.center) / fl.scale
    if fl.method == "gaussian":
        d = z - fl.params["mean"]
        return np.einsum("bi,ij,bj->b", d, fl.params["precision"], d)
    if fl.method == "logistic":
        return z @ fl.params["weights"] + float(fl.params["bias"])
    logits = z @ np.atleast_2d(fl.params["weights"]).T + fl.params["bias"]
    tails = np.atleast_2d(fl.params["tail_scores"])
    surprise = [tail_surprise(logits[:, e], tails[e], float(np.atleast_1d(fl.params["tail_scale"])[e]))
                for e in range(len(tails))]
    return np.max(surprise, axis=0)


@torch.no_grad()
def frozen_verdicts(guard: Guard, images: torch.Tensor) -> FrozenVerdicts:
    """The pre-issue-24 computation of a guard's verdict arrays on (B, C, H, W) images (CPU)."""
    recipe, fl = guard.recipe, guard.bundle.flagger
    out = guard.tap(images)
    p = recipe.signature_labels(out.logits)
    bank = recipe.bank
    i = _layer_profiles(bank, out.acts).double()
    alts = torch.as_tensor(alternative_table(bank.num_labels, recipe.n_alternatives, recipe.seed, recipe.eligible)[p.numpy()])
    margin = _one_vs_two_margins(i, p, torch.from_numpy(bank.label_profiles).double(),
                                 torch.as_tensor(bank.concepts, dtype=torch.long), alts)
    fraction = (margin > TIE_TOLERANCE).double().mean(-1).T.numpy()
    mean_margin = margin.mean(-1).T.numpy()
    blocks = {"fraction": fraction, "margin": mean_margin}
    if "mahalanobis" in recipe.kinds:
        blocks["mahalanobis"] = _mahalanobis_scores(recipe.mahalanobis, out.acts)
    features = np.concatenate([blocks[k] for k in recipe.kinds], axis=1)
    score = _flagger_score(fl, features)
    return FrozenVerdicts(fraction, mean_margin, features, score, score > fl.threshold)
