"""Permutation tests and false-discovery control for the 2 vs 2 and 1 vs 2 accuracies.

p-values carry the +1 correction (Phipson & Smyth 2010): p = (1 + #{null >= observed}) /
(1 + n_permutations), so a p-value is never 0. Across layers the paper controls the false
discovery rate with Benjamini-Hochberg-Yekutieli.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import scipy.stats
import torch

from semguard.detector.rsa import ArrayLike, TIE_TOLERANCE, _accuracy_from_outcomes, _check_square_pair, _pair_outcomes_t, as_float64

Alternative = Literal["greater", "less", "two-sided"]


# The 2 vs 2 kernel holds about this many (w, w) float64 temporaries per matrix evaluated.
_TEMPORARIES = 24
_WORK_SPACE_BYTES = 32 * 2**20  # bigger batches fall out of cache and run slower


class PermutationResult(NamedTuple):
    accuracy: float  # observed statistic
    p_value: float  # with the +1 correction
    null: np.ndarray  # (n_permutations,) statistic under each permutation


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _p_value(observed: float, null: np.ndarray, alternative: Alternative, chance: float) -> float:
    if alternative == "greater":
        extreme = null >= observed - TIE_TOLERANCE
    elif alternative == "less":
        extreme = null <= observed + TIE_TOLERANCE
    elif alternative == "two-sided":
        extreme = np.abs(null - chance) >= abs(observed - chance) - TIE_TOLERANCE
    else:
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    return float((1 + extreme.sum()) / (1 + null.size))


def _check_permutations(n_permutations: int, batch_size: int) -> None:
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def permutation_test_two_vs_two(
    c_i: ArrayLike,
    c_d: ArrayLike,
    n_permutations: int = 1000,
    seed: int = 0,
    alternative: Alternative = "greater",
    batch_size: int | None = None,  # (permutation, image set) matrices at once; None: ~32 MB of work space
    device: torch.device | str | None = None,
) -> PermutationResult:
    """Permutation test of a 2 vs 2 accuracy, averaged over image sets (paper 3.3 and 3.5).

    c_i: (w, w) or (S, w, w) image-side correlation matrices, one per image set; the statistic
    is their mean 2 vs 2 accuracy. c_d: (w, w) word-side correlation matrix. Each permutation
    relabels the concepts of the word side (rows and columns of C_D together), the same
    relabelling for every image set, as the authors' code permutes word-vector rows.
    """
    dev = torch.device(device) if device is not None else default_device()
    a = as_float64(c_i, dev)
    a = a.unsqueeze(0) if a.ndim == 2 else a
    b = as_float64(c_d, dev)
    if a.ndim != 3 or b.ndim != 2:
        raise ValueError(f"c_i must be (w, w) or (S, w, w) and c_d (w, w), got {tuple(a.shape)}, {tuple(b.shape)}")
    w = _check_square_pair(a, b)
    if batch_size is None:
        batch_size = max(1, _WORK_SPACE_BYTES // (_TEMPORARIES * 8 * w * w))
    _check_permutations(n_permutations, batch_size)
    observed = float(_accuracy_from_outcomes(_pair_outcomes_t(a, b.expand_as(a))).mean())
    generator = torch.Generator().manual_seed(seed)
    null = np.empty(n_permutations)
    per_batch = max(1, batch_size // a.shape[0])  # bounds memory: per_batch * S matrices of (w, w)
    for start in range(0, n_permutations, per_batch):
        stop = min(start + per_batch, n_permutations)
        perms = torch.stack([torch.randperm(w, generator=generator) for _ in range(stop - start)]).to(dev)
        permuted = b[perms.unsqueeze(-1), perms.unsqueeze(-2)]  # (P, w, w): b[perm][:, perm]
        outcomes = _pair_outcomes_t(a.unsqueeze(0), permuted.unsqueeze(1))  # (P, S, w, w)
        null[start:stop] = _accuracy_from_outcomes(outcomes).mean(dim=1).cpu().numpy()
    return PermutationResult(observed, _p_value(observed, null, alternative, 0.5), null)


def permutation_test_one_vs_two(
    margins: ArrayLike,
    n_permutations: int = 1000,
    seed: int = 0,
    alternative: Alternative = "two-sided",
) -> PermutationResult:
    """Permutation test of a 1 vs 2 accuracy by swapping true and predicted labels per item.

    margins: (n,) corr(i, d_true) - corr(i, d_pred) from `rsa.one_vs_two_margin`. Under the
    null the two labels are exchangeable, so each permutation flips the sign of each margin
    with probability 1/2. Statistic: fraction of items with a positive margin (chance 0.5).
    The default is two-sided because adversarial images pass below chance in late layers.
    """
    _check_permutations(n_permutations, 1)
    m = as_float64(margins, "cpu")
    if m.ndim != 1 or m.numel() == 0:
        raise ValueError(f"margins must be a non-empty 1-D array, got shape {tuple(m.shape)}")
    observed = float((m > TIE_TOLERANCE).double().mean())
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_permutations, m.numel()), generator=generator, dtype=torch.float64) * 2 - 1
    null = ((signs * m) > TIE_TOLERANCE).double().mean(dim=1).numpy()
    return PermutationResult(observed, _p_value(observed, null, alternative, 0.5), null)


def bhy(p_values: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg-Yekutieli adjusted p-values across layers: (L,) -> (L,)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"p_values must be a non-empty 1-D array, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p_values must lie in [0, 1]")
    return scipy.stats.false_discovery_control(p, method="by")
