"""Build an attack set (paper section 4): for each chosen source concept, one correctly classified
test image, attacked towards 6 targets chosen by word-vector similarity, stored shard by shard.

generate_attack_set is a plain function of a model and arrays (independent of the embedded
world), resumable: rerun it on the same out dir and finished shards are skipped.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from semguard.attacks.common import check_count, check_positive
from semguard.attacks.mifgsm import BACKENDS
from semguard.attacks.registry import get_attack
from semguard.attacks.store import AttackSetWriter, open_attack_set, shard_name
from semguard.attacks.targets import TargetPlan, choose_sources, plan_targets
from semguard.models.inputs import as_model_input, predict  # noqa: F401 (tests import predict from here)
from semguard.too_small import TooSmall

# Parameters each stored attack takes from GenerateParams.
_ATTACK_ARGS = {"mifgsm": ("eps", "step", "decay", "iterations", "backend"), "pgd": ("eps", "step", "iterations")}


@dataclass(frozen=True)
class GenerateParams:
    """What to attack and how; validated when built, before anything touches the out dir."""

    attack: str = "mifgsm"
    eps: float = 0.15  # L-inf on [0, 1] pixels: the paper's 0.3 on Inception-v3's [-1, 1] scale
    step: float = 0.03  # cleverhans' default 0.06 on [-1, 1] (not eps / iterations)
    decay: float = 1.0  # momentum mu, paper
    iterations: int = 20  # paper
    backend: str = "native"  # "art" gives the same images, slower
    n_sources: int = 100  # paper; fewer when fewer concepts have a correctly classified image
    targets_per_source: int = 6  # most similar, least similar, 4 evenly spaced between
    batch_size: int = 32  # one attacked batch = one shard
    seed: int = 0  # choice of source concepts

    def __post_init__(self) -> None:
        if self.attack not in _ATTACK_ARGS:
            raise ValueError(f"attack must be one of {sorted(_ATTACK_ARGS)}, got {self.attack!r}")
        check_positive("eps", self.eps)
        check_positive("step", self.step)
        if not self.decay >= 0:
            raise ValueError(f"decay must be >= 0, got {self.decay}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("iterations", "n_sources", "targets_per_source", "batch_size"):
            check_count(name, getattr(self, name))

    def attack_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in _ATTACK_ARGS[self.attack]}


class PlannedAttack(NamedTuple):
    """A TargetPlan row bound to the test image that is attacked."""

    source_image: int
    plan: TargetPlan


class GenerateResult(NamedTuple):
    out_dir: Path
    n_examples: int
    n_success: int
    computed: list[int]  # shards computed by this call
    skipped: list[int]  # shards already on disk


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class name and state dict (names, shapes, values)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def concept_vectors(word_vectors: np.ndarray | Mapping, label_names: Sequence[str]) -> np.ndarray:
    """(n_classes, d) float64 word vectors aligned with label_names; rows of NaN mean 'no vector'.

    word_vectors: such an array, or a mapping name -> vector (e.g. gensim KeyedVectors),
    where every label name must be present.
    """
    if isinstance(word_vectors, np.ndarray):
        vectors = word_vectors.astype(np.float64)
        if vectors.ndim != 2 or len(vectors) != len(label_names):
            raise ValueError(f"word_vectors must be ({len(label_names)}, d), one row per label, got {vectors.shape}")
        return vectors
    repeated = sorted(n for n, k in Counter(label_names).items() if k > 1)
    if repeated:
        raise ValueError(f"word_vectors: a mapping looks classes up by name, but label_names repeats {repeated[:5]}; "
                         "pass an array with one row per class instead")
    missing = [name for name in label_names if name not in word_vectors]
    if missing:
        raise ValueError(f"unknown label names (no word vector): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return np.stack([np.asarray(word_vectors[name], dtype=np.float64) for name in label_names])


def plan_attack_set(predicted: np.ndarray, labels: np.ndarray, vectors: np.ndarray,
                    params: GenerateParams) -> list[PlannedAttack]:
    """Sources among concepts with a word vector and a correctly classified image (the first such
    image), targets among concepts with a word vector; source-major, rank order."""
    first_correct = {}
    for i in np.flatnonzero(predicted == labels):
        first_correct.setdefault(int(labels[i]), int(i))
    return plan_from_first_correct(first_correct, vectors, params)


def plan_from_first_correct(first_correct: Mapping[int, int], vectors: np.ndarray,
                            params: GenerateParams) -> list[PlannedAttack]:
    """plan_attack_set given each class's first correctly classified image (class -> image index)."""
    concepts = np.flatnonzero(np.isfinite(vectors).all(axis=1))  # plan indices -> class ids
    eligible = [j for j, c in enumerate(concepts) if int(c) in first_correct]
    if not eligible:
        raise TooSmall("no concept with a word vector has a correctly classified image to attack", 0)
    sources = choose_sources(len(concepts), params.n_sources, params.seed, eligible)
    rows = plan_targets(vectors[concepts], sources, params.targets_per_source)
    return [
        PlannedAttack(first_correct[int(concepts[p.source])],
                      TargetPlan(int(concepts[p.source]), int(concepts[p.target]), p.rank, p.similarity))
        for p in rows
    ]


