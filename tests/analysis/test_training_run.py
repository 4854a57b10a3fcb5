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
from semguard.analysis.training_run import (
    TrainConfig,
    lr_schedule,
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
    lr = lr_schedule(TrainConfig())
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
    from semguard.analysis.training_cli import train_config
    from semguard.analysis.training_run import quick_config

    from semguard.cli import build_parser

    args = build_parser().parse_args(["train", "--quick", "--out", "o", "--epochs", "3", "--permute-labels", "1"])
    assert train_config(args) == quick_config(epochs=3, permute_labels=1)
    assert train_config(build_parser().parse_args(["train", "--out", "o"])) == TrainConfig()
