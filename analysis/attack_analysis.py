"""1 vs 2 through the layers for adversarial and for naturally misclassified images (paper section 4,
Figures 4-6): which layers still side with the true label? One path for every subject, the embedded
world included: `semguard attack analyze`, `semguard quickstart` and `semguard reproduce` call
`analyze_attacks`.

Test images are read from the subject's ImageSet in batches and only their (n, R) profiles against the
references are kept, so memory does not grow with the number of images. Analyses run among the classes
with a word vector only (the paper's 838 of 1000).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from semguard.evaluation.detector_eval import clean_image_indices
from semguard.analysis.figures import plot_by_layer
from semguard.analysis.one_vs_two import (
    OneVsTwoScores,
    ReferenceSet,
    block_average,
    choose_reference_set,
    mean_cosine,
    one_vs_two_by_layer,
    reference_profiles,
)
from semguard.attacks.store import AttackSet
from semguard.detector.budget import TAP_BATCH, tap_batch_size
from semguard.detector.layers import LayerTap, iter_activations
from semguard.models.presets import layer_blocks
from semguard.files import write_json_atomic
from semguard.models.inputs import as_model_input, predict
from semguard.subject.header import subject_header
from semguard.too_small import TooSmall

PREDICT_BATCH = 256  # images per prediction pass


def tapped(tap: LayerTap, images: torch.Tensor | Dataset, batch_size: int = TAP_BATCH
           ) -> Iterator[dict[str, np.ndarray]]:
    """layer -> (b, k) activations, one batch at a time, of a tensor or a Dataset (a Subset of an ImageSet)."""
    for _, out in iter_activations(tap, images, batch_size):
        yield {name: a.cpu().numpy() for name, a in out.acts.items()}


class References(NamedTuple):
    """The reference set and, per layer, the representation of each reference concept (R, k)."""

    concepts: ReferenceSet
    acts: dict[str, np.ndarray]


def analyze_attacks(subject, attack_set: AttackSet | TooSmall, out: Path, reference_size: int = 100,
                    n_permutations: int = 1000, seed: int = 0, max_images: int | None = None,
                    memory_budget_gib: float = 4.0) -> dict:
    """1 vs 2 of the set's successful images (by target rank) and of the misclassified test images.

    subject: a semguard.subject.Subject; attack_set: the set, or the TooSmall that kept it from being made.
    Returns the `attacks`, `adversarial_one_vs_two`, `misclassified` and `subject` sections (`subject`
    holds the subject header, subject.header); writes analysis.json and the figures in out. A sub-study
    with nothing to analyse (no successful attack, no misclassified image, too few references) keeps its
    section's keys, empty, with "skipped": {"reason", "count"}; the other one still runs. max_images: read
    at most this many test images for the references and the misclassified study (clean_image_indices:
    stratified over the classes). memory_budget_gib: activations held by one tapped pass (`tap_batch_size`);
    peak memory is that, the references' activations (reference_size images) and the (n, R) profiles,
    whatever the number of images.
    """
    Path(out).mkdir(parents=True, exist_ok=True)
    matched = np.flatnonzero(subject.matched)  # analysis index -> class id
    remap = np.full(len(subject.classes), -1)
    remap[matched] = np.arange(len(matched))  # class id -> analysis index, -1 without a word vector
    vectors = np.asarray(subject.word_vectors)[matched]
    tap = LayerTap(subject.model.eval(), subject.layers)
    images, labels = subject.images, np.asarray(subject.images.labels)
    pool = clean_image_indices(labels, np.asarray(subject.matched), max_images or len(labels), seed)
    raw = predict(subject.model, Subset(images, pool), PREDICT_BATCH)
    true, predicted = remap[labels[pool]], remap[raw]  # -1: a class without a vector

    try:
        reference = choose_reference_set(true, predicted, len(matched), reference_size, seed)
    except TooSmall as error:
        reference = error
    batch = tap_batch_size(tap, images.load(pool[:1]), memory_budget_gib)
    if not isinstance(reference, TooSmall):
        ref_batches = list(tapped(tap, Subset(images, pool[reference.image_index]), batch))
        references = References(reference, {n: np.concatenate([b[n] for b in ref_batches]) for n in tap.layers})

    def scores(batches, t, p, groups) -> OneVsTwoScores:
        profiles = reference_profiles(batches, references.acts)
        return one_vs_two_by_layer(profiles, t, p, reference, vectors, groups, n_permutations, seed)

    kept = [] if isinstance(attack_set, TooSmall) else attack_set.successful().records
    if isinstance(attack_set, TooSmall) or isinstance(reference, TooSmall):
        adversarial = attack_set if isinstance(attack_set, TooSmall) else reference
    elif not kept:
        adversarial = TooSmall(f"attack set {attack_set.path} has no successful attack to analyse", 0)
    else:
        adv_true, adv_pred = remap[[r.source_class for r in kept]], remap[[r.target_class for r in kept]]
        if (adv_true < 0).any() or (adv_pred < 0).any():
            raise ValueError(f"attack set {attack_set.path} attacks classes without a word vector in this subject")
        # read in chunks, like the test images below: memory does not grow with the number of attacks
        attacked = (as_model_input(attack_set.images(kept[i:i + batch])) for i in range(0, len(kept), batch))
        adversarial = scores((b for x in attacked for b in tapped(tap, x, batch)), adv_true, adv_pred,
                             np.array([r.rank for r in kept]))

    wrong = np.flatnonzero((predicted != true) & (predicted >= 0))  # mistaken for another class with a vector
    if isinstance(reference, TooSmall):
        misclassified = reference
    elif len(wrong) == 0:
        misclassified = TooSmall("the model misclassifies no test image of a class with a word vector", 0)
    else:
        misclassified = scores(tapped(tap, Subset(images, pool[wrong]), batch), true[wrong], predicted[wrong], None)

    result = attack_summary(attack_set, adversarial, tap.layers)
    result["misclassified"] = (skipped_scores(misclassified, tap.layers) | {"mean_cosine": None}
                               if isinstance(misclassified, TooSmall) else
                               {**misclassified.as_json(), "mean_cosine": mean_cosine(vectors, true[wrong], predicted[wrong])})
    result["subject"] = {"name": subject.name, "classes": len(subject.classes), "with_word_vector": len(matched),
                         "test_images": len(pool), "header": subject_header(subject, labels[pool], raw)}
    plot_attack_figures(out, adversarial, misclassified, layer_blocks(subject.name, subject.layers))
    write_json_atomic(out / "analysis.json", result)
    return result


def skipped_scores(error: TooSmall, layers: list[str]) -> dict:
    """A 1 vs 2 section with nothing analysed: OneVsTwoScores.as_json()'s keys, empty, and why."""
    return {"layers": list(layers), "count": 0, "accuracy": [], "p_value": [], "p_bhy": [], "groups": [],
            "group_counts": [], "group_accuracy": [], "skipped": error.record()}