def take_images(images, indices) -> np.ndarray | torch.Tensor:
    """images[indices] of an array, a tensor or an ImageSet (semguard.subject: loaded from disk on demand)."""
    indices = np.asarray(indices, dtype=np.int64)
    return images.load(indices) if hasattr(images, "load") else images[indices]


@torch.no_grad()
def first_correct_images(model: nn.Module, images, labels: np.ndarray, classes: np.ndarray, batch_size: int,
                         device: torch.device) -> dict[int, int]:
    """class -> index of its first image (in index order) that the model classifies correctly, for `classes`.

    The same as predicting every image and taking the first hit, but it predicts only as many as it
    needs: round r looks at the next 2**r images of each class still without a hit (a real test set
    need not be read whole: for a good model most classes are settled by their first image).
    """
    order = np.argsort(labels, kind="stable")  # images grouped by class, index order within each
    bounds = np.searchsorted(labels[order], np.arange(int(labels.max(initial=-1)) + 2))
    members = {int(c): order[bounds[c]:bounds[c + 1]] for c in classes if c < len(bounds) - 1}
    found: dict[int, int] = {}
    start, chunk = 0, 1
    pending = [c for c, m in members.items() if len(m)]
    while pending:
        idx = np.concatenate([members[c][start:start + chunk] for c in pending])
        predicted = np.concatenate([
            model(as_model_input(take_images(images, idx[i:i + batch_size])).to(device)).argmax(1).cpu().numpy()
            for i in range(0, len(idx), batch_size)])
        hits = idx[predicted == labels[idx]]
        for i in hits:  # idx is class-major, index order within a class: the first hit is the first correct
            found.setdefault(int(labels[i]), int(i))
        start, chunk = start + chunk, chunk * 2
        pending = [c for c in pending if c not in found and start < len(members[c])]
    return found


def _check_labels(labels: np.ndarray, label_names: Sequence[str], n_images: int) -> None:
    """A class is its index: label_names may repeat (ImageNet's two "crane"), except where a name is a key."""
    if labels.shape != (n_images,):
        raise ValueError(f"labels must have shape ({n_images},) to match images, got {labels.shape}")
    if n_images and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise ValueError(f"labels must be class ids in [0, {len(label_names)}) (label_names), "
                         f"got {labels.min()}..{labels.max()}")


def _header(params: GenerateParams, model: nn.Module, label_names: Sequence[str],
            plan: list[PlannedAttack], subject: Mapping | None = None) -> dict:
    plan_json = json.dumps([[a.source_image, *a.plan] for a in plan]).encode()
    header = {
        "attack": params.attack, "attack_params": params.attack_kwargs(), "generate": asdict(params),
        "model_sha256": model_fingerprint(model), "plan_sha256": hashlib.sha256(plan_json).hexdigest(),
        "label_names": list(label_names), "n_examples": len(plan), "shard_size": params.batch_size,
    }
    if subject is not None:  # what was attacked (SubjectSpec.to_json): `attack analyze` reloads it from here
        header["subject"] = dict(subject)
    return header


class PreparedSet(NamedTuple):
    """An attack set opened for writing: its plan, its writer (the single writer of results) and the model."""

    model: nn.Module  # in eval mode, on the device
    plan: list[PlannedAttack]
    writer: AttackSetWriter


def prepare_attack_set(model: nn.Module, images, labels: np.ndarray, label_names: Sequence[str],
                       word_vectors: np.ndarray | Mapping, out_dir: str | Path, params: GenerateParams,
                       device: torch.device, subject: Mapping | None = None) -> PreparedSet:
    """Check the inputs, plan the attacks and open (create or resume) the attack set in out_dir.

    images: an array, a tensor or an ImageSet (only the images the plan needs are loaded); subject:
    recorded in params.json (a resumed set must have been made on the same subject)."""
    labels = np.asarray(labels, dtype=np.int64)
    _check_labels(labels, label_names, len(images))
    vectors = concept_vectors(word_vectors, label_names)
    model = model.to(device).eval()
    with torch.no_grad():
        n_classes = int(model(as_model_input(take_images(images, [0])).to(device)).shape[1]) if len(images) else 0
    if n_classes != len(label_names):
        raise ValueError(f"label_names has {len(label_names)} names but the model gives {n_classes} logits")
    with_vector = np.flatnonzero(np.isfinite(vectors).all(axis=1))
    plan = plan_from_first_correct(first_correct_images(model, images, labels, with_vector, params.batch_size, device),
                                   vectors, params)
    return PreparedSet(model, plan, open_attack_set(out_dir, _header(params, model, label_names, plan, subject)))


