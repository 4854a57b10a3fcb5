"""detector.signature against a loop-by-definition reference."""
import dataclasses

import numpy as np
import pytest
import torch

from semguard.detector.reference import Reduction, ReferenceBank, build_reference_bank, select_references, word_similarity
from tests.detector.test_rsa import pearson
from semguard.detector.signature import (
    alternative_table,
    labels_with_vector,
    reduction_agreement,
    semantic_prediction,
    signature_from_profiles,
    signature_parts,
)


def signature_loop(profiles, predicted, d, concepts, alternatives):
    """By definition: one 1 vs 2 test per (layer, image, alternative), references p and a left out."""
    n_layers, batch, _ = profiles.shape
    fraction = np.zeros((batch, n_layers))
    margin = np.zeros((batch, n_layers))
    for l in range(n_layers):
        for b in range(batch):
            p = predicted[b]
            wins, margins = [], []
            for a in alternatives[b]:
                keep = [j for j, c in enumerate(concepts) if c not in (p, a)]
                i = profiles[l, b, keep]
                m = pearson(i, d[p, keep]) - pearson(i, d[a, keep])
                wins.append(m > 1e-12)
                margins.append(m)
            fraction[b, l] = np.mean(wins)
            margin[b, l] = np.mean(margins)
    return fraction, margin


def random_case(seed, n_labels=12, k=6, batch=7, n_layers=3):
    rng = np.random.default_rng(seed)
    profiles = np.tanh(rng.normal(size=(n_layers, batch, k)))
    d = np.tanh(rng.normal(size=(n_labels, n_labels)))
    concepts = np.sort(rng.choice(n_labels, size=k, replace=False))
    predicted = rng.integers(0, n_labels, size=batch)
    return profiles, predicted, d[:, concepts], concepts


@pytest.mark.parametrize("seed,n_labels,k", [(0, 12, 6), (1, 5, 4), (2, 30, 30), (3, 9, 9), (4, 40, 11)])
def test_signature_matches_loop_all_alternatives(seed, n_labels, k):
    profiles, predicted, d, concepts = random_case(seed, n_labels, k)
    alts = alternative_table(n_labels)[predicted]
    got = signature_from_profiles(profiles, predicted, d, concepts, alts)
    want = signature_loop(profiles, predicted, d, concepts, alts)
    np.testing.assert_allclose(got.fraction, want[0], atol=1e-9)
    np.testing.assert_allclose(got.margin, want[1], atol=1e-9)


def test_signature_covers_prediction_inside_and_outside_references():
    profiles, _, d, concepts = random_case(5, n_labels=10, k=5, batch=10)
    predicted = np.arange(10)  # half the labels are references, half are not
    got = signature_from_profiles(profiles, predicted, d, concepts)
    want = signature_loop(profiles, predicted, d, concepts, alternative_table(10)[predicted])
    np.testing.assert_allclose(got.fraction, want[0], atol=1e-9)
    np.testing.assert_allclose(got.margin, want[1], atol=1e-9)


def test_signature_with_constant_rows_matches_loop():
    profiles, predicted, d, concepts = random_case(6, n_labels=8, k=6)
    profiles[0, 1] = 0.0  # a dead layer: zero profile
    profiles[1, 2] = 0.3  # constant profile
    d[3] = 0.5  # a label with a constant word profile
    alts = alternative_table(8)[predicted]
    got = signature_from_profiles(profiles, predicted, d, concepts, alts)
    want = signature_loop(profiles, predicted, d, concepts, alts)
    np.testing.assert_allclose(got.fraction, want[0], atol=1e-9)
    np.testing.assert_allclose(got.margin, want[1], atol=1e-9)
    assert got.fraction[1, 0] == 0.0  # a zero profile prefers nothing


def test_seeded_subset_of_alternatives():
    table = alternative_table(20, 5, seed=3)
    assert table.shape == (20, 5)
    assert not (table == np.arange(20)[:, None]).any()
    assert all(len(set(row)) == 5 for row in table)
    np.testing.assert_array_equal(table, alternative_table(20, 5, seed=3))
    profiles, predicted, d, concepts = random_case(7, n_labels=20, k=8)
    got = signature_from_profiles(profiles, predicted, d, concepts, table[predicted])
    want = signature_loop(profiles, predicted, d, concepts, table[predicted])
    np.testing.assert_allclose(got.fraction, want[0], atol=1e-9)


