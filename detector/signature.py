"""Per-layer semantic signature (paper section 5.3, the defence the paper proposes).

For an image predicted as label p, at each layer: the fraction of alternative labels a for
which the 1 vs 2 test prefers p over a, i.e.

    corr(i[S], D[p, S]) > corr(i[S], D[a, S]),   S = references other than p and a,

with i (K,) the image's profile (Pearson correlation of its layer representation with the K
reference prototypes) and D (C, K) every label's similarity profile against the same
references. The continuous variant is the mean margin corr(i, D[p]) - corr(i, D[a]).

Vectorisation (no loop over alternatives): leaving out the (at most two) columns pos(p) and
pos(a) from a Pearson correlation only subtracts those columns' terms from the five sums it
is built from. With the K-column sums precomputed once per image (sum i, sum i^2), per label
(sum D[c], sum D[c]^2) and per (image, label) (G = i @ D.T), every (layer, image,
alternative) correlation is O(1) more work: e.g.

    sum_{j in S} i_j D[a, j] = G[a] - i[pos p] D[a, pos p] - i[pos a] D[a, pos a],

where a missing position (label not a reference) points at an appended zero column.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Mapping, NamedTuple

import numpy as np
import torch

from semguard.detector.reference import LabelTerms, ReferenceBank, label_terms
from semguard.detector.rsa import TIE_TOLERANCE, ArrayLike, _pearson_from_moments, as_float64

if TYPE_CHECKING:
    from semguard.detector.native import NativeKernels


class Signature(NamedTuple):
    fraction: np.ndarray  # (B, L) fraction of alternatives for which 1 vs 2 prefers the prediction
    margin: np.ndarray  # (B, L) mean over alternatives of corr(i, d_pred) - corr(i, d_alt)


def alternative_table(num_labels: int, n_alternatives: int | None = None, seed: int = 0,
                      eligible: ArrayLike | None = None) -> np.ndarray:
    """(C, M) alternatives of each label p: all other eligible labels (M = E - 1) or a seeded subset of size M.

    One fixed subset per label, so an image's signature never depends on the rest of its batch.
    eligible: (C,) bool, the labels that can be alternatives (those with a word vector); None: all.
    Rows of ineligible labels hold valid alternatives too but are never used (`semantic_prediction`).
    """
    return _alternatives(num_labels, n_alternatives, seed, _key(eligible)).copy()


def _key(eligible: ArrayLike | None) -> tuple | None:
    """A hashable stand-in for an eligible mask: (shape, bytes)."""
    ok = None if eligible is None else np.asarray(eligible, bool)
    return None if ok is None else (ok.shape, ok.tobytes())


@lru_cache(maxsize=16)
def _alternatives(num_labels: int, n_alternatives: int | None, seed: int, eligible: tuple | None) -> np.ndarray:
    """alternative_table, computed once per bundle: at C = 1000 its argsort cost ~20-100 ms per guarded batch.
    Read-only; `eligible` as `_key` gives it."""
    c = num_labels
    ok = np.ones(c, bool) if eligible is None else np.frombuffer(eligible[1], bool).reshape(eligible[0])
    if ok.shape != (c,) or ok.sum() < 2:
        raise ValueError(f"eligible must be (C={c},) bool with at least 2 labels, got {ok.shape} with {int(ok.sum())}")
    if n_alternatives is not None and n_alternatives < 1:
        raise ValueError(f"n_alternatives must be >= 1 or None (all), got {n_alternatives}")
    m = int(ok.sum()) - 1 if n_alternatives is None else min(n_alternatives, int(ok.sum()) - 1)
    if n_alternatives is None or n_alternatives >= c - 1:
        keys = np.broadcast_to(np.arange(c, dtype=np.float64), (c, c)).copy()  # every eligible label, in order
    else:
        keys = np.random.default_rng(seed).random((c, c))
    keys[:, ~ok] = np.inf
    np.fill_diagonal(keys, np.inf)  # p is never its own alternative
    table = np.sort(np.argsort(keys, axis=1, kind="stable")[:, :m], axis=1)
    table.flags.writeable = False
    return table


def labels_with_vector(word_vectors: ArrayLike) -> np.ndarray:
    """(C, d) label word vectors -> (C,) bool: the row is finite and not all zero (a label with a word vector)."""
    v = np.asarray(word_vectors, dtype=np.float64)
    return np.isfinite(v).all(1) & (v != 0).any(1)


def semantic_prediction(logits: torch.Tensor, eligible: ArrayLike | None = None) -> torch.Tensor:
    """(B, C) logits -> (B,) the label the signature judges: the top label among those with a word vector
    (`eligible`, (C,) bool; None: all, i.e. the argmax). The served prediction stays the argmax."""
    if eligible is None or np.asarray(eligible).all():
        return logits.argmax(1)
    mask = torch.as_tensor(np.asarray(eligible, bool), device=logits.device)
    return logits.detach().masked_fill(~mask, float("-inf")).argmax(1)


def _gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (..., B, N), index (B, M) -> (..., B, M) with out[..., b, m] = x[..., b, index[b, m]]."""
    return x.gather(-1, index.expand(*x.shape[:-2], *index.shape))