def shard_attacks(prepared: PreparedSet, k: int, params: GenerateParams) -> list[PlannedAttack]:
    """The planned attacks of shard k."""
    return prepared.plan[k * params.batch_size : k * params.batch_size + prepared.writer.sizes[k]]


def attack_batch(model: nn.Module, source_images: np.ndarray | torch.Tensor, targets: Sequence[int],
                 params: GenerateParams, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """One shard's work: (adversarial images (n, C, H, W) float32, the model's prediction on them (n,)).

    source_images: the clean images, in the test set's format (uint8 (n, H, W, 3) or float32 (n, 3, H, W)).
    """
    clean = as_model_input(source_images).to(device)
    adversarial = get_attack(params.attack)(model, clean, torch.tensor(targets, device=device), **params.attack_kwargs())
    with torch.no_grad():
        hit = model(adversarial).argmax(1).cpu().numpy()
    return adversarial.detach().cpu().numpy(), hit


def shard_rows(k: int, batch: Sequence[PlannedAttack], hit: np.ndarray, label_names: Sequence[str],
               params: GenerateParams) -> list[dict]:
    """Manifest rows of shard k, given the model's predictions `hit` on its adversarial images."""
    return [_row(k * params.batch_size + i, i, a, int(hit[i]), label_names, params) for i, a in enumerate(batch)]


def progress_bar(prepared: PreparedSet, params: GenerateParams, progress: bool, desc: str = "") -> tqdm:
    writer = prepared.writer
    return tqdm(total=len(prepared.plan), initial=sum(writer.sizes[k] for k in writer.done), unit="img",
                desc=desc or f"{params.attack} {params.backend}", disable=not progress, dynamic_ncols=True)


def generate_attack_set(model: nn.Module, images, labels: np.ndarray,
                        label_names: Sequence[str], word_vectors: np.ndarray | Mapping, out_dir: str | Path,
                        params: GenerateParams = GenerateParams(), device: str | torch.device | None = None,
                        progress: bool = True, on_shard: Callable[[int], None] | None = None,
                        subject: Mapping | None = None) -> GenerateResult:
    """Attack the planned (source image, target) pairs and store them in out_dir (attacks.store format).

    images: test set, uint8 (N, H, W, 3) or float32 (N, 3, H, W) in [0, 1], or an ImageSet (semguard.subject:
    only the images planned and attacked are loaded); labels (N,) class ids;
    label_names: the model's classes in logit order; word_vectors: (n_classes, d), NaN rows for
    labels without a vector, or a mapping name -> vector. Resumes a run stopped in out_dir.
    on_shard(k) is called after shard k is stored (progress hooks, tests). subject: what was attacked
    (SubjectSpec.to_json()), recorded in params.json so `semguard attack analyze` needs only the set.
    attacks.distributed.generate_attack_set_ray does the same on a Ray cluster.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    get_attack(params.attack)  # an unknown attack fails before the out dir is touched
    prepared = prepare_attack_set(model, images, labels, label_names, word_vectors, out_dir, params, device, subject)
    writer = prepared.writer
    skipped, computed = sorted(writer.done), []
    bar = progress_bar(prepared, params, progress)
    for k in writer.pending:
        batch = shard_attacks(prepared, k, params)
        adversarial, hit = attack_batch(prepared.model, take_images(images, [a.source_image for a in batch]),
                                        [a.plan.target for a in batch], params, device)
        store_shard(writer, k, batch, adversarial, hit, label_names, params, bar, on_shard)
        computed.append(k)
    bar.close()
    return GenerateResult(Path(out_dir), len(prepared.plan), writer.n_success, computed, skipped)


def store_shard(writer, k: int, batch, adversarial, hit, label_names: Sequence[str], params: GenerateParams,
                bar, on_shard: Callable[[int], None] | None) -> None:
    """Shard k's images and manifest rows through the store (the single writer), then the progress."""
    writer.write_shard(k, adversarial, shard_rows(k, batch, hit, label_names, params))
    bar.update(len(batch))
    bar.set_postfix(success=f"{writer.n_success}/{bar.n}")
    if on_shard is not None:
        on_shard(k)


def _row(example: int, index: int, a: PlannedAttack, predicted: int, label_names: Sequence[str],
         params: GenerateParams) -> dict:
    p = a.plan
    return {
        "id": example, "source_image": a.source_image, "source_class": p.source, "source_label": label_names[p.source],
        "target_class": p.target, "target_label": label_names[p.target], "rank": p.rank, "similarity": p.similarity,
        "success": predicted == p.target, "predicted_class": predicted, "shard": shard_name(example // params.batch_size),
        "index": index, "attack": params.attack, "params": params.attack_kwargs(),
    }
