"""`semguard analyze training` on a subject: FractalNet checkpoints on CIFAR-100 binary images and a
word2vec file, a folder of a user's resnet18 state dicts (--model resnet18), and the errors; each
against a loop reference."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from semguard.models.trainer import train_checkpoints
from semguard.cli import main
from semguard.detector.layers import LayerTap
from semguard.models.graph import relu_nodes
from semguard.detector.significance import bhy
from semguard.models.fractalnet import fractalnet_layers, load_fractalnet
from semguard.models.inputs import as_model_input
from semguard.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalized

from tests.models.test_trainer import write_cifar_binary
from tests.analysis.train_worker import TINY, synthetic
from tests.detector.test_rsa import correlation_matrix_loop, two_vs_two_pairs_loop
from tests.subject.fixtures import write_image

SETS = 2  # image sets
# CIFAR-100 classes 0..6: apple, aquarium_fish, baby, bear, beaver, bed, bee. aquarium_fish has no vector; bee
# has one but a single test image (fewer than SETS): neither is a concept.
WORDS = ["apple", "baby", "bear", "beaver", "bed", "bee", "river"]
CONCEPTS = [0, 2, 3, 4, 5]


def write_vectors(path, seed: int):
    from gensim.models import KeyedVectors

    vectors = np.random.default_rng(seed).standard_normal((len(WORDS), 8)).astype(np.float32)
    kv = KeyedVectors(8)
    kv.add_vectors(WORDS, vectors)
    kv.save_word2vec_format(str(path), binary=True)
    return dict(zip(WORDS, vectors))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """cifar-100-binary/ with a test.bin (the held-out split) and a train.bin of other images, and vectors."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-binary"
    folder.mkdir()
    labels = np.array([0, 1, 2, 3, 4, 5, 6] + [5, 4, 3, 2, 1, 0] + [0, 2, 3, 4, 5], np.int64)
    pixels = write_cifar_binary(folder / "test.bin", labels, seed=1)  # (N, 32, 32, 3)
    write_cifar_binary(folder / "train.bin", labels, seed=2)
    vectors = write_vectors(root / "vectors.bin", seed=3)
    matrix = np.stack([vectors[w] for w in ("apple", "baby", "bear", "beaver", "bed")])  # (5, 8) concept order
    return {"folder": folder, "pixels": pixels, "labels": labels, "vectors": root / "vectors.bin", "matrix": matrix,
            "root": root}


@pytest.fixture(scope="module")
def fractal_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train_checkpoints(*synthetic(), run, replace(TINY, epochs=1))  # epochs 0, 1
    return run


def loop_reference(tap: LayerTap, inputs, labels, vectors) -> np.ndarray:
    """(L,) mean over image sets of the loop 2 vs 2 per tapped layer; inputs(indices) -> model input."""
    c_d = correlation_matrix_loop(vectors.astype(np.float64))
    upper = np.triu_indices(len(CONCEPTS), 1)
    per_set = []
    for s in range(SETS):
        idx = [np.flatnonzero(labels == c)[s] for c in CONCEPTS]
        with torch.no_grad():
            acts = tap(inputs(idx)).acts
        per_set.append([two_vs_two_pairs_loop(correlation_matrix_loop(a.double().numpy()), c_d)[upper].mean()
                        for a in acts.values()])
    return np.mean(per_set, axis=0)


def analyze(checkpoints, out, cifar, *extra) -> dict:
    assert main(["analyze", "training", "--checkpoints", str(checkpoints), "--out", str(out), "--images",
                 str(cifar["folder"]), "--vectors", str(cifar["vectors"]), "--image-sets", str(SETS),
                 "--permutations", "10", "--world-cache", str(cifar["root"] / "world"), "--quiet", *extra]) == 0
    return json.loads((out / "training.json").read_text())


def test_fractalnet_checkpoints_on_cifar_test_images_match_the_loop_reference(cifar, fractal_run, tmp_path,
                                                                              monkeypatch):
    summary = analyze(fractal_run, tmp_path / "an", cifar)
    true = summary["runs"]["true_labels"]
    assert summary["concepts"] == ["apple", "baby", "bear", "beaver", "bed"] and true["epochs"] == [0, 1]
    for epoch, acc in zip(true["epochs"], true["accuracy"]):
        model = load_fractalnet(fractal_run / "checkpoints" / f"epoch-{epoch:04d}.safetensors")
        tap = LayerTap(model, [i.name for i in fractalnet_layers(model.config)])
        want = loop_reference(tap, lambda idx: as_model_input(cifar["pixels"][idx]), cifar["labels"], cifar["matrix"])
        np.testing.assert_allclose(acc, want, atol=1e-9)
    assert true["layers"] == [i.name for i in fractalnet_layers(TINY.model)]

    # resumable: the same subject reuses every checkpoint, another vectors file recomputes them
    from semguard.analysis import training

    calls = []
    real = training.checkpoint_scores
    monkeypatch.setattr(training, "checkpoint_scores", lambda path, *a: calls.append(path.name) or real(path, *a))
    analyze(fractal_run, tmp_path / "an", cifar)
    assert calls == []
    write_vectors(cifar["root"] / "other.bin", seed=4)
    analyze(fractal_run, tmp_path / "an", {**cifar, "vectors": cifar["root"] / "other.bin"})
    assert calls == ["epoch-0000.safetensors", "epoch-0001.safetensors"]


