"""analysis.one_vs_two against a loop straight from the paper's definition."""
import numpy as np
import pytest

from semguard.analysis.one_vs_two import (
    block_average,
    choose_reference_set,
    layer_margins,
    mean_cosine,
    one_vs_two_by_layer,
    reference_profiles,
)
from tests.detector.test_rsa import pearson


def margins_loop(items, refs, true, pred, ref_concepts, words):
    out = []
    for x, t, p in zip(items, true, pred):
        keep = [j for j, c in enumerate(ref_concepts) if c not in (t, p)]
        i = np.array([pearson(x, refs[j]) for j in keep])
        d_true = np.array([pearson(words[t], words[ref_concepts[j]]) for j in keep])
        d_pred = np.array([pearson(words[p], words[ref_concepts[j]]) for j in keep])
        out.append(pearson(i, d_true) - pearson(i, d_pred))
    return np.array(out)


def world(seed=0, n_concepts=12, n=30, k=16, d=10):
    rng = np.random.default_rng(seed)
    words = rng.normal(size=(n_concepts, d))
    labels = np.repeat(np.arange(n_concepts), 3)
    predictions = labels.copy()
    predictions[::5] = (predictions[::5] + 1) % n_concepts
    true = rng.integers(0, n_concepts, size=n)
    pred = (true + rng.integers(1, n_concepts, size=n)) % n_concepts
    return rng, words, labels, predictions, true, pred, k


def test_layer_margins_match_loop():
    rng, words, labels, predictions, true, pred, k = world()
    ref = choose_reference_set(labels, predictions, n_concepts=12, size=9, seed=1)
    items, refs = rng.normal(size=(len(true), k)), rng.normal(size=(len(ref.concepts), k))
    word_profiles = np.array([[pearson(w, words[c]) for c in ref.concepts] for w in words])
    batches = [{"layer": items[:7]}, {"layer": items[7:]}]
    profiles = reference_profiles(batches, {"layer": refs})["layer"]
    got = layer_margins(profiles, true, pred, ref, word_profiles)
    np.testing.assert_allclose(got, margins_loop(items, refs, true, pred, ref.concepts, words), atol=1e-12)


def test_reference_set_uses_correct_images_only_and_is_seeded():
    _, _, labels, predictions, *_ = world()
    ref = choose_reference_set(labels, predictions, n_concepts=12, size=100, seed=3)
    assert len(ref.concepts) == 12  # fewer concepts than the paper's 100: all of them
    assert np.all(labels[ref.image_index] == ref.concepts)
    assert np.all(predictions[ref.image_index] == labels[ref.image_index])
    again = choose_reference_set(labels, predictions, n_concepts=12, size=100, seed=3)
    np.testing.assert_array_equal(ref.image_index, again.image_index)


def test_one_vs_two_by_layer_groups_and_errors():
    rng, words, labels, predictions, true, pred, k = world(seed=2)
    ref = choose_reference_set(labels, predictions, n_concepts=12, seed=0)
    # layer "true" encodes the true label's word vector, layer "pred" the predicted one's
    proj = rng.normal(size=(words.shape[1], k))
    acts = {"true": words[true] @ proj, "pred": words[pred] @ proj}
    ref_acts = {name: words[ref.concepts] @ proj for name in acts}
    profiles = reference_profiles([acts], ref_acts)
    groups = np.arange(len(true)) % 3
    scores = one_vs_two_by_layer(profiles, true, pred, ref, words, groups=groups, n_permutations=200)
    assert scores.accuracy[0] > 0.9 and scores.accuracy[1] < 0.1
    assert np.all(scores.p_bhy < 0.05)
    assert scores.group_counts == [10, 10, 10] and scores.group_accuracy.shape == (3, 2)
    with pytest.raises(ValueError, match="must differ"):
        one_vs_two_by_layer(profiles, true, true, ref, words)
    with pytest.raises(ValueError, match="no items"):
        one_vs_two_by_layer(reference_profiles([], ref_acts), true[:0], pred[:0], ref, words)


def test_mean_cosine_and_block_average():
    v = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert mean_cosine(v, np.array([0, 0]), np.array([1, 2])) == pytest.approx(np.sqrt(0.5) / 2)
    names, avg = block_average(np.array([1.0, 3.0, 5.0]), ["a", "a", "b"])
    assert names == ["a", "b"] and avg.tolist() == [2.0, 5.0]
