"""run_two_vs_two (Figure 1 for any subject, streamed and resumable) against a loop written from the
paper's definition, under memory budgets that force several passes, blocked correlations and the
disk spill; a killed run resumes; on a world-like subject it equals the quickstart's 2 vs 2 stage."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semguard.analysis.subject_two_vs_two import (
    PIXELS, TwoVsTwoConfig, choose_image_sets, correlation_blocked, plan_passes, run_two_vs_two,
)
from semguard.models.factory import ModelSpec
from semguard.detector.layers import LayerTap
from semguard.detector.rsa import correlation_matrix
from semguard.subject.core import ArrayImages, Subject, SubjectSpec
from tests.tiny_cnn import LAYERS, TinyCNN

N_CLASSES, PER_CLASS, SETS, PERMS = 7, 4, 3, 20
UNMATCHED, TOO_FEW = 3, 5  # a class without a word vector, a class with fewer images than image sets


class TensorImages:
    """An ImageSet over float (N, 3, H, W) images already in memory."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.labels, self.skipped = images, np.asarray(labels, np.int64), ()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(np.asarray(indices, np.int64))]


def tiny_subject() -> Subject:
    torch.manual_seed(0)
    model = TinyCNN(num_classes=N_CLASSES).eval()
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    labels = labels[(labels != TOO_FEW) | (np.arange(len(labels)) % PER_CLASS < SETS - 1)]  # TOO_FEW keeps 2
    labels = labels[rng.permutation(len(labels))]  # set s = the s-th image in index order, not in class order
    images = torch.from_numpy(rng.random((len(labels), 3, 8, 8), dtype=np.float32))
    words = rng.normal(size=(N_CLASSES, 12)).astype(np.float32)
    matched = np.ones(N_CLASSES, bool)
    matched[UNMATCHED] = False
    words[UNMATCHED] = 0
    return Subject("tiny", model, ModelSpec("tiny_cnn_test", {"num_classes": N_CLASSES}), list(LAYERS),
                   [f"c{i}" for i in range(N_CLASSES)], words, matched, TensorImages(images, labels), SubjectSpec())


# --------------------------------------------------------------------------- the reference, from the definition


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def two_vs_two_loop(c_i: np.ndarray, c_d: np.ndarray) -> float:
    """Paper 3.3: for each pair (a, b), rows a and b of C_I and C_D without columns a and b; the pair
    passes when corr(I_a, D_a) + corr(I_b, D_b) > corr(I_a, D_b) + corr(I_b, D_a), a tie counts half."""
    w, outcomes = len(c_i), []
    for a in range(w):
        for b in range(a + 1, w):
            keep = [j for j in range(w) if j not in (a, b)]
            ia, ib, da, db = c_i[a, keep], c_i[b, keep], c_d[a, keep], c_d[b, keep]
            right, wrong = pearson(ia, da) + pearson(ib, db), pearson(ia, db) + pearson(ib, da)
            outcomes.append(0.5 if abs(right - wrong) < 1e-12 else float(right > wrong))
    return float(np.mean(outcomes))