def test_own_resnet18_checkpoints_every_epoch_and_layer(cifar, tmp_path):
    import torchvision

    folder = tmp_path / "ckpts"
    folder.mkdir()
    names = {1: "epoch_1.pt", 2: "epoch-0002.safetensors", 10: "epoch_10.pt"}  # epoch 10 after 2 (not by name)
    for seed, (epoch, name) in enumerate(names.items()):
        torch.manual_seed(seed)
        state = torchvision.models.resnet18(num_classes=100).state_dict()
        torch.save(state, folder / name) if name.endswith(".pt") else save_file(state, str(folder / name))
    (folder / "notes.txt").write_text("not a checkpoint")
    summary = analyze(folder, tmp_path / "an", cifar, "--model", "resnet18", "--input-size", "32", "--resize", "32")
    true = summary["runs"]["true_labels"]
    model = torchvision.models.resnet18(num_classes=100).eval()
    assert true["epochs"] == [1, 2, 10] and true["layers"] == relu_nodes(model)
    assert np.asarray(true["accuracy"]).shape == (3, len(true["layers"])) == (3, 17)
    assert true["blocks"][:2] == ["relu", "layer1"] and true["blocks"][-1] == "layer4"
    assert summary["subject"]["model"] == "resnet18"

    model.load_state_dict(torch.load(folder / "epoch_10.pt", weights_only=True))
    tap = LayerTap(Normalized(model, IMAGENET_MEAN, IMAGENET_STD), true["layers"])
    want = loop_reference(tap, lambda idx: as_model_input(cifar["pixels"][idx]), cifar["labels"], cifar["matrix"])
    np.testing.assert_allclose(true["accuracy"][2], want, atol=1e-9)


def test_layers_in_passes_under_a_small_memory_budget_give_the_same_numbers(cifar, fractal_run, tmp_path):
    from semguard.analysis.training import TrainingAnalysisConfig, analyze_training

    labels = cifar["labels"][np.isin(cifar["labels"], CONCEPTS)]
    pixels = cifar["pixels"][np.isin(cifar["labels"], CONCEPTS)]
    dense = np.searchsorted(CONCEPTS, labels)  # concepts 0..4
    runs = {}
    for budget in (4.0, 1e-9):  # one pass; one pass per layer
        config = TrainingAnalysisConfig(image_sets=SETS, n_permutations=10, memory_budget_gib=budget)
        runs[budget] = analyze_training(fractal_run, tmp_path / str(budget), pixels, dense, cifar["matrix"],
                                        config)["runs"]["true_labels"]
    for key in ("layers", "accuracy", "p_bhy"):
        assert runs[4.0][key] == runs[1e-9][key]
    one = json.loads((tmp_path / "1e-09" / "true_labels" / "epoch-0001.json").read_text())
    np.testing.assert_allclose(one["p_bhy"], bhy(one["p_value"]))  # BHY across all layers, not per pass
    with pytest.raises(SystemExit, match="--memory-budget must be > 0"):
        analyze(fractal_run, tmp_path / "an", cifar, "--memory-budget", "0")


@pytest.mark.parametrize("files, message", [
    (["final.pt", "best.safetensors"], "no file name holds an epoch number"),
    (["epoch_5.pt", "ckpt-05.safetensors"], "both epoch 5"),
])
def test_checkpoint_names_without_or_with_the_same_epoch_are_refused(cifar, tmp_path, files, message):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"")  # refused before any file is read
    with pytest.raises(SystemExit, match=f"{folder}.*{message}"):
        analyze(folder, tmp_path / "an", cifar, "--model", "resnet18")


def test_fractalnet_checkpoints_refuse_images_of_another_size(fractal_run, tmp_path):
    from tests.subject.fixtures import write_vectors as write_fish_vectors

    images = tmp_path / "val64"
    for c, name in enumerate(["tench", "goldfish", "hammerhead"]):
        (images / name).mkdir(parents=True)
        for k in range(SETS):
            write_image(images / name / f"{k}.png", np.full((64, 64, 3), 40 * c + k, np.uint8))
    vectors, _ = write_fish_vectors(tmp_path)
    with pytest.raises(SystemExit, match="FractalNet checkpoints take 32 x 32 images.* is 64 x 64"):
        main(["analyze", "training", "--checkpoints", str(fractal_run), "--out", str(tmp_path / "an"), "--images",
              str(images), "--vectors", str(vectors), "--image-sets", str(SETS), "--world-cache",
              str(tmp_path / "world"), "--quiet"])


def test_other_files_without_model_are_refused_with_a_hint(cifar, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_file({"fc.weight": torch.zeros(2, 2)}, str(folder / "epoch-0001.safetensors"))
    with pytest.raises(SystemExit, match="not a semguard training checkpoint.*give --model"):
        analyze(folder, tmp_path / "an", cifar)
    with pytest.raises(SystemExit, match="--input-size: FractalNet checkpoints .* 32 x 32"):
        analyze(folder, tmp_path / "an", cifar, "--input-size", "32")
