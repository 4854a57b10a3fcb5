"""`semguard train --quick` then `semguard analyze training` on the default world, through the command line.

Slow-ish: renders the default world (~20-50 s), trains 3 epochs on 5000 images and analyses 4 checkpoints.
"""
import json

import numpy as np
from semguard.models.trainer import quick_config
from semguard.cli import main
from semguard.models.fractalnet import fractalnet_layers


def test_quick_train_and_analysis_run_end_to_end(tmp_path):
    cache, run, analysis = tmp_path / "world", tmp_path / "run", tmp_path / "analysis"
    assert main(["train", "--quick", "--out", str(run), "--world-cache", str(cache), "--quiet"]) == 0
    record = json.loads((run / "train.json").read_text())
    config = quick_config()
    assert record["settings"]["train_subset"] == config.train_subset == 5000
    assert [c["epoch"] for c in record["checkpoints"]] == [0, 1, 2, 3]
    assert len(record["train_accuracy"]) == 3
    # the world's chance plateau (BENCHMARKS, Training dynamics): 15000 training images do not leave it
    assert all(c["eval_train_accuracy"] < 0.05 for c in record["checkpoints"])

    assert main(["analyze", "training", "--checkpoints", str(run), "--out", str(analysis), "--permutations", "50",
                 "--world-cache", str(cache), "--quiet"]) == 0
    summary = json.loads((analysis / "training.json").read_text())
    true = summary["runs"]["true_labels"]
    layers = [info.name for info in fractalnet_layers(config.model)]
    acc = np.asarray(true["accuracy"])
    assert true["epochs"] == [0, 1, 2, 3] and acc.shape == (4, len(layers))
    assert np.all((acc >= 0) & (acc <= 1)) and np.all(np.asarray(true["p_bhy"]) <= 1)
    assert summary["n_permutations"] == 50 and "permuted_labels" not in summary["runs"]
    for figure in ("training_heatmap.png", "training_by_block.png"):
        assert (analysis / figure).stat().st_size > 10_000
