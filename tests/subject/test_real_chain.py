"""Every command on a real-format ImageNet stand-in, no workaround (issue 27): id-less labels with two "crane"
and two "maillot", a model with ReLU6 / Hardswish / GELU and no ReLU (--model-entry, normalisation from the
factory), multi-word class names against word-level .npy + Parquet vectors, and too few images to calibrate."""
import json
import sys

import pytest

from semguard.cli import main
from tests.subject.imagenet_standin import CLASSES, PER_CLASS, write_standin


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    assets = write_standin(root / "assets", module=f"standin_models_{root.name.replace('-', '_')}")
    sys.path.insert(0, str(assets.root))
    yield assets, root
    sys.path.remove(str(assets.root))
    sys.modules.pop(assets.module, None)


@pytest.mark.slow
def test_every_command_runs_on_the_standin_without_a_workaround(standin, capsys):
    assets, root = standin
    subject = [*assets.flags(), "--world-cache", str(root / ".semguard" / "world")]

    assert main(["analyze", "two-vs-two", *subject, "--out", str(root / "2v2"), "--image-sets", str(PER_CLASS),
                 "--permutations", "20", "--quiet"]) == 0
    err = capsys.readouterr().err
    # non-ReLU activations tapped by default, counted, with how to override
    assert "layers: tapping 3 activation outputs of" in err and "(ReLU6 1, Hardswish 1, gelu 1)" in err
    assert "--layers a,b,c" in err
    # multi-word names: tiger_shark by its phrase token, indigo bunting and bald eagle by their words' mean
    assert "8 of 8 classes have a word vector (5 by a word, 1 by a phrase token, 2 by the mean of their words)" in err

    assert main(["attack", "generate", *subject, "--out", str(root / "set"), "--sources", "8",
                 "--targets-per-source", "2", "--iterations", "3", "--quiet"]) == 0
    header = json.loads((root / "set" / "params.json").read_text())
    names = header["label_names"]
    assert names[0] == "crane (#0)" and names[3] == "crane (#3)" and names[4] == "maillot (#4)"  # a class is its index
    assert len(names) == len(CLASSES) == len(set(names))
    capsys.readouterr()

    assert main(["attack", "analyze", "--attack-set", str(root / "set"), "--out", str(root / "analysis"),
                 "--permutations", "10", "--reference-size", "4", "--trust-model-code", "--quiet"]) == 0
    analysis = json.loads((root / "analysis" / "analysis.json").read_text())
    assert analysis["attacks"]["requested"] == 16 and analysis["misclassified"]["count"] == 0  # all photos right
    assert "skipped" in analysis["misclassified"]
    # one image per tapped pass (a budget of ~1 KiB): the same analysis, streamed
    assert main(["attack", "analyze", "--attack-set", str(root / "set"), "--out", str(root / "streamed"),
                 "--permutations", "10", "--reference-size", "4", "--memory-budget", "1e-6", "--trust-model-code",
                 "--quiet"]) == 0
    streamed = json.loads((root / "streamed" / "analysis.json").read_text())
    assert streamed["adversarial_one_vs_two"] == analysis["adversarial_one_vs_two"]

    with pytest.raises(SystemExit, match=r"24 clean images are too few for a false-positive rate of 0.05: .* needs >= "
                                         r"100; give >= 400 clean images .* nothing was written"):
        main(["detector", "calibrate", *subject, "--out", str(root / "bundle"), "--quiet"])
    assert not (root / "bundle").exists()
    # forced, the degenerate bundle (one constant score, threshold equal to it) is refused, not written
    with pytest.raises(SystemExit, match=r"the fitted score is the constant .* on all 4 held-out clean images"):
        main(["detector", "calibrate", *subject, "--out", str(root / "bundle"), "--allow-few-images", "--quiet"])
    assert not (root / "bundle").exists()
