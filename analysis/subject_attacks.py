"""1 vs 2 of an attack set and of the misclassified test images for any subject (paper Figures 4-6):
`semguard attack analyze` and `semguard reproduce` on real assets; the embedded world's path is
analysis.quickstart.analyze_attacks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from semguard.analysis.adversarial import References, tapped
from semguard.analysis.detector_eval import clean_image_indices
from semguard.analysis.one_vs_two import choose_reference_set, mean_cosine, one_vs_two_by_layer, reference_profiles
from semguard.analysis.quickstart import attack_summary, plot_attack_figures
from semguard.detector.layers import LayerTap, layer_blocks
from semguard.files import write_json_atomic


def _predict_indices(model, images, indices, batch_size: int = 64):
    """Predicted class (n,) of images.load(indices), batch by batch (a real test set is not held in memory)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = [model(images.load(indices[i:i + batch_size]).to(device)).argmax(1).cpu().numpy()
               for i in range(0, len(indices), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def analyze_subject_attacks(subject, attack_set, out: Path, reference_size: int = 100, n_permutations: int = 1000,
                            seed: int = 0, batch_size: int = 64, max_images: int | None = None) -> dict:
    """analysis.quickstart.analyze_attacks for any subject: 1 vs 2 of the set's successful images (by target
    rank) and of the misclassified test images, among the classes with a word vector only (the paper's 838
    of 1000). Test images are read in batches; only (n, R) profiles are kept. Figures and analysis.json in out.
    max_images: read at most this many test images (analysis.detector_eval.clean_image_indices: stratified)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    matched = np.flatnonzero(subject.matched)  # analysis index -> class id
    remap = np.full(len(subject.classes), -1)
    remap[matched] = np.arange(len(matched))  # class id -> analysis index, -1 without a word vector
    vectors = np.asarray(subject.word_vectors, np.float64)[matched]
    tap = LayerTap(subject.model.eval(), subject.layers)
    images, labels = subject.images, np.asarray(subject.images.labels)
    # test images of classes with a word vector (all of them unless max_images says otherwise)
    pool = clean_image_indices(labels, np.asarray(subject.matched), max_images or len(labels), seed)
    true = remap[labels[pool]]
    predicted = remap[_predict_indices(subject.model, images, pool, batch_size)]  # -1: a class without a vector

    reference = choose_reference_set(true, predicted, len(matched), reference_size, seed)
    ref_batches = list(tapped(tap, images.load(pool[reference.image_index]), batch_size))
    references = References(reference, {n: np.concatenate([b[n] for b in ref_batches]) for n in tap.layers})

    def scores(batches, t, p, groups):
        profiles = reference_profiles(batches, references.acts)
        return one_vs_two_by_layer(profiles, t, p, reference, vectors, groups, n_permutations, seed)

    kept = attack_set.successful().records
    if not kept:
        raise ValueError(f"attack set {attack_set.path} has no successful attack to analyse")
    adv_true = remap[[r.source_class for r in kept]]
    adv_pred = remap[[r.target_class for r in kept]]
    if (adv_true < 0).any() or (adv_pred < 0).any():
        raise ValueError(f"attack set {attack_set.path} attacks classes without a word vector in this subject")
    adversarial = scores(tapped(tap, attack_set.images(kept), batch_size), adv_true, adv_pred,
                         np.array([r.rank for r in kept]))

    wrong = np.flatnonzero((predicted != true) & (predicted >= 0))  # mistaken for another class with a vector
    if len(wrong) == 0:
        raise ValueError("the model misclassifies no test image of a class with a word vector: nothing to analyse")
    chunks = (images.load(pool[wrong[i:i + batch_size]]) for i in range(0, len(wrong), batch_size))
    misclassified = scores((b for x in chunks for b in tapped(tap, x, batch_size)), true[wrong], predicted[wrong], None)

    result = attack_summary(attack_set, adversarial)
    result["misclassified"] = {**misclassified.as_json(),
                               "mean_cosine": mean_cosine(vectors, true[wrong], predicted[wrong])}
    result["subject"] = {"name": subject.name, "classes": len(subject.classes), "with_word_vector": len(matched),
                         "test_images": len(pool)}
    plot_attack_figures(out, adversarial, misclassified, layer_blocks(subject.name, subject.layers))
    write_json_atomic(out / "analysis.json", result)
    return result
