"""Representational similarity statistics of the paper (Dharmaretnam & Fyshe, ICLR 2019 submission).

Pure array code: numpy arrays or torch tensors in, numpy arrays or floats out.
Every correlation is accumulated in float64.

Convention for degenerate inputs: the Pearson correlation of a vector with zero
variance (a constant row, or a single remaining entry) is defined as 0, so it
carries no evidence either way and a 2 vs 2 comparison built on it is a tie.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

# Two sums that differ by less than this are a tie (counted half): the exact and the
# loop computations round differently, and a tie must not depend on rounding.
TIE_TOLERANCE = 1e-12
# A variance below this fraction of the sum of squares is zero up to rounding.
_ZERO_VARIANCE = 1e-12


def as_float64(x: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """A float64 torch copy (or view) of a numpy array or tensor."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def _pearson_from_moments(n: "int | torch.Tensor", sx, sxx, sy, syy, sxy) -> torch.Tensor:
    """Pearson r from sums over n items; zero variance on either side gives 0."""
    vx = sxx - sx * sx / n
    vy = syy - sy * sy / n
    cov = sxy - sx * sy / n
    degenerate = (vx <= _ZERO_VARIANCE * sxx.abs().clamp_min(1e-300)) | (
        vy <= _ZERO_VARIANCE * syy.abs().clamp_min(1e-300)
    )
    r = cov / torch.sqrt((vx * vy).clamp_min(1e-300))
    return torch.where(degenerate, torch.zeros_like(r), r)


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm; a constant row becomes all zeros."""
    centred = m - m.mean(dim=-1, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=-1, keepdim=True)
    constant = norms <= 1e-12 * torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(1e-300)
    return torch.where(constant, torch.zeros_like(centred), centred / norms.clamp_min(1e-300))


def _correlation_matrix_t(m: torch.Tensor) -> torch.Tensor:
    """(..., n, k) float64 -> (..., n, n) row correlations, constant rows correlating 0."""
    unit = _unit_rows(m)
    c = (unit @ unit.transpose(-1, -2)).clamp(-1.0, 1.0)
    c.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return c


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, k), got shape {tuple(t.shape)}")
    if t.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 columns to correlate rows, got {t.shape[1]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def correlation_matrix(m: ArrayLike) -> np.ndarray:
    """Pearson correlation between every pair of rows (ARCHITECTURE.md, Definitions).

    m: (n, k) with k >= 2. Returns (n, n) float64 with a unit diagonal; a constant row
    correlates 0 with every other row.
    """
    t = as_float64(m)
    _check_rows("m", t)
    return _correlation_matrix_t(t).cpu().numpy()


def cross_correlation(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Pearson correlation of every row of x with every row of y: (n, k), (m, k) -> (n, m).

    Used for 1 vs 2 profiles: an image's representation against reference concepts'.
    A constant row correlates 0.
    """
    a, b = as_float64(x), as_float64(y)
    _check_rows("x", a)
    _check_rows("y", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same number of columns, got {a.shape[1]} and {b.shape[1]}")
    return (_unit_rows(a) @ _unit_rows(b).T).clamp(-1.0, 1.0).cpu().numpy()


def _check_square_pair(c_i: torch.Tensor, c_d: torch.Tensor) -> int:
    if c_i.shape[-2:] != c_d.shape[-2:] or c_i.shape[-1] != c_i.shape[-2]:
        raise ValueError(
            f"C_I and C_D must be square and the same size, got {tuple(c_i.shape)} and {tuple(c_d.shape)}"
        )
    w = c_i.shape[-1]
    if w < 3:
        raise ValueError(f"2 vs 2 needs at least 3 concepts, got w={w}")
    if not (torch.isfinite(c_i).all() and torch.isfinite(c_d).all()):
        raise ValueError("C_I and C_D must be finite")
    return w


def _left_out_correlations(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pair (p, q): Pearson r over the columns other than p and q.

    a, b: (..., w, w). Returns (same, cross), each (..., w, w):
      same[p, q]  = corr(a[p, S], b[p, S]),   cross[p, q] = corr(a[p, S], b[q, S]),  S = all but {p, q}.
    The two left-out columns are rank-one corrections to row sums, sums of squares and
    the cross products a @ b.T, so no loop over pairs is needed.
    """
    w = a.shape[-1]
    n = w - 2
    da = a.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (..., w, 1): a[p, p]
    db = b.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    sa = a.sum(-1, keepdim=True) - da - a  # (..., w, w): sum of a[p, S_pq]
    qa = (a * a).sum(-1, keepdim=True) - da * da - a * a
    sb = b.sum(-1, keepdim=True) - db - b  # sum of b[p, S_pq]
    qb = (b * b).sum(-1, keepdim=True) - db * db - b * b
    x_same = (a * b).sum(-1, keepdim=True) - da * db - a * b
    bt = b.transpose(-1, -2)  # bt[p, q] = b[q, p]
    # sum_j a[p, j] b[q, j] minus the terms j = p and j = q
    x_cross = a @ bt - da * bt - a * db.transpose(-1, -2)
    same = _pearson_from_moments(n, sa, qa, sb, qb, x_same)
    cross = _pearson_from_moments(n, sa, qa, sb.transpose(-1, -2), qb.transpose(-1, -2), x_cross)
    return same, cross


def _pair_outcomes_t(c_i: torch.Tensor, c_d: torch.Tensor) -> torch.Tensor:
    """(..., w, w) float64 outcome per pair: 1 pass, 0.5 tie, 0 fail; symmetric, diagonal 0."""
    same, cross = _left_out_correlations(c_i, c_d)
    right = same + same.transpose(-1, -2)  # corr(I1, D1) + corr(I2, D2)
    wrong = cross + cross.transpose(-1, -2)  # corr(I1, D2) + corr(I2, D1)
    diff = right - wrong
    outcome = torch.where(diff > TIE_TOLERANCE, 1.0, torch.where(diff < -TIE_TOLERANCE, 0.0, 0.5))
    outcome = outcome.to(torch.float64)
    outcome.diagonal(dim1=-2, dim2=-1).zero_()
    return outcome


def _accuracy_from_outcomes(outcome: torch.Tensor) -> torch.Tensor:
    w = outcome.shape[-1]
    return outcome.sum(dim=(-1, -2)) / (w * (w - 1))  # each pair counted twice


def two_vs_two_pairs(c_i: ArrayLike, c_d: ArrayLike) -> np.ndarray:
    """Outcome of the 2 vs 2 test for every concept pair (paper section 3.3).

    c_i: (w, w) image-side correlation matrix, c_d: (w, w) word-side correlation matrix.
    Returns (w, w) float64, symmetric: 1 where the pair passes, 0.5 on a tie, 0 where it
    fails; the diagonal is 0 and is not a pair.
    """
    a, b = as_float64(c_i), as_float64(c_d)
    _check_square_pair(a, b)
    return _pair_outcomes_t(a, b).cpu().numpy()


def two_vs_two_per_concept(c_i: ArrayLike, c_d: ArrayLike) -> np.ndarray:
    """(w,) mean 2 vs 2 outcome of each concept over its w - 1 pairs."""
    outcome = two_vs_two_pairs(c_i, c_d)
    w = outcome.shape[0]
    return outcome.sum(axis=1) / (w - 1)


def two_vs_two(c_i: ArrayLike, c_d: ArrayLike) -> float:
    """2 vs 2 accuracy (paper section 3.3): mean outcome over all w (w - 1) / 2 pairs.

    For concepts c1, c2, rows c1 and c2 of C_I and C_D with columns c1 and c2 left out;
    the pair passes when corr(I1, D1) + corr(I2, D2) > corr(I1, D2) + corr(I2, D1), a tie
    counts half. c_i, c_d: (w, w), w >= 3. Chance is 0.5.
    """
    a, b = as_float64(c_i), as_float64(c_d)
    _check_square_pair(a, b)
    return float(_accuracy_from_outcomes(_pair_outcomes_t(a, b)))


def _rowwise_correlation(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K), (..., K) -> (...,) Pearson r per row over the kept columns, 0 where either side is constant."""
    if keep is None:
        keep = torch.ones_like(x)
    x, y = x * keep, y * keep
    return _pearson_from_moments(
        keep.sum(-1), x.sum(-1), (x * x).sum(-1), y.sum(-1), (y * y).sum(-1), (x * y).sum(-1)
    )


def one_vs_two_margin(
    profiles: ArrayLike, d_true: ArrayLike, d_pred: ArrayLike, keep: ArrayLike | None = None
) -> np.ndarray:
    """corr(i, d_true) - corr(i, d_pred) per item (paper section 4).

    profiles: (n, K) correlations of each image's layer representation with K reference
    concepts. d_true, d_pred: (n, K) or (K,) correlations of the true and the predicted
    label's word vectors with the same K references. keep: optional (n, K) bool, the
    reference columns each item uses (the caller drops references equal to either label).
    Returns (n,) float64.
    """
    i = as_float64(profiles)
    if i.ndim != 2:
        raise ValueError(f"profiles must be (n, K), got shape {tuple(i.shape)}")
    t, p = as_float64(d_true), as_float64(d_pred)
    for name, d in (("d_true", t), ("d_pred", p)):
        if d.shape not in (i.shape, i.shape[1:]):
            raise ValueError(f"{name} must be (n, K) or (K,) matching profiles {tuple(i.shape)}, got {tuple(d.shape)}")
    t, p = t.expand_as(i), p.expand_as(i)
    mask = None
    if keep is not None:
        mask = as_float64(keep)
        if mask.shape != i.shape:
            raise ValueError(f"keep must be (n, K) = {tuple(i.shape)}, got {tuple(mask.shape)}")
    if (i.shape[1] if mask is None else int(mask.sum(1).min())) < 2:
        raise ValueError("each item needs at least 2 reference concepts (K >= 2 after leaving labels out)")
    if not (torch.isfinite(i).all() and torch.isfinite(t).all() and torch.isfinite(p).all()):
        raise ValueError("profiles, d_true and d_pred must be finite")
    return (_rowwise_correlation(i, t, mask) - _rowwise_correlation(i, p, mask)).cpu().numpy()


def one_vs_two(
    profiles: ArrayLike, d_true: ArrayLike, d_pred: ArrayLike, keep: ArrayLike | None = None
) -> np.ndarray:
    """1 vs 2 test per item (paper section 4): passes when corr(i, d_true) > corr(i, d_pred).

    Shapes as in `one_vs_two_margin`. Returns (n,) bool.
    """
    return one_vs_two_margin(profiles, d_true, d_pred, keep) > TIE_TOLERANCE
