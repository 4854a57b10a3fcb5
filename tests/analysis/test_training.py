"""`semguard analyze training`: per-checkpoint 2 vs 2 against a loop reference, resumption, figures."""
import json
from dataclasses import replace

import numpy as np
import torch
from semguard.analysis.training import (
    TrainingAnalysisConfig,
    analyze_training,
    first_reaching,
)
from semguard.models.trainer import train_checkpoints
from semguard.detector.layers import LayerTap
from semguard.models.fractalnet import fractalnet_layers, load_fractalnet
from semguard.models.inputs import as_model_input

from tests.analysis.train_worker import TINY, synthetic
from tests.detector.test_rsa import correlation_matrix_loop, two_vs_two_pairs_loop

W, SETS = 7, 3  # concepts, image sets


def make_data():
    rng = np.random.default_rng(5)
    labels = np.tile(np.arange(W), SETS)
    images = (rng.integers(0, 100, (W * SETS, 16, 16, 3)) + 20 * labels[:, None, None, None]).astype(np.uint8)
    return images, labels, rng.normal(size=(W, 5)).astype(np.float32)


def loop_reference(path, images, labels, vectors) -> np.ndarray:
    """(L,) mean over image sets of the loop 2 vs 2 of each tapped layer of one checkpoint."""
    model = load_fractalnet(path)
    tap = LayerTap(model, [i.name for i in fractalnet_layers(model.config)])
    c_d = correlation_matrix_loop(vectors.astype(np.float64))
    upper = np.triu_indices(W, 1)
    per_set = []
    for s in range(SETS):
        idx = [np.flatnonzero(labels == c)[s] for c in range(W)]
        with torch.no_grad():
            acts = tap(as_model_input(images[idx])).acts
        per_set.append([two_vs_two_pairs_loop(correlation_matrix_loop(a.double().numpy()), c_d)[upper].mean()
                        for a in acts.values()])
    return np.mean(per_set, axis=0)


def test_three_checkpoints_match_the_loop_reference_and_resume(tmp_path, monkeypatch):
    train_images, train_labels = synthetic()
    run = tmp_path / "run"
    train_checkpoints(train_images, train_labels, run, replace(TINY, epochs=2))  # epochs 0, 1, 2
    permuted = tmp_path / "perm"
    train_checkpoints(train_images, train_labels, permuted, replace(TINY, epochs=1, permute_labels=1, train_subset=32))
    images, labels, vectors = make_data()
    config = TrainingAnalysisConfig(image_sets=SETS, n_permutations=20)
    summary = analyze_training(run, tmp_path / "out", images, labels, vectors, config, permuted=permuted)
    true = summary["runs"]["true_labels"]
    assert true["epochs"] == [0, 1, 2] and summary["runs"]["permuted_labels"]["epochs"] == [0, 1]
    for epoch, acc in zip(true["epochs"], true["accuracy"]):
        want = loop_reference(run / "checkpoints" / f"epoch-{epoch:04d}.safetensors", images, labels, vectors)
        np.testing.assert_allclose(acc, want, atol=1e-9)
    for name in ("training.json", "training_heatmap.png", "training_by_block.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "training.json").read_text())["findings"]["permuted_train_accuracy"] is not None

    # resumable per checkpoint: a second run recomputes only the checkpoint whose result is missing
    (tmp_path / "out" / "true_labels" / "epoch-0001.json").unlink()
    calls = []
    from semguard.analysis import training

    real = training.checkpoint_scores
    monkeypatch.setattr(training, "checkpoint_scores", lambda path, *a: calls.append(path.name) or real(path, *a))
    again = analyze_training(run, tmp_path / "out", images, labels, vectors, config, permuted=permuted)
    assert calls == ["epoch-0001.safetensors"]
    stale = tmp_path / "out" / "true_labels" / "epoch-0002.json"  # as if from another run's checkpoint
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "key": {"checkpoint_sha256": "other"}}))
    analyze_training(run, tmp_path / "out", images, labels, vectors, config)
    assert calls == ["epoch-0001.safetensors", "epoch-0002.safetensors"]
    np.testing.assert_allclose(again["runs"]["true_labels"]["accuracy"], true["accuracy"])


def test_first_reaching_ninety_percent_of_final():
    assert first_reaching(np.array([0.5, 0.6, 0.85, 0.9]), [0, 5, 10, 15]) == 10
