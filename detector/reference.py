"""Reference bank for 1 vs 2 signatures (paper section 4 and 5.3).

Per tapped layer: the representations of K reference concepts (the mean of a few correctly
classified images each), plus, shared by all layers, every label's similarity profile
against the same K references, `label_profiles` (C, K): row c is `d_c`, the correlation of
label c with each reference concept in the chosen similarity space.

Similarity spaces (pluggable, all reduce to a (C, C) label-similarity matrix):
  "words"           correlation of the labels' word vectors (the paper's method, default);
  "class_similarity" correlation of class-mean activations at the model's penultimate layer;
  "shuffled_words"  word vectors with their rows permuted (a seeded control: what do the
                    words themselves contribute?).

Very large layers can be stored reduced (`Reduction`): channel-pooled (spatial mean per
channel), a seeded very sparse random projection (Li, Hastie & Church 2006), or a seeded count
sketch (feature hashing: each coordinate, sign-flipped, added into one of `dim` buckets;
Weinberger et al. 2009, Charikar et al. 2002; the buckets here are fixed, i mod dim, and only the
signs are random). Projection and sketch keep inner products of centred vectors exact in
expectation over the seed; the sketch's variance depends on how the layout lines up with dim,
hence a prime dim. It costs one pass over the activations (resnet50, 49 layers, batch 32: ~0.15 s
on one core) and keeps k signs in memory, regenerated from the seed (bundles store the seed). Reductions are linear, so the
prototype of reduced activations is the reduced prototype. `detector.signature.reduction_agreement` measures how
far a reduced bank's signature is from the exact one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal, Mapping, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from semguard.detector.rsa import ArrayLike, _correlation_matrix_t, _unit_rows, as_float64
from semguard.files import check_safetensors, loads_json

SpaceName = Literal["words", "class_similarity", "shuffled_words"]
SPACES = ("words", "class_similarity", "shuffled_words")
REDUCTIONS = ("exact", "channel_pool", "projection", "sketch")
BANK_FORMAT = "semguard.reference/1"


@dataclass(frozen=True)
class Reduction:
    """How a layer's flattened activations (B, k) are reduced before correlating.

    kind: "exact" (identity), "channel_pool" (acts were a (channels, H, W) map flattened
    channel-major, as torch.flatten(1) does: mean over H*W per channel), "projection" (x
    centred, then a seeded very sparse random projection to `dim` coordinates) or "sketch" (x
    centred, then coordinate i times a seeded sign s_i added into bucket i mod dim).
    """

    kind: str = "exact"
    channels: int = 0  # channel_pool: number of channels of the (channels, H, W) map
    dim: int = 0  # projection, sketch: output dimension
    seed: int = 0  # projection, sketch: the matrix / signs are regenerated from (k, dim, seed), never stored

    def __post_init__(self) -> None:
        if self.kind not in REDUCTIONS:
            raise ValueError(f"reduction kind must be one of {REDUCTIONS}, got {self.kind!r}")
        if self.kind == "channel_pool" and self.channels < 1:
            raise ValueError(f"channel_pool needs channels >= 1, got {self.channels}")
        if self.kind in ("projection", "sketch") and self.dim < 2:
            raise ValueError(f"{self.kind} needs dim >= 2, got {self.dim}")

    def output_dim(self, k: int) -> int:
        return {"exact": k, "channel_pool": self.channels, "projection": self.dim, "sketch": self.dim}[self.kind]

    def apply(self, acts: torch.Tensor) -> torch.Tensor:
        """acts: (B, k) -> (B, output_dim(k)), same dtype."""
        if self.kind == "exact":
            return acts
        b, k = acts.shape
        if self.kind == "channel_pool":
            if k % self.channels:
                raise ValueError(f"channel_pool: {k} features do not split into {self.channels} channels")
            return acts.reshape(b, self.channels, k // self.channels).mean(-1)  # (B, channels)
        if self.kind == "sketch":
            return count_sketch(acts, self.dim, self.seed)
        centred = acts - acts.mean(-1, keepdim=True)  # Pearson centres: project the centred vector
        p = _sparse_projection(k, self.dim, self.seed).to(device=acts.device, dtype=acts.dtype)
        return (p @ centred.T).T  # (B, dim)

    def to_json(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "dim": self.dim, "seed": self.seed}


@lru_cache(maxsize=16)
def _sparse_projection(k: int, dim: int, seed: int) -> torch.Tensor:
    """(dim, k) very sparse random projection, E[(Px).(Py)] = x.y.

    Li, Hastie & Church (2006): entries +-sqrt(s / dim) with probability 1/s, s = sqrt(k);
    here each row gets exactly round(k / s) non-zeros (positions drawn with replacement), which
    keeps the expectation and makes the cost predictable.
    """
    s = max(1.0, float(np.sqrt(k)))
    nnz = max(1, int(round(k / s)))
    g = torch.Generator().manual_seed(seed)
    cols = torch.randint(0, k, (dim, nnz), generator=g)
    signs = torch.randint(0, 2, (dim, nnz), generator=g, dtype=torch.float32) * 2 - 1
    rows = torch.arange(dim).unsqueeze(1).expand(dim, nnz)
    values = signs * float(np.sqrt(s / dim))
    index = torch.stack([rows.reshape(-1), cols.reshape(-1)])
    return torch.sparse_coo_tensor(index, values.reshape(-1), (dim, k), check_invariants=True).coalesce()


def _fold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, k) -> (B, dim): out[:, j] = sum of x[:, i] over i = j (mod dim). Views, no copy of x."""
    b, k = x.shape
    q, r = divmod(k, dim)
    out = x[:, : q * dim].reshape(b, q, dim).sum(1) if q else x.new_zeros(b, dim)
    if r:
        out[:, :r] += x[:, q * dim :]
    return out