def make_world(rng, n_labels=10, widths=(20, 12), noise=1.0):
    """Labels with latent vectors; every layer a random linear image of them plus noise."""
    latent = rng.normal(size=(n_labels, 16))
    maps = [rng.normal(size=(16, w)) for w in widths]

    def acts_of(labels):
        return {f"l{j}": latent[labels] @ m + noise * rng.normal(size=(len(labels), m.shape[1])) for j, m in enumerate(maps)}

    return latent, acts_of


def make_bank(rng, n_labels=10, per=3, widths=(20, 12), reductions=None):
    latent, acts_of = make_world(rng, n_labels, widths)
    labels = np.repeat(np.arange(n_labels), per)
    sel = select_references(labels, labels, k=8, per_concept=2, seed=0)
    acts = acts_of(labels[np.concatenate(sel.images)])
    return build_reference_bank(acts, sel, word_similarity(latent), reductions=reductions), acts_of


def test_signature_from_acts_matches_loop_by_definition():
    rng = np.random.default_rng(8)
    bank, _ = make_bank(rng)
    acts = {n: torch.from_numpy(rng.normal(size=(5, bank.prototypes[n].shape[1]))) for n in bank.layers}
    predicted = rng.integers(0, 10, size=5)
    profiles = np.stack(
        [[[pearson(acts[n][b].numpy(), bank.prototypes[n][j].astype(np.float64)) for j in range(len(bank.concepts))]
          for b in range(5)] for n in bank.layers]
    )
    want = signature_loop(profiles, predicted, bank.label_profiles, bank.concepts, alternative_table(10)[predicted])
    got = signature_parts(acts, predicted, bank, dtype=torch.float64)
    np.testing.assert_allclose(got.fraction, want[0], atol=1e-9)
    np.testing.assert_allclose(got.margin, want[1], atol=1e-9)
    # float32 serving path: same fractions away from ties, margins close
    fast = signature_parts(list(acts.values()), predicted, bank).margin
    np.testing.assert_allclose(fast, want[1], atol=1e-5)


def test_empty_batch_gives_empty_signature():
    rng = np.random.default_rng(9)
    bank, _ = make_bank(rng)
    acts = {n: torch.zeros(0, bank.prototypes[n].shape[1]) for n in bank.layers}
    assert signature_parts(acts, np.zeros(0, dtype=int), bank).fraction.shape == (0, 2)


def test_projection_and_pooling_agree_with_exact():
    rng = np.random.default_rng(10)
    widths = (16 * 64, 3 * 49)  # (channels, H*W) maps, flattened channel-major
    exact, acts_of = make_bank(rng, widths=widths)
    predicted = rng.integers(0, 10, size=40)
    acts = {n: torch.from_numpy(a) for n, a in acts_of(predicted).items()}
    # the reduced bank averages the reduced activations of the same images: linear, so reduce the prototypes
    reductions = {"l0": Reduction("projection", dim=256, seed=1), "l1": Reduction("channel_pool", channels=3)}
    reduced = ReferenceBank(
        exact.layers,
        {n: reductions[n].apply(torch.from_numpy(exact.prototypes[n]).double()).float().numpy() for n in exact.layers},
        exact.concepts, exact.label_profiles, reductions=reductions,
    )
    agreement = reduction_agreement(acts, predicted, exact, reduced)
    assert agreement.fraction_mae.shape == (2,)
    assert agreement.fraction_mae[0] < 0.1  # projection: close to exact
    assert agreement.margin_mae[0] < 0.15
    assert reduced.bytes_per_layer()["l0"] < exact.bytes_per_layer()["l0"]
    same = reduction_agreement(acts, predicted, exact, exact)
    np.testing.assert_allclose(same.fraction_mae, 0.0)
    np.testing.assert_allclose(same.fraction_corr, 1.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"predicted": np.array([0, 99, 1, 2, 3, 4, 5])}, "predicted"),
        ({"alternatives": np.zeros((7, 2), dtype=int)}, "alternatives"),
        ({"concepts": np.array([0, 0, 1, 2, 3, 4])}, "concepts"),
        ({"profiles": np.full((3, 7, 6), np.nan)}, "finite"),
    ],
)
def test_bad_input_raises(kwargs, match):
    profiles, predicted, d, concepts = random_case(11)
    args = {"profiles": profiles, "predicted": predicted, "label_profiles": d, "concepts": concepts}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        signature_from_profiles(**args)