def bhy_loop(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg-Yekutieli: p_(k) m c(m) / k, c(m) = sum 1/i, made monotone from the top, capped at 1."""
    m = len(p)
    order = np.argsort(p)
    scaled = p[order] * m * np.sum(1.0 / np.arange(1, m + 1)) / np.arange(1, m + 1)
    adjusted = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    out = np.empty(m)
    out[order] = adjusted
    return out


def reference(subject: Subject, n_sets: int, n_permutations: int, seed: int) -> dict[str, tuple[float, float]]:
    """layer -> (accuracy averaged over sets, permutation p): every image through the model, every
    matrix with np.corrcoef, the permutations drawn as the implementation draws them."""
    labels = subject.images.labels
    concepts = [c for c in range(len(subject.classes))
                if subject.matched[c] and np.sum(labels == c) >= n_sets]
    sets = [[np.flatnonzero(labels == c)[s] for c in concepts] for s in range(n_sets)]
    c_d = np.corrcoef(subject.word_vectors[concepts].astype(np.float64))
    tap = LayerTap(subject.model, subject.layers)
    acts_by_set = []
    for idx in sets:
        images = subject.images.load(idx)
        with torch.no_grad():
            acts = {n: a.numpy() for n, a in tap(images).acts.items()}
        acts_by_set.append({PIXELS: images.reshape(len(idx), -1).numpy(), **acts})
    generator = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(len(concepts), generator=generator).numpy() for _ in range(n_permutations)]
    out = {}
    for name in [PIXELS, *subject.layers]:
        c_is = [np.corrcoef(acts[name].astype(np.float64)) for acts in acts_by_set]
        observed = np.mean([two_vs_two_loop(c_i, c_d) for c_i in c_is])
        null = [np.mean([two_vs_two_loop(c_i, c_d[p][:, p]) for c_i in c_is]) for p in perms]
        p_value = (1 + np.sum(np.asarray(null) >= observed - 1e-12)) / (1 + n_permutations)
        out[name] = (float(observed), float(p_value))
    return out


@pytest.fixture(scope="module")
def subject():
    return tiny_subject()


@pytest.fixture(scope="module")
def expected(subject):
    return reference(subject, SETS, PERMS, seed=3)


CONFIG = TwoVsTwoConfig(image_sets=SETS, n_permutations=PERMS, seed=3, batch_size=5, device="cpu", progress=False)


def check_against_reference(result: dict, expected: dict) -> None:
    assert result["layers"] == LAYERS
    np.testing.assert_allclose(result["pixels"], expected[PIXELS][0], atol=1e-12)
    assert result["pixels_p_value"] == pytest.approx(expected[PIXELS][1])
    np.testing.assert_allclose(result["accuracy"], [expected[n][0] for n in LAYERS], atol=1e-12)
    p = np.asarray([expected[n][1] for n in LAYERS])
    np.testing.assert_allclose(result["p_value"], p)
    np.testing.assert_allclose(result["p_bhy"], bhy_loop(p))


def test_matches_a_loop_written_from_the_definition(subject, expected, tmp_path):
    result = run_two_vs_two(subject, tmp_path, CONFIG)
    check_against_reference(result, expected)
    assert result["concepts"] == N_CLASSES - 2
    assert result["left_out"] == {"unmatched": 1, "too_few_images": [f"c{TOO_FEW}"]}
    assert result["computed"] == [PIXELS, *LAYERS]
    on_disk = json.loads((tmp_path / "two_vs_two.json").read_text())
    assert on_disk["accuracy"] == result["accuracy"] and np.shape(on_disk["per_set"]) == (len(LAYERS), SETS)
    assert (tmp_path / "two_vs_two_by_layer.png").read_bytes()[:4] == b"\x89PNG"


def test_a_small_memory_budget_gives_the_same_numbers_through_passes_blocks_and_the_disk(subject, expected, tmp_path,
                                                                                       monkeypatch):
    from semguard.analysis import subject_two_vs_two as module

    w = N_CLASSES - 2
    # features per image: pixels 192, conv1 384, relu2 192, pool 12 -> 5000 bytes for 5 images: pixels alone,
    # conv1 over the budget (spilled to disk), relu2 + pool together; 1000 bytes of work space: column blocks of 8
    budget = 5000
    sizes = {PIXELS: 192, "conv1": 384, "relu2": 192, "pool": 12}
    passes = plan_passes(sizes, w, budget)
    assert passes == [module.Pass((PIXELS,), False), module.Pass(("conv1",), True),
                      module.Pass(("relu2", "pool"), False)]
    spilled = []
    real_open = np.lib.format.open_memmap
    monkeypatch.setattr(np.lib.format, "open_memmap", lambda *a, **k: spilled.append(a[0]) or real_open(*a, **k))
    config = TwoVsTwoConfig(**{**CONFIG.__dict__, "memory_budget_gib": budget / 2**30, "workspace_gib": 1000 / 2**30})
    loaded = []
    counting = TensorImages(subject.images.images, subject.images.labels)
    counting.load = lambda indices: loaded.extend(np.asarray(indices).tolist()) or TensorImages.load(counting, indices)
    result = run_two_vs_two(subject._replace(images=counting), tmp_path, config)
    check_against_reference(result, expected)
    spilled = [p for p in spilled if Path(p).parent.name == ".spill"]  # (np.load's mmap opens the decoded sets)
    assert len(spilled) == SETS and not (tmp_path / ".spill").exists()  # one spill per image set, removed after
    # each set decoded once for the 3 passes (+ one probe image per set, + one for the layer sizes)
    assert len(loaded) == 1 + SETS * (1 + w) and not (tmp_path / ".images").exists()


def test_blocked_correlations_equal_the_whole_matrix():
    acts = np.random.default_rng(0).normal(size=(11, 40)).astype(np.float32)
    acts[4] = 2.5  # a constant row correlates 0, as in correlation_matrix
    for cols in (1, 3, 11, 40, 50):
        np.testing.assert_allclose(correlation_blocked(acts, cols), correlation_matrix(acts), atol=1e-14)
    with pytest.raises(ValueError, match="block_cols"):
        correlation_blocked(acts, 0)


def test_a_killed_run_resumes_and_computes_only_the_rest(subject, expected, tmp_path):
    class Killed(Exception):
        pass

    def kill(name):
        raise Killed(name)

    config = TwoVsTwoConfig(**{**CONFIG.__dict__, "memory_budget_gib": 5000 / 2**30})
    with pytest.raises(Killed):
        run_two_vs_two(subject, tmp_path, config, on_layer=kill)
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["000.json"]
    assert not (tmp_path / "two_vs_two.json").exists() and not (tmp_path / ".images").exists()
    seen = []
    result = run_two_vs_two(subject, tmp_path, config, on_layer=seen.append)
    assert result["computed"] == seen == LAYERS  # pixels reused
    check_against_reference(result, expected)
    assert run_two_vs_two(subject, tmp_path, config)["computed"] == []


def test_changed_settings_recompute_every_layer(subject, tmp_path):
    run_two_vs_two(subject, tmp_path, CONFIG)
    again = run_two_vs_two(subject, tmp_path, TwoVsTwoConfig(**{**CONFIG.__dict__, "n_permutations": PERMS + 1}))
    assert again["computed"] == [PIXELS, *LAYERS] and again["n_permutations"] == PERMS + 1
    reseeded = run_two_vs_two(subject, tmp_path, TwoVsTwoConfig(**{**CONFIG.__dict__, "seed": 4}))
    assert reseeded["computed"] == [PIXELS, *LAYERS]
    # the budget and batch size change how, not what: reused
    assert run_two_vs_two(subject, tmp_path, TwoVsTwoConfig(**{**CONFIG.__dict__, "seed": 4, "batch_size": 2,
                                                              "memory_budget_gib": 1e-6}))["computed"] == []
    other = subject._replace(spec=SubjectSpec(world_seed=1))
    assert run_two_vs_two(other, tmp_path, CONFIG)["computed"] == [PIXELS, *LAYERS]


def test_choose_image_sets_takes_the_first_images_and_needs_three_classes():
    labels = np.array([2, 0, 1, 0, 2, 1, 1])
    sets = choose_image_sets(labels, np.ones(3, bool), 2)
    np.testing.assert_array_equal(sets.indices, [[1, 2, 0], [3, 5, 4]])
    with pytest.raises(ValueError, match="at least 3 matched classes"):
        choose_image_sets(labels, np.array([True, True, False]), 2)
    with pytest.raises(ValueError, match="image_sets"):
        choose_image_sets(labels, np.ones(3, bool), 0)


def test_the_quickstart_stage_is_this_pipeline_and_equals_the_in_memory_statistics(tmp_path):
    """The quickstart's 2 vs 2 is run_two_vs_two on the world subject (its summary section a projection of
    two_vs_two.json), and equals analysis.two_vs_two's statistics on every set's activations held at once."""
    from semguard.analysis.quickstart import TWO_VS_TWO_KEYS, QuickstartConfig, two_vs_two_stage
    from semguard.analysis.two_vs_two import image_set_indices, two_vs_two_by_layer
    from semguard.models.inputs import as_model_input
    from semguard.models.worldnet import WorldNet, WorldNetConfig, worldnet_layers, worldnet_spec

    torch.manual_seed(0)
    model = WorldNet(WorldNetConfig(num_classes=6, widths=(8, 8, 16), blocks=(1, 1, 1))).eval()
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(6), 3)
    images = rng.integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8)
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    layers = [i.name for i in worldnet_layers(model.config)]
    subject = Subject("worldnet", model, worldnet_spec(model), layers, [f"c{i}" for i in range(6)], vectors,
                      np.ones(6, bool), ArrayImages(images, labels), SubjectSpec())
    quick = two_vs_two_stage(subject, tmp_path / "quick", QuickstartConfig(out=tmp_path / "quick", image_sets=3,
                                                                           n_permutations=30, seed=1, progress=False))
    record = json.loads((tmp_path / "quick" / "two_vs_two.json").read_text())
    assert list(quick) == list(TWO_VS_TWO_KEYS) and all(quick[k] == record[k] for k in quick)

    sets = image_set_indices(labels, 6, 3)  # (S, w): set s holds the s-th image of each class
    tap = LayerTap(model, layers)
    with torch.no_grad():
        acts = [{k: v.numpy() for k, v in tap(as_model_input(images[idx])).acts.items()} for idx in sets]
    pixels = [{"pixels": images[idx].reshape(len(idx), -1).astype(np.float32)} for idx in sets]
    ref, ref_pixels = (two_vs_two_by_layer(a, vectors, 30, 1, progress=False) for a in (acts, pixels))
    assert quick["layers"] == ref.layers
    np.testing.assert_allclose(quick["accuracy"], ref.accuracy, atol=1e-12)
    np.testing.assert_allclose(quick["spread"], ref.spread, atol=1e-12)
    assert quick["p_value"] == ref.p_value.tolist() and quick["p_bhy"] == pytest.approx(ref.p_bhy.tolist())
    assert quick["pixels"] == pytest.approx(ref_pixels.accuracy[0], abs=1e-12)
    assert quick["pixels_p_value"] == ref_pixels.p_value[0]


def test_the_header_gives_the_accuracy_on_the_set_images_and_a_resumed_run_keeps_it(subject, tmp_path):
    """The tap's logits come with the activations: the accuracy is on the S x w images analysed."""
    result = run_two_vs_two(subject, tmp_path, CONFIG)
    sets = choose_image_sets(subject.images.labels, subject.matched, SETS)
    with torch.no_grad():
        predicted = subject.model(subject.images.load(sets.indices.ravel())).argmax(1).numpy()
    truth = np.asarray(subject.images.labels)[sets.indices.ravel()]
    header = result["header"]
    assert header["images_analysed"] == SETS * (N_CLASSES - 2) and header["accuracy"] == np.mean(predicted == truth)
    assert header["classes_matched"] == N_CLASSES - 1 and header["images_read"] == len(subject.images.labels)
    again = run_two_vs_two(subject, tmp_path, CONFIG)
    assert again["computed"] == [] and again["header"] == header  # nothing computed, the accuracy kept
    assert json.loads((tmp_path / "two_vs_two.json").read_text())["header"] == header