def attack_summary(attack_set: AttackSet | TooSmall, adversarial: OneVsTwoScores | TooSmall,
                   layers: list[str] | None = None) -> dict:
    """summary.json's `attacks` and `adversarial_one_vs_two` sections (`layers`: the tapped layers, for a
    skipped analysis)."""
    if isinstance(adversarial, TooSmall):
        adv = {**skipped_scores(adversarial, layers or []), "pooled_accuracy": [], "by_rank": {}}
    else:
        adv = {
            **adversarial.as_json(),
            "pooled_accuracy": adversarial.accuracy.tolist(),
            "accuracy": adversarial.group_accuracy.mean(axis=0).tolist(),  # mean over target ranks
            "by_rank": {str(g): acc.tolist() for g, acc in zip(adversarial.groups, adversarial.group_accuracy)},
        }
    if isinstance(attack_set, TooSmall):
        none = dict.fromkeys(("path", "eps", "step", "decay", "iterations", "backend"))
        return {"attacks": {**none, "requested": 0, "succeeded": 0, "skipped": attack_set.record()},
                "adversarial_one_vs_two": adv}
    params = attack_set.header["generate"]
    return {
        "attacks": {
            "path": str(attack_set.path),
            "requested": len(attack_set),
            "succeeded": len(attack_set.successful()),
            "eps": params["eps"],
            "step": params["step"],
            "decay": params["decay"],
            "iterations": params["iterations"],
            "backend": params["backend"],
        },
        "adversarial_one_vs_two": adv,
    }


def plot_attack_figures(out: Path, adversarial: OneVsTwoScores | TooSmall, misclassified: OneVsTwoScores | TooSmall,
                        blocks: list[str]) -> None:
    """Paper Figure 6 (1 vs 2 of adversarial images by target rank) and Figures 4-5 (misclassified); a
    skipped analysis (TooSmall) draws no figure."""
    for stale, scores in (("adversarial_one_vs_two_by_layer.png", adversarial),
                          ("misclassified_one_vs_two_by_block.png", misclassified)):
        if isinstance(scores, TooSmall):
            (out / stale).unlink(missing_ok=True)  # a figure of an earlier run is not this run's
    if not isinstance(adversarial, TooSmall):
        _plot_adversarial(out, adversarial)
    if not isinstance(misclassified, TooSmall):
        names, averaged = block_average(misclassified.accuracy, blocks)
        plot_by_layer(
            out / "misclassified_one_vs_two_by_block.png", names, {"block average": averaged},
            ylabel="1 vs 2 accuracy (true label wins)",
            title=f"1 vs 2, misclassified test images (n={misclassified.count}), block averaged",
        )


def _plot_adversarial(out: Path, adversarial: OneVsTwoScores) -> None:
    curves = {f"rank {g} (n={n})": acc for g, n, acc in
              zip(adversarial.groups, adversarial.group_counts, adversarial.group_accuracy)}
    curves["all ranks"] = adversarial.accuracy
    plot_by_layer(
        out / "adversarial_one_vs_two_by_layer.png", adversarial.layers, curves,
        significant={"all ranks": adversarial.p_bhy < 0.05}, ylabel="1 vs 2 accuracy (true label wins)",
        title=f"1 vs 2, successful MI-FGSM images (n={adversarial.count}), by target similarity rank",
    )