def one_vs_two_margins(profiles: torch.Tensor, predicted: torch.Tensor, terms: LabelTerms,
                       alternatives: torch.Tensor) -> torch.Tensor:
    """(L, B, M) margins corr(i[S], D[p, S]) - corr(i[S], D[a, S]), S = the references other than p
    and a; differentiable in `profiles` (attacks.adaptive backpropagates through it).

    profiles (L, B, K) float64, predicted (B,), terms of the label profiles D (C, K) (`label_terms`),
    alternatives (B, M) long; checked by the callers.
    """
    i, p, a = profiles, predicted, alternatives
    k = terms.profiles.shape[1]
    pos, dpad = terms.position, terms.padded
    ipad = torch.cat([i, i.new_zeros(*i.shape[:-1], 1)], -1)  # (L, B, K+1)
    pp, pa = pos[p][:, None], pos[a]  # (B, 1), (B, M)
    n = k - (pp < k).double() - (pa < k).double()  # (B, M) columns left

    i_pp, i_pa = _gather_last(ipad, pp), _gather_last(ipad, pa)  # (L, B, 1), (L, B, M)
    si = i.sum(-1, keepdim=True) - i_pp - i_pa  # (L, B, M)
    sii = (i * i).sum(-1, keepdim=True) - i_pp**2 - i_pa**2
    g = i @ terms.profiles.T  # (L, B, C): i . D[c] over all K columns

    dp_pp, dp_pa = dpad[p[:, None], pp], dpad[p[:, None], pa]  # D[p, pos p] (B, 1), D[p, pos a] (B, M)
    sy = terms.sums[p][:, None] - dp_pp - dp_pa
    syy = terms.squares[p][:, None] - dp_pp**2 - dp_pa**2
    siy = _gather_last(g, p[:, None]) - i_pp * dp_pp - i_pa * dp_pa
    r_pred = _pearson_from_moments(n, si, sii, sy, syy, siy)

    da_pp, da_pa = dpad[a, pp], dpad[a, pa]  # D[a, pos p], D[a, pos a]: (B, M)
    sz = terms.sums[a] - da_pp - da_pa
    szz = terms.squares[a] - da_pp**2 - da_pa**2
    siz = _gather_last(g, a) - i_pp * da_pp - i_pa * da_pa
    return r_pred - _pearson_from_moments(n, si, sii, sz, szz, siz)


def signature_from_profiles(
    profiles: ArrayLike,
    predicted: ArrayLike,
    label_profiles: ArrayLike,
    concepts: ArrayLike,
    alternatives: ArrayLike | None = None,
) -> Signature:
    """Signature from precomputed image profiles (pure array function, float64 throughout).

    profiles: (L, B, K) or (B, K) image-vs-reference correlations. predicted: (B,) label of
    each image. label_profiles: (C, K) D. concepts: (K,) unique label index of each reference.
    alternatives: (B, M) alternative labels per image (none equal to its prediction); default
    all other labels. Returns Signature of (B, L) arrays ((B, 1) for 2-D profiles).
    """
    i = as_float64(profiles)
    i = i.unsqueeze(0) if i.ndim == 2 else i  # (L, B, K)
    d = as_float64(label_profiles, i.device)
    ref = torch.as_tensor(np.asarray(concepts), dtype=torch.long, device=i.device)
    p = torch.as_tensor(np.asarray(predicted), dtype=torch.long, device=i.device)
    c, k = d.shape if d.ndim == 2 else (0, 0)
    _check(i, d, ref, p, c, k)
    alts = alternative_table(c)[p.cpu().numpy()] if alternatives is None else np.asarray(alternatives)
    a = torch.as_tensor(alts, dtype=torch.long, device=i.device)
    bad_shape = a.ndim != 2 or a.shape[0] != p.shape[0] or a.shape[1] < 1
    if bad_shape or (a.numel() and ((a == p[:, None]).any() or a.min() < 0 or a.max() >= c)):
        raise ValueError(f"alternatives must be (B, M>=1) labels in [0, {c}) other than each prediction, got shape {tuple(a.shape)}")
    return _signature(one_vs_two_margins(i, p, label_terms(d, ref), a))


def _signature(margin: torch.Tensor) -> Signature:
    """(L, B, M) margins -> Signature of (B, L) arrays."""
    fraction = (margin > TIE_TOLERANCE).double().mean(-1)  # rsa.one_vs_two's convention: a tie fails
    return Signature(fraction.T.cpu().numpy(), margin.mean(-1).T.cpu().numpy())


