"""`semguard reproduce` on a small real-format sample (issue 25): a model that misclassifies none of the
images still gets its 2 vs 2 and attack analyses, and the report says the misclassified study was
skipped, why, and on how many images; the report and the console start with the subject."""
import json

import pytest

from semguard.cli import main
from tests.subject.fixtures import INPUT_SIZE, RESIZE, SMALL_STUDY, write_subject_assets

STUDY = """
images = "val"
labels = "LOC_synset_mapping.txt"
vectors = "vectors.bin"

[[models]]
name = "small"
model = "resnet18"
weights = "weights/resnet18-6cls.pth"
input_size = {input_size}
resize = {resize}
""" + SMALL_STUDY


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_subject_assets(tmp_path_factory.mktemp("small"), per_class=3)  # fitted: every image right


def study(assets, out, capsys, image_sets: int = 3) -> tuple[dict, str, str]:
    path = assets.root / f"study-{image_sets}.toml"
    path.write_text(STUDY.format(input_size=INPUT_SIZE, resize=RESIZE, image_sets=image_sets))
    assert main(["reproduce", "--subject", str(path), "--out", str(out), "--quiet",
                 "--world-cache", str(assets.root / "cache")]) == 0
    return json.loads((out / "study.json").read_text()), (out / "report.md").read_text(), capsys.readouterr().out


def test_a_model_that_misclassifies_nothing_still_gets_its_report(assets, tmp_path, capsys):
    summary, report, console = study(assets, tmp_path / "out", capsys)
    m = summary["models"]["small"]
    reason = "the model misclassifies no test image of a class with a word vector"
    assert m["misclassified"]["skipped"] == {"reason": reason, "count": 0}
    assert m["misclassified"]["count"] == 0 and m["misclassified"]["accuracy"] == []  # the keys are kept
    assert m["headline"]["misclassified_significant_layers"] is None
    # the rest of the study ran
    assert "skipped" not in m["two_vs_two"] and len(m["two_vs_two"]["accuracy"]) == len(m["two_vs_two"]["layers"])
    assert m["attacks"]["succeeded"] >= 1 and "skipped" not in m["adversarial_one_vs_two"]
    analysis = json.loads((tmp_path / "out" / "small" / "one_vs_two" / "analysis.json").read_text())
    assert analysis["misclassified"]["skipped"]["reason"] == reason
    assert not (tmp_path / "out" / "small" / "one_vs_two" / "misclassified_one_vs_two_by_block.png").exists()
    assert f"- misclassified_one_vs_two: {reason} (count: 0)" in report
    assert "misclassified_one_vs_two_by_block.png" not in report and "adversarial_one_vs_two_by_layer.png" in report
    # the subject first: preprocessing and accuracy on the images analysed (5 matched classes x 3 images)
    header = m["header"]
    assert header["accuracy"] == 1.0 and header["images_analysed"] == 15 and header["images_read"] == 18
    assert header["preprocessing"]["input_size"] == INPUT_SIZE and header["preprocessing"]["resize"] == RESIZE
    section = report.split("## small")[1]
    for text in (f"{INPUT_SIZE} x {INPUT_SIZE} centre crop of the short side resized to {RESIZE} (bilinear)",
                 "mean (0.485, 0.456, 0.406)", "5 of 6 have a word vector", "18 read, 0 skipped",
                 "top-1 accuracy 1.000 on the 15 images analysed"):
        assert text in section.split("| | ours | paper |")[0], text
        assert text in console.split("{")[0], text
    assert f"skipped misclassified_one_vs_two: {reason} (count: 0)" in console


def test_too_few_images_for_the_image_sets_skips_the_2_vs_2_only(assets, tmp_path, capsys):
    summary, report, _ = study(assets, tmp_path / "out", capsys, image_sets=5)  # 3 images a class
    m = summary["models"]["small"]
    assert m["two_vs_two"]["skipped"]["count"] == 0 and "2 vs 2 needs at least 3" in m["two_vs_two"]["skipped"]["reason"]
    assert m["two_vs_two"]["left_out"]["too_few_images"] and m["headline"]["two_vs_two_first_layer"] is None
    assert m["attacks"]["succeeded"] >= 1 and "- two_vs_two: 2 vs 2 needs at least 3" in report
    assert "two_vs_two_by_layer.png" not in report


def test_attack_analyze_reports_the_skipped_study_and_starts_with_the_subject(assets, tmp_path, capsys):
    study(assets, tmp_path / "out", capsys)
    args = ["attack", "analyze", "--attack-set", str(tmp_path / "out" / "small" / "attacks"), "--out",
            str(tmp_path / "analysis"), "--permutations", "10", "--reference-size", "4", "--quiet"]
    assert main(args) == 0  # the subject: the one the set records
    console = capsys.readouterr().out
    assert console.startswith("subject: resnet18 (weights ") and "top-1 accuracy 1.000 on the 15 images" in console
    printed = json.loads(console[console.index("\n{") + 1:].split("\nfigures and")[0])
    assert printed["misclassified_count"] == 0 and printed["misclassified_mean_cosine"] is None
    assert printed["misclassified_skipped"]["count"] == 0 and "adversarial_skipped" not in printed
