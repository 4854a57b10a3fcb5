"""2 vs 2 on the classifier's class prototypes (issue 27): every class with a word vector, no image needed.

A class's prototype is its row of the classifier's final layer, W[c] (k,): the direction in the
penultimate feature space whose dot product is the class's logit, i.e. what the trained model holds
about that class. C_I is the correlation matrix of those rows over the matched classes, C_D the word
vectors' (paper 3.3), and the statistic and its permutation test are the image sets' (`two_vs_two`,
`permutation_test_two_vs_two`, one "set"). So with 20 photos of 19 classes the question "does the
model's class geometry follow the words?" is still asked of all 985 matched ImageNet classes.

What it is not: a per-layer curve. A layer's activations exist only for an input, so the layers
before the head need images (`analyze two-vs-two` on the photos answers that for the classes they
cover); the mean activation of the images predicted as a class adds nothing where there is one image
per class, and an image optimised to maximise a class would measure the optimiser's regulariser as
much as the model, at a backward pass per step per class. Neither is done here.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from semguard.detector.rsa import correlation_matrix
from semguard.detector.significance import default_device, permutation_test_two_vs_two
from semguard.files import write_json_atomic
from semguard.too_small import TooSmall

FORMAT = "semguard.prototype_two_vs_two/1"
PROTOTYPES_FILE = "prototypes.json"


class Prototypes(NamedTuple):
    layer: str  # the module the rows come from, e.g. "model._fc"
    weight: np.ndarray  # (C, k) float64, row c: class c's prototype


def classifier_prototypes(model: nn.Module, n_classes: int) -> Prototypes:
    """The last nn.Linear (or 1x1 nn.Conv2d, as SqueezeNet's head) with n_classes outputs, in registration
    order: its weight rows (C, k). ValueError naming the model's class when there is none."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == n_classes:
            found = (name, module.weight)
        elif isinstance(module, nn.Conv2d) and module.out_channels == n_classes and module.kernel_size == (1, 1):
            found = (name, module.weight)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no nn.Linear (or 1x1 nn.Conv2d) with {n_classes} outputs, the "
                         "classifier whose weight rows are the class prototypes")
    name, weight = found
    return Prototypes(name, weight.detach().reshape(n_classes, -1).double().cpu().numpy())


def prototype_two_vs_two(subject, n_permutations: int = 1000, seed: int = 0,
                         device: torch.device | str | None = None) -> dict:
    """2 vs 2 of the classifier's prototypes of `subject`'s matched classes against their word vectors
    (a semguard.subject.Subject; no image is read). TooSmall below 3 matched classes."""
    concepts = np.flatnonzero(np.asarray(subject.matched, bool))
    if len(concepts) < 3:
        raise TooSmall(f"2 vs 2 on class prototypes needs at least 3 classes with a word vector, found {len(concepts)}",
                       len(concepts))
    proto = classifier_prototypes(subject.model, len(subject.classes))
    c_i = correlation_matrix(proto.weight[concepts])  # (w, w)
    c_d = correlation_matrix(np.asarray(subject.word_vectors)[concepts])
    result = permutation_test_two_vs_two(c_i, c_d, n_permutations=n_permutations, seed=seed,
                                         device=device if device is not None else default_device())
    return {"format": FORMAT, "model": subject.name, "layer": proto.layer, "prototype": "classifier weight row",
            "features": int(proto.weight.shape[1]), "concepts": len(concepts), "accuracy": result.accuracy,
            "p_value": result.p_value, "n_permutations": n_permutations, "seed": seed}


def write_prototype_two_vs_two(subject, out: str | Path, n_permutations: int = 1000, seed: int = 0,
                               device: torch.device | str | None = None) -> dict:
    """prototype_two_vs_two, written to out/prototypes.json."""
    record = prototype_two_vs_two(subject, n_permutations, seed, device)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / PROTOTYPES_FILE, record)
    return record
