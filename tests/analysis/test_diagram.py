"""`semguard analyze diagram`: every tapped layer drawn once, from the same trace the taps use."""
import json

import pytest
from semguard.analysis.diagram import Placed, block_layout, diagram_model, draw_diagram, load_results
from semguard.models.presets import preset_layers

from semguard.cli import main


@pytest.mark.parametrize("arch, n_taps", [("resnet50", 49), ("inception_v3", 94 + 11)])
def test_diagram_draws_every_tapped_layer_once(arch, n_taps, tmp_path):
    model, infos = diagram_model(arch)  # random (meta) weights, no download
    layers = preset_layers(arch)
    results = {"layers": layers[::2], "accuracy": [0.7] * len(layers[::2]), "p_bhy": [0.01] * len(layers[::2])}
    (tmp_path / "r.json").write_text(json.dumps(results))
    drawn = draw_diagram(model, infos, tmp_path / f"{arch}.png", results=load_results(tmp_path / "r.json"))
    assert len(drawn.labels) == n_taps and sorted(drawn.labels) == sorted(layers)
    assert drawn.blocks == list(dict.fromkeys(i.block for i in infos)) and drawn.edges > 0
    assert (tmp_path / f"{arch}.png").stat().st_size > 10_000


def test_diagram_command_writes_svg(tmp_path, capsys):
    assert main(["analyze", "diagram", "--model", "resnet50", "--out", str(tmp_path / "r.svg")]) == 0
    assert "49 tapped layers in 17 blocks" in capsys.readouterr().out
    assert (tmp_path / "r.svg").read_text().count("<svg") == 1


def test_results_without_scores_are_refused(tmp_path):
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(ValueError, match="results:"):
        load_results(tmp_path / "r.json")


def test_branches_stand_side_by_side_and_a_join_spans_them():
    # an Inception-like module: a 1-layer branch, a 2-layer branch, a fork, then a concatenation of all
    names = ["a", "b1", "b2", "c1", "c2a", "c2b", "cat"]
    parents = {"b2": ["b1"], "c2a": ["c1"], "c2b": ["c1"], "cat": ["a", "b2", "c2a", "c2b"]}
    got = block_layout(names, parents)
    assert got["a"] == Placed(0, (0, 0)) and got["b1"] == Placed(0, (1, 1)) and got["b2"] == Placed(1, (1, 1))
    assert got["c1"] == Placed(0, (2, 2)) and got["c2a"] == Placed(1, (2, 2)) and got["c2b"] == Placed(1, (3, 3))
    assert got["cat"] == Placed(2, (0, 3))
    assert block_layout(["x", "y", "z"], {"y": ["x"], "z": ["y"]}) == {n: Placed(i, (0, 0)) for i, n in enumerate("xyz")}