def test_too_few_references_raises():
    profiles, predicted, d, concepts = random_case(12, n_labels=6, k=3)
    with pytest.raises(ValueError, match="K >= 4"):
        signature_from_profiles(profiles, predicted, d, concepts)


def test_a_bank_the_signature_cannot_use_raises_from_the_serving_path():
    # signature_parts reads the bank's label terms, checked once per bank: the same errors as signature_from_profiles
    bank, _ = make_bank(np.random.default_rng(14))
    acts = {n: torch.rand(2, bank.prototypes[n].shape[1]) for n in bank.layers}
    few = dataclasses.replace(bank, concepts=bank.concepts[:3], label_profiles=bank.label_profiles[:, :3],
                              prototypes={n: p[:3] for n, p in bank.prototypes.items()})
    with pytest.raises(ValueError, match="K >= 4"):
        signature_parts(acts, np.zeros(2, dtype=int), few)
    broken = bank.label_profiles.copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        signature_parts(acts, np.zeros(2, dtype=int), dataclasses.replace(bank, label_profiles=broken))
    terms = bank.label_terms()
    assert bank.label_terms() is terms  # made once
    np.testing.assert_allclose(terms.sums.numpy(), bank.label_profiles.sum(1), rtol=1e-12)


def test_missing_layer_raises():
    bank, _ = make_bank(np.random.default_rng(13))
    with pytest.raises(ValueError, match="lacks layers"):
        signature_parts({"l0": torch.zeros(2, 20)}, np.zeros(2, dtype=int), bank)
    with pytest.raises(ValueError, match=r"acts\['l1'\] must be"):
        signature_parts({"l0": torch.zeros(2, 20), "l1": torch.zeros(2, 5)}, np.zeros(2, dtype=int), bank)


def test_alternatives_and_judged_label_skip_labels_without_a_word_vector():
    """Labels without a word vector (zero rows) are never alternatives, and an image predicted as one is judged
    as its top label that has a vector; with every label eligible both are what they were (argmax, all others)."""
    words = np.random.default_rng(0).normal(size=(9, 4))
    words[[2, 5]] = 0
    eligible = labels_with_vector(words)
    np.testing.assert_array_equal(eligible, ~np.isin(np.arange(9), [2, 5]))
    every = alternative_table(9, None, 0, eligible)
    for p in range(9):  # by definition: the eligible labels other than p, in order
        np.testing.assert_array_equal(every[p], [a for a in range(9) if eligible[a] and a != p][:6])
    subset = alternative_table(9, 3, 1, eligible)
    assert subset.shape == (9, 3) and not np.isin(subset, [2, 5]).any()
    assert not (subset == np.arange(9)[:, None]).any()
    np.testing.assert_array_equal(alternative_table(9, 3, 1, np.ones(9, bool)), alternative_table(9, 3, 1))
    np.testing.assert_array_equal(alternative_table(9, None, 0, np.ones(9, bool)), alternative_table(9))
    logits = torch.tensor([[0.0, 1, 9, 2, 0, 0, 0, 0, 0], [5.0, 1, 0, 2, 0, 0, 0, 0, 0]])
    assert semantic_prediction(logits, eligible).tolist() == [3, 0]  # label 2 has no vector: the next best, 3
    assert semantic_prediction(logits, None).tolist() == [2, 0]
    with pytest.raises(ValueError, match="at least 2 labels"):
        alternative_table(3, None, 0, np.array([True, False, False]))