@lru_cache(maxsize=256)
def sketch_signs(k: int, dim: int, seed: int, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """(k,) seeded +-1 signs and (1, dim) their fold (the sketch of the all-ones vector), on `device`."""
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same signs on every device
    signs = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).to(dtype=dtype, device=device)
    return signs, _fold(signs[None], dim)


def count_sketch(acts: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """acts (B, k) -> (B, dim) count sketch of each centred row; E[<S x, S y>] = <x - mean x, y - mean y>.

    S(x - mean x) = fold(signs * x) - mean(x) fold(signs). The signed rows go through one reused
    buffer of about 1 MiB (one row when a row is larger), so the signed copy stays in cache: a
    whole batch's copy made the sketch 3x slower (fresh pages), 16 MB chunks still left it at ~40%
    of the fast-mode signature stage. Rows are folded one chunk at a time, each row alone, so the
    result is the same, bit for bit, however the rows are chunked.
    """
    b, k = acts.shape
    signs, folded = sketch_signs(k, dim, seed, acts.dtype, acts.device)
    out, means = acts.new_empty(b, dim), acts.new_empty(b, 1)
    rows = max(1, _SKETCH_BUFFER_ELEMENTS // max(k, 1))
    signed = acts.new_empty(min(rows, b), k)
    for i in range(0, b, rows):  # one pass over the activations: each chunk is signed, folded and averaged while cached
        n = min(rows, b - i)
        out[i : i + n] = _fold(torch.mul(acts[i : i + n], signs, out=signed[:n]), dim)
        means[i : i + n] = acts[i : i + n].mean(1, keepdim=True)
    return out - means * folded


_SKETCH_BUFFER_ELEMENTS = 1 << 18  # float32 signed rows per step: 1 MiB


# ----------------------------------------------------------------------------- similarity spaces


def word_similarity(vectors: ArrayLike) -> np.ndarray:
    """(C, d) label word vectors -> (C, C) Pearson correlation (the paper's C_D)."""
    v = as_float64(vectors)
    if v.ndim != 2 or v.shape[0] < 3 or v.shape[1] < 2:
        raise ValueError(f"vectors must be (C, d) with C >= 3 and d >= 2, got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError("vectors contain NaN or infinite values")
    return _correlation_matrix_t(v).numpy()


def shuffled_word_similarity(vectors: ArrayLike, seed: int = 0) -> np.ndarray:
    """Control space: the word vectors' rows permuted (seeded) before correlating."""
    v = np.asarray(vectors)
    perm = np.random.default_rng(seed).permutation(len(v))
    return word_similarity(v[perm])


def class_similarity(class_means: ArrayLike) -> np.ndarray:
    """(C, k) class-mean activations at the penultimate layer -> (C, C) correlation."""
    return word_similarity(class_means)


# ----------------------------------------------------------------------------- selection


class ReferenceSelection(NamedTuple):
    concepts: np.ndarray  # (K,) int64 label index of each reference concept, sorted
    images: list[np.ndarray]  # K arrays of image indices (correctly classified, <= per_concept each)


def select_references(
    labels: ArrayLike, predicted: ArrayLike, k: int = 100, per_concept: int = 5, seed: int = 0,
    eligible: ArrayLike | None = None,
) -> ReferenceSelection:
    """Pick K reference concepts among those with a correctly classified image.

    labels, predicted: (N,) ints. Takes all eligible concepts when fewer than k, else a
    seeded random subset; each concept keeps up to `per_concept` of its correct images
    (seeded choice), whose mean activation will be its prototype. eligible: (C,) bool, the
    concepts that may be references (those with a word vector); None: all.
    """
    y, p = np.asarray(labels).astype(np.int64), np.asarray(predicted).astype(np.int64)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels and predicted must be equal-length 1-D arrays, got {y.shape} and {p.shape}")
    if k < 2 or per_concept < 1:
        raise ValueError(f"k must be >= 2 and per_concept >= 1, got k={k}, per_concept={per_concept}")
    rng = np.random.default_rng(seed)
    correct = np.flatnonzero(y == p)
    allowed = eligible
    eligible = np.unique(y[correct])
    if allowed is not None:
        eligible = eligible[np.asarray(allowed, bool)[eligible]]
    if len(eligible) < 2:
        raise ValueError(f"need correctly classified images of at least 2 concepts, got {len(eligible)}")
    concepts = eligible if len(eligible) <= k else np.sort(rng.choice(eligible, size=k, replace=False))
    images = []
    for c in concepts:
        idx = correct[y[correct] == c]
        images.append(np.sort(rng.choice(idx, size=min(per_concept, len(idx)), replace=False)))
    return ReferenceSelection(concepts.astype(np.int64), images)


# ----------------------------------------------------------------------------- the bank


class LabelTerms(NamedTuple):
    """What the 1 vs 2 algebra reads of the label profiles D (C, K), computed once (`label_terms`)."""

    profiles: torch.Tensor  # (C, K) float64 D
    padded: torch.Tensor  # (C, K+1) D with a zero column appended ("not a reference")
    sums: torch.Tensor  # (C,) sum_j D[c, j]
    squares: torch.Tensor  # (C,) sum_j D[c, j]^2
    position: torch.Tensor  # (C,) long: each label's column among the references, K when it is not one


def label_terms(label_profiles: ArrayLike, concepts: ArrayLike, device: torch.device | str | None = None) -> LabelTerms:
    """label_profiles (C, K), concepts (K,) the label of each reference -> LabelTerms, unchecked (`ReferenceBank.label_terms` and
    `signature.signature_from_profiles` check what they pass)."""
    d = as_float64(label_profiles, device)
    ref = torch.as_tensor(np.asarray(concepts), dtype=torch.long, device=d.device)
    c, k = d.shape
    pos = torch.full((c,), k, dtype=torch.long, device=d.device)
    pos[ref] = torch.arange(k, device=d.device)
    return LabelTerms(d, torch.cat([d, d.new_zeros(c, 1)], -1), d.sum(1), (d * d).sum(1), pos)


class _RowStats(NamedTuple):
    mean: torch.Tensor  # (K,) float64 mean of each prototype row
    inv_norm: torch.Tensor  # (K,) float64 1 / |row - mean|, 0 for a constant row


@dataclass(frozen=True)
class ReferenceBank:
    """Per-layer reference prototypes and label profiles (see module docstring).

    layers: tapped layer names, in order. prototypes[layer]: (K, k'_l) float32, k'_l the
    layer's width after its reduction. concepts: (K,) label index of each reference (unique).
    label_profiles: (C, K) float64, similarity of every label with each reference.
    """

    layers: tuple[str, ...]
    prototypes: Mapping[str, np.ndarray]
    concepts: np.ndarray
    label_profiles: np.ndarray
    space: str = "words"
    reductions: Mapping[str, Reduction] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.concepts)
        c = self.label_profiles.shape[0] if self.label_profiles.ndim == 2 else -1
        if self.label_profiles.shape != (c, k) or c < 2:
            raise ValueError(f"label_profiles must be (C, K={k}), got {self.label_profiles.shape}")
        if len(np.unique(self.concepts)) != k or k < 2 or self.concepts.min() < 0 or self.concepts.max() >= c:
            raise ValueError(f"concepts must be >= 2 unique label indices in [0, {c}), got {self.concepts}")
        if set(self.prototypes) != set(self.layers):
            raise ValueError(f"prototypes must have exactly the layers {list(self.layers)}, got {list(self.prototypes)}")
        for name in self.layers:
            if self.prototypes[name].ndim != 2 or self.prototypes[name].shape[0] != k:
                raise ValueError(f"prototypes[{name!r}] must be (K={k}, k_l), got {self.prototypes[name].shape}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        unknown = set(self.reductions) - set(self.layers)
        if unknown:
            raise ValueError(f"reductions name layers not in the bank: {sorted(unknown)}")

    @property
    def num_labels(self) -> int:
        return self.label_profiles.shape[0]

    def reduction(self, layer: str) -> Reduction:
        return self.reductions.get(layer, Reduction())

    @cached_property
    def _row_stats(self) -> dict[str, _RowStats]:
        """Per layer, each prototype's mean and 1 / centred norm (K,) float64, computed once.

        The serving path folds the unit normalisation into the matmul instead of caching
        unit-norm prototypes: an exact resnet50 bank is 3.7 GB, and a normalised copy doubled it.
        """
        out = {}
        for name in self.layers:
            p = as_float64(self.prototypes[name])  # (K, k) float64 temporary, one layer at a time
            mean = p.mean(-1)
            norm = torch.linalg.vector_norm(p - mean[:, None], dim=-1)
            # _unit_rows' rule: a constant row has a zero profile
            constant = norm <= 1e-12 * torch.linalg.vector_norm(p, dim=-1).clamp_min(1e-300)
            out[name] = _RowStats(mean, torch.where(constant, 0.0, 1.0 / norm.clamp_min(1e-300)))
        return out

    def _serving_constants(self, device: torch.device) -> _ServingConstants:
        """The prototypes as tensors on `device` (CPU: views of the stored arrays, no copy) and the row
        statistics stacked over layers; made once per device."""
        cache = self.__dict__.setdefault("_serving_cache", {})
        if device not in cache:
            stats = self._row_stats
            cache[device] = _ServingConstants(
                [torch.as_tensor(self.prototypes[n]).to(device=device, dtype=torch.float32) for n in self.layers],
                torch.stack([stats[n].mean for n in self.layers])[:, None].to(device),  # (L, 1, K)
                torch.stack([stats[n].inv_norm for n in self.layers])[:, None].to(device),
            )
        return cache[device]

    def label_terms(self, device: torch.device | str = "cpu") -> LabelTerms:
        """The signature's per-label constants on `device`, made (and checked) once per device."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_label_terms", {})
        if device not in cache:
            if len(self.concepts) < 4:
                raise ValueError(f"need K >= 4 reference concepts (two may be left out), got K={len(self.concepts)}")
            if not np.isfinite(self.label_profiles).all():
                raise ValueError("profiles and label_profiles must be finite")
            cache[device] = label_terms(self.label_profiles, self.concepts, device)
        return cache[device]

    def bytes_per_layer(self) -> dict[str, int]:
        """Bytes of the stored prototypes per layer (the shared (C, K) profiles not included)."""
        return {n: int(self.prototypes[n].nbytes) for n in self.layers}

    def layer_profiles(self, acts: Mapping[str, torch.Tensor] | list, dtype: torch.dtype = torch.float32,
                       reduced: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """acts: {layer: (B, k_l)} (or a list in bank layer order) -> (L, B, K) Pearson profiles.

        reduced: {layer: (B, k'_l)} layers already through their reduction (the guard's native pass),
        taken as given; the other layers are reduced here.
        """
        given = reduced or {}
        acts = _acts_by_layer(acts, self.layers)
        reduced = []
        for name in self.layers:
            x = given.get(name)
            x = self.reduction(name).apply(torch.as_tensor(acts[name]).to(dtype)) if x is None else x.to(dtype)
            if x.ndim != 2 or x.shape[1] != self.prototypes[name].shape[1]:
                raise ValueError(
                    f"acts[{name!r}] must be (B, {self.prototypes[name].shape[1]}) after {self.reduction(name).kind}, "
                    f"got {tuple(x.shape)}"
                )
            reduced.append(x)
        if dtype == torch.float64:  # on request (tests, exact comparisons): both sides normalised in float64
            return torch.stack([_unit_rows(x.double()) @ _unit_rows(as_float64(self.prototypes[n], x.device)).T
                                for n, x in zip(self.layers, reduced)]).clamp(-1.0, 1.0)
        return self._serving_profiles(reduced).clamp(-1.0, 1.0)  # (L, B, K)

    def _serving_profiles(self, reduced: list[torch.Tensor]) -> torch.Tensor:
        """Per layer x (B, k_l) float32 -> (L, B, K) Pearson profiles against the stored prototypes, as they are.

        An exact resnet50 batch of 32 is 1.2 GB of activations: one float32 centred copy per layer,
        no float64 ones (a float64 row sum would convert its whole input first). unit(p) = (p - mean_p) / |p - mean_p|, and (x - mean_x) sums to zero, so
        (x - mean_x) . unit(p) = ((x - mean_x) . p - sum(x - mean_x) mean_p) / |p - mean_p|; the
        sum term removes what float32 rounding leaves of it. Error vs the float64 path: 3.6e-5 at
        k = 800 000 with a large common offset, from the float32 matmul's accumulation. Only what needs
        the layer's width runs per layer (centring, the GEMM, three row reductions); the float64
        algebra after it runs once over the stacked (L, B, K) results, element for element the same.
        """
        const = self._serving_constants(reduced[0].device)
        dots, sums, norms, scales = [], [], [], []
        for x, proto in zip(reduced, const.prototypes):
            centred = x - x.mean(1, keepdim=True)
            dots.append(centred @ proto.T)  # (B, K)
            sums.append(centred.sum(1))
            norms.append(torch.linalg.vector_norm(centred, dim=1))
            scales.append(torch.linalg.vector_norm(x, dim=1))
        norm = torch.stack(norms)[..., None].double()  # (L, B, 1)
        # _unit_rows' rule, a constant row has a zero profile, at float32's resolution: centring a
        # constant row in float32 leaves rounding noise of ~1e-7 of its norm, not exact zeros
        constant = norm <= FLOAT32_CONSTANT_ROW * torch.stack(scales)[..., None].double().clamp_min(1e-300)
        inv_x = torch.where(constant, 0.0, 1.0 / norm.clamp_min(1e-300))
        dots = torch.stack(dots).double() - torch.stack(sums)[..., None].double() * const.mean  # (L, B, K)
        return (dots * inv_x * const.inv_norm).to(reduced[0].dtype)


class _ServingConstants(NamedTuple):
    prototypes: list[torch.Tensor]  # per layer (K, k'_l) float32
    mean: torch.Tensor  # (L, 1, K) float64 row means
    inv_norm: torch.Tensor  # (L, 1, K) float64 1 / centred row norms


FLOAT32_CONSTANT_ROW = 1e-6  # centred norm / norm below this: a constant row in float32


def _acts_by_layer(acts: Mapping[str, torch.Tensor] | list, layers: tuple[str, ...]) -> Mapping[str, torch.Tensor]:
    if isinstance(acts, Mapping):
        missing = [n for n in layers if n not in acts]
        if missing:
            raise ValueError(f"acts lacks layers {missing}; the bank taps {list(layers)}")
        return acts
    if len(acts) != len(layers):
        raise ValueError(f"acts list must have one entry per bank layer ({len(layers)}), got {len(acts)}")
    return dict(zip(layers, acts))


def build_reference_bank(
    prototype_acts: Mapping[str, ArrayLike],
    selection: ReferenceSelection,
    similarity: ArrayLike,
    space: str = "words",
    reductions: Mapping[str, Reduction] | None = None,
) -> ReferenceBank:
    """Average each reference concept's images into its prototype.

    prototype_acts: {layer: (n, k_l)} activations of the selected images, in the order of
    np.concatenate(selection.images). similarity: (C, C) label similarity of the space.
    reductions: optional per-layer Reduction, applied before averaging.
    """
    reductions = dict(reductions or {})
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be square (C, C), got {s.shape}")
    counts = np.array([len(i) for i in selection.images])
    owner = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))  # (n,) reference of each image
    prototypes = {}
    for name, a in prototype_acts.items():
        x = reductions.get(name, Reduction()).apply(as_float64(a))
        if x.shape[0] != counts.sum():
            raise ValueError(f"prototype_acts[{name!r}] must have {counts.sum()} rows, got {x.shape[0]}")
        sums = torch.zeros(len(counts), x.shape[1], dtype=torch.float64).index_add_(0, owner, x)
        prototypes[name] = (sums / torch.from_numpy(counts).unsqueeze(1)).float().numpy()
    return ReferenceBank(
        layers=tuple(prototype_acts),
        prototypes=prototypes,
        concepts=selection.concepts,
        label_profiles=s[:, selection.concepts],
        space=space,
        reductions=reductions,
    )


def save_bank(bank: ReferenceBank, path: str | Path) -> Path:
    """Write the bank as one safetensors file (tensors + JSON metadata)."""
    tensors = {f"prototypes/{n}": torch.from_numpy(np.ascontiguousarray(bank.prototypes[n])) for n in bank.layers}
    tensors["concepts"] = torch.from_numpy(bank.concepts.astype(np.int64))
    tensors["label_profiles"] = torch.from_numpy(np.ascontiguousarray(bank.label_profiles, dtype=np.float64))
    meta = {
        "format": BANK_FORMAT,
        "layers": json.dumps(list(bank.layers)),
        "space": bank.space,
        "reductions": json.dumps({n: r.to_json() for n, r in bank.reductions.items()}),
    }
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def read_checked(path: str | Path, expected_format: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file whose metadata "format" is `expected_format`, else a
    ValueError naming `what` the file should have been."""
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != expected_format:
        raise ValueError(f"{path} is not a semguard {what} (format {meta.get('format')!r}, expected {expected_format!r})")
    return load_file(str(path)), meta


def load_bank(path: str | Path) -> ReferenceBank:
    """Read a bank written by `save_bank`; a file of another kind is a ValueError."""
    t, meta = read_checked(path, BANK_FORMAT, "reference bank")
    layers = tuple(loads_json(meta["layers"], f"{path}: metadata layers"))
    return ReferenceBank(
        layers=layers,
        prototypes={n: t[f"prototypes/{n}"].numpy() for n in layers},
        concepts=t["concepts"].numpy(),
        label_profiles=t["label_profiles"].numpy(),
        space=meta["space"],
        reductions={n: Reduction(**r) for n, r in loads_json(meta["reductions"], f"{path}: metadata reductions").items()},
    )