def _check(i: torch.Tensor, d: torch.Tensor, ref: torch.Tensor, p: torch.Tensor, c: int, k: int) -> None:
    if i.ndim != 3 or d.ndim != 2 or i.shape[-1] != k:
        raise ValueError(f"profiles must be (L, B, K) or (B, K) and label_profiles (C, K), got {tuple(i.shape)}, {tuple(d.shape)}")
    if k < 4:
        raise ValueError(f"need K >= 4 reference concepts (two may be left out), got K={k}")
    if ref.shape != (k,) or len(torch.unique(ref)) != k or ref.min() < 0 or ref.max() >= c:
        raise ValueError(f"concepts must be K={k} unique label indices in [0, {c})")
    if p.ndim != 1 or p.shape[0] != i.shape[1] or (p.numel() and (p.min() < 0 or p.max() >= c)):
        raise ValueError(f"predicted must be (B={i.shape[1]},) labels in [0, {c}), got shape {tuple(p.shape)}")
    if c < 2:
        raise ValueError(f"need at least 2 labels, got C={c}")
    if not (torch.isfinite(i).all() and torch.isfinite(d).all()):
        raise ValueError("profiles and label_profiles must be finite")


def signature_parts(
    acts: Mapping[str, torch.Tensor] | list,
    predicted: ArrayLike,
    bank: ReferenceBank,
    n_alternatives: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    eligible: ArrayLike | None = None,
    reduced: Mapping[str, torch.Tensor] | None = None,
    kernels: NativeKernels | None = None,
) -> Signature:
    """Fraction and mean-margin signatures (B, L) of tapped activations against a bank.

    acts: {layer: (B, k_l)} (or a list in bank.layers order). predicted: (B,). n_alternatives:
    None for every other label, else a seeded fixed subset per label. dtype: of the profile
    matmul (float32 for serving; the moment algebra is float64 either way). eligible: (C,) bool
    labels with a word vector, the only alternatives (`alternative_table`); None: all. reduced: layers
    already through the bank's reduction (`ReferenceBank.layer_profiles`). kernels: the native margins
    (`detector.native`: the eager float64 operations, equal but for a last bit where torch's sqrt rounds
    otherwise) where no gradient is wanted and the profiles are on the CPU.
    """
    profiles = bank.layer_profiles(acts, dtype=dtype, reduced=reduced)  # (L, B, K)
    p = np.asarray(predicted.cpu() if isinstance(predicted, torch.Tensor) else predicted).astype(np.int64)
    if p.ndim != 1 or p.shape[0] != profiles.shape[1]:
        raise ValueError(f"predicted must be (B={profiles.shape[1]},), got shape {p.shape}")
    if p.size and (p.min() < 0 or p.max() >= bank.num_labels):
        raise ValueError(f"predicted labels must lie in [0, {bank.num_labels})")
    if not bool(torch.isfinite(profiles).all()):
        raise ValueError("profiles must be finite: some tapped activation is NaN or infinite")
    terms = bank.label_terms(profiles.device)  # the bank's D, checked once, when first made
    alts = _alternatives(bank.num_labels, n_alternatives, seed, _key(eligible))[p]  # (B, M), a copy: fancy indexing
    p_t, a = (torch.from_numpy(t).to(profiles.device) for t in (p, alts))
    native = kernels is not None and not torch.is_grad_enabled() and profiles.device.type == "cpu"
    return _signature((kernels.one_vs_two_margins if native else one_vs_two_margins)(profiles.double(), p_t, terms, a))



class Agreement(NamedTuple):
    fraction_mae: np.ndarray  # (L,) mean |fraction_reduced - fraction_exact|
    margin_mae: np.ndarray  # (L,) mean |margin_reduced - margin_exact|
    fraction_corr: np.ndarray  # (L,) Pearson r across images of the two fractions (0 if constant)


def reduction_agreement(
    acts: Mapping[str, torch.Tensor],
    predicted: ArrayLike,
    exact: ReferenceBank,
    reduced: ReferenceBank,
    n_alternatives: int | None = None,
) -> Agreement:
    """How closely a reduced bank's signature follows the exact bank's, per layer.

    acts: the same unreduced {layer: (B, k_l)} for both (the reduced bank reduces them itself).
    """
    if exact.layers != reduced.layers or not np.array_equal(exact.concepts, reduced.concepts):
        raise ValueError("exact and reduced banks must share layers and reference concepts")
    a = signature_parts(acts, predicted, exact, n_alternatives, dtype=torch.float64)
    b = signature_parts(acts, predicted, reduced, n_alternatives, dtype=torch.float64)
    fa, fb = a.fraction - a.fraction.mean(0), b.fraction - b.fraction.mean(0)
    denom = np.sqrt((fa**2).sum(0) * (fb**2).sum(0))
    corr = np.divide((fa * fb).sum(0), denom, out=np.zeros_like(denom), where=denom > 1e-12)
    return Agreement(
        np.abs(a.fraction - b.fraction).mean(0), np.abs(a.margin - b.margin).mean(0), corr
    )
