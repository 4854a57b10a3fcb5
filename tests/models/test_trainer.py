"""`semguard train`: a killed run resumes to the same checkpoints, bit for bit; schedule; permuted labels."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from semguard.models.trainer import (
    TrainConfig,
    lr_schedule,
    paper_config,
    train_checkpoints,
    training_set,
)

from tests.analysis.train_worker import TINY, synthetic

WORKER = [sys.executable, "-m", "tests.analysis.train_worker"]
ROOT = Path(__file__).resolve().parents[2]


def digests(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((out / "checkpoints").glob("*.safetensors"))}


def test_killed_run_resumes_to_the_same_checkpoints(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(WORKER + [str(whole)], cwd=ROOT, env=env, check=True, timeout=300)
    proc = subprocess.Popen(WORKER + [str(killed)], cwd=ROOT, env=env)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "epoch-0002.safetensors").exists():  # killed mid-run, after checkpoint 2
        assert proc.poll() is None and time.time() < deadline, "worker ended before its second checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(digests(killed)) < len(digests(whole))
    subprocess.run(WORKER + [str(killed)], cwd=ROOT, env=env, check=True, timeout=300)
    assert digests(killed) == digests(whole) and len(digests(whole)) == TINY.epochs + 1
    a, b = (json.loads((d / "train.json").read_text()) for d in (whole, killed))
    assert a == b and len(a["train_accuracy"]) == TINY.epochs


def test_lr_schedule_divides_by_ten_when_the_remaining_epochs_halve():
    lr = lr_schedule(paper_config())
    assert lr[199] == 0.02 and lr[200] == pytest.approx(0.002) and lr[300] == pytest.approx(2e-4)
    assert lr[350] == pytest.approx(2e-5) and len(lr) == 400


def test_permuted_labels_are_a_fixed_permutation_of_the_subset():
    images, labels = synthetic()
    x, y = training_set(images, labels, replace(TINY, train_subset=40, permute_labels=3))
    assert len(x) == 40 and np.array_equal(np.sort(y), np.sort(labels[:40])) and not np.array_equal(y, labels[:40])
    assert np.array_equal(y, training_set(images, labels, replace(TINY, train_subset=40, permute_labels=3))[1])


def test_permuted_run_stops_once_it_fits(tmp_path):
    images, labels = synthetic()
    config = replace(TINY, train_subset=16, permute_labels=0, epochs=40, checkpoint_every=10, target_accuracy=0.5)
    record = train_checkpoints(images, labels, tmp_path, config)
    assert record["stopped"] and record["checkpoints"][-1]["eval_train_accuracy"] >= 0.5
    assert record["epochs_done"] < 40


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    images, labels = synthetic()
    train_checkpoints(images, labels, tmp_path, replace(TINY, epochs=1))
    with pytest.raises(ValueError, match="other settings"):
        train_checkpoints(images, labels, tmp_path, replace(TINY, epochs=2, lr=0.1))


def test_quick_flag_starts_from_the_reduced_setting_and_flags_override_it():
    from semguard.commands.train import train_config
    from semguard.models.trainer import quick_config

    from semguard.cli import build_parser

    args = build_parser().parse_args(["train", "--quick", "--out", "o", "--epochs", "3", "--permute-labels", "1"])
    assert train_config(args) == quick_config(epochs=3, permute_labels=1)
    assert train_config(build_parser().parse_args(["train", "--out", "o"])) == TrainConfig()
    paper = train_config(build_parser().parse_args(["train", "--paper", "--out", "o", "--max-shift", "4"]))
    assert paper == paper_config(max_shift=4) and paper.model.widths == (64, 128, 256, 512, 512)
    deep = train_config(build_parser().parse_args(["train", "--out", "o", "--columns", "3", "--epochs", "20"]))
    assert deep.model == replace(TrainConfig().model, columns=3) and deep.epochs == 20
    assert quick_config().model == TrainConfig().model  # --quick: the default net on fewer images


def write_cifar_binary(path: Path, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """CIFAR-100's binary records (coarse label, fine label, 3 planes of 32x32); returns the (N, 32, 32, 3) images."""
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([np.stack([labels // 5, labels], 1).astype(np.uint8), planes.reshape(len(labels), -1)], 1)
    path.write_bytes(records.tobytes())
    return planes.transpose(0, 2, 3, 1)


def test_train_reads_cifar100_binary(tmp_path, capsys):
    from semguard.cli import main

    labels = np.arange(12) % 4
    images = write_cifar_binary(tmp_path / "train.bin", labels)
    args = ["train", "--images", str(tmp_path), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "6", "--quiet"]
    assert main(args) == 0  # the default (reduced) net: 2 steps on 12 images
    record = json.loads((tmp_path / "run" / "train.json").read_text())
    assert record["epochs_done"] == 1 and len(record["checkpoints"]) == 2 and "1 epochs, 2 checkpoints" in capsys.readouterr().out
    from semguard.commands.train import training_images
    from semguard.cli import build_parser

    x, y = training_images(build_parser().parse_args(["train", "--images", str(tmp_path / "train.bin"), "--out", "o"]))
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    (tmp_path / "bad.bin").write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit, match="bad.bin"):
        main(["train", "--images", str(tmp_path / "bad.bin"), "--out", str(tmp_path / "r2")])
