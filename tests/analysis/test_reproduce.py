"""`semguard reproduce` on a [[models]] table naming no asset (the embedded world; here a small random
world-like subject stands in for it, so the test takes seconds): every stage, the report beside the
paper's numbers, resuming after a kill, reruns that compute nothing, and the study file's errors."""
import json

import numpy as np
import pytest
import torch

from semguard.analysis import reproduce as study_module
from semguard.analysis.reproduce import PAPER, StudyConfig, read_study
from semguard.cli import main
from semguard.subject import core
from semguard.subject.core import ArrayImages, Subject

N_CLASSES, PER_CLASS, SIZE = 8, 6, 16

STUDY = """
[[models]]
name = "world"

[study]
reference_size = 4
seed = 1

[study.two_vs_two]
image_sets = 3
n_permutations = 20
device = "cpu"

[study.attack]
n_sources = 3
iterations = 5
batch_size = 16
"""


def small_world_subject(spec) -> Subject:
    """A random WorldNet with a least-squares head on class-coloured images: some test images right
    (attackable sources, references), some wrong (the misclassified analysis)."""
    from semguard.models.worldnet import worldnet_spec
    from semguard.models.worldnet import WorldNet, WorldNetConfig, worldnet_layers

    torch.manual_seed(0)
    model = WorldNet(WorldNetConfig(num_classes=N_CLASSES, widths=(8, 8, 16), blocks=(1, 1, 1))).eval()
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(N_CLASSES), PER_CLASS)
    colour = rng.random((N_CLASSES, 1, 1, 3))
    images = np.clip(colour[labels] + 0.6 * rng.random((len(labels), SIZE, SIZE, 3)), 0, 1)
    images = (255 * images).astype(np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        feats = model.flatten(model.pool(model.stage3(model.stage2(model.stage1(model.stem(x))))))
        design = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        target = 10.0 * torch.nn.functional.one_hot(torch.from_numpy(labels), N_CLASSES).double()
        w = torch.linalg.lstsq(design, target).solution
        model.fc.weight.copy_(w[:-1].T.float())
        model.fc.bias.copy_(w[-1].float())
    vectors = rng.normal(size=(N_CLASSES, 10)).astype(np.float32)
    return Subject("worldnet", model, worldnet_spec(model), [i.name for i in worldnet_layers(model.config)],
                   [f"c{i}" for i in range(N_CLASSES)], vectors, np.ones(N_CLASSES, bool), ArrayImages(images, labels),
                   spec)


@pytest.fixture
def world(monkeypatch):
    """The embedded world as load_subject gives it, replaced by the small subject; counts the loads."""
    loads = []

    def load(spec, progress=True):
        loads.append(spec)
        return small_world_subject(spec)

    monkeypatch.setattr(core, "world_subject", load)
    return loads


@pytest.fixture
def study_file(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY)
    return path


def reproduce(study_file, out, *flags):
    assert main(["reproduce", "--subject", str(study_file), "--out", str(out), "--quiet", *flags]) == 0
    return json.loads((out / "study.json").read_text())


def test_the_whole_study_on_the_world_with_the_papers_numbers_beside_ours(world, study_file, tmp_path, capsys):
    out = tmp_path / "out"
    summary = reproduce(study_file, out)
    m = summary["models"]["world"]
    assert m["stages"] == {"two_vs_two": "computed", "attacks": "computed", "one_vs_two": "computed"}
    h = m["headline"]
    assert h["classes_analysed"] == N_CLASSES and h["layers"] == len(m["two_vs_two"]["layers"])
    assert 0 < h["attacks_succeeded"] <= h["attacks_requested"] <= 3 * 6
    assert h["misclassified_count"] >= 1 and 0 <= h["two_vs_two_pixels"] <= 1
    assert summary["paper"] == json.loads(json.dumps(PAPER))
    assert summary["config"]["two_vs_two"]["n_permutations"] == 20 and summary["config"]["seed"] == 1
    for f in ("two_vs_two/two_vs_two_by_layer.png", "one_vs_two/adversarial_one_vs_two_by_layer.png",
              "one_vs_two/misclassified_one_vs_two_by_block.png"):
        assert (out / "world" / f).read_bytes()[:4] == b"\x89PNG"
    two = json.loads((out / "world" / "two_vs_two" / "two_vs_two.json").read_text())
    assert two["seed"] == 1 and two["image_sets"] == 3  # [study] seed reaches every stage
    params = json.loads((out / "world" / "attacks" / "params.json").read_text())
    assert params["generate"]["seed"] == 1 and params["generate"]["n_sources"] == 3
    report = (out / "report.md").read_text()
    assert "## world" in report and "838 of 1000" in report and "596 / 600" in report
    assert f"{h['attacks_succeeded']} / {h['attacks_requested']}" in report
    assert "](world/two_vs_two/two_vs_two_by_layer.png)" in report
    console = capsys.readouterr().out
    printed = json.loads(console[console.index("\n{") + 1:].split("\nwritten:")[0])
    assert printed["world"] == h
    # the console and the model's section start with the subject: its accuracy on the images analysed
    accuracy = m["header"]["accuracy"]
    assert m["header"]["images_analysed"] == N_CLASSES * PER_CLASS and 0 < accuracy < 1
    assert console.startswith("world: subject: worldnet") and f"top-1 accuracy {accuracy:.3f}" in console
    section = report.split("## world")[1]
    assert section.index("top-1 accuracy") < section.index("| | ours | paper |") and "Skipped" not in report


def test_a_rerun_computes_and_loads_nothing(world, study_file, tmp_path):
    out = tmp_path / "out"
    first = reproduce(study_file, out)
    assert len(world) == 1
    second = reproduce(study_file, out)
    assert len(world) == 1  # every stage finished: the subject is not even loaded
    assert second["models"]["world"]["stages"] == {k: "reused" for k in ("two_vs_two", "attacks", "one_vs_two")}
    assert second["models"]["world"]["headline"] == first["models"]["world"]["headline"]


def test_a_killed_run_resumes_at_the_stage_it_was_in(world, study_file, tmp_path, monkeypatch):
    from semguard.analysis import attack_analysis as analysis_cli

    out = tmp_path / "out"
    real = analysis_cli.analyze_attacks

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis_cli, "analyze_attacks", killed)
    with pytest.raises(KeyboardInterrupt):
        reproduce(study_file, out)
    assert not (out / "study.json").exists() and not (out / "world" / "one_vs_two" / "stage.json").exists()
    monkeypatch.setattr(analysis_cli, "analyze_attacks", real)
    resumed = reproduce(study_file, out)
    assert resumed["models"]["world"]["stages"] == {"two_vs_two": "reused", "attacks": "reused",
                                                    "one_vs_two": "computed"}
    # a changed permutation count is computed again where it matters; the attack set is kept
    again = reproduce(study_file, out, "--permutations", "21")
    assert again["models"]["world"]["stages"] == {"two_vs_two": "computed", "attacks": "reused",
                                                  "one_vs_two": "computed"}
    assert again["config"]["two_vs_two"]["n_permutations"] == 21
    # fewer sources: a new attack set replaces the one this study made
    fewer = reproduce(study_file, out, "--permutations", "21", "--sources", "2")
    assert fewer["models"]["world"]["stages"]["attacks"] == "computed"
    assert fewer["models"]["world"]["headline"]["attacks_requested"] <= 2 * 6


def test_the_study_file_shares_keys_and_each_model_overrides_them(tmp_path):
    path = tmp_path / "paper.toml"
    path.write_text("""
images = "imagenet/val"
labels = "LOC_synset_mapping.txt"
vectors = "/data/GoogleNews-vectors-negative300.bin.gz"

[[models]]
model = "resnet50"
weights = "resnet50-0676ba61.pth"

[[models]]
model = "inception_v3"
weights = "inception_v3_google-0cc3c7bd.pth"
images = "imagenet/val299"

[[models]]
name = "world"

[study]
reference_size = 50
[study.two_vs_two]
memory_budget_gib = 2
[study.attack]
n_sources = 10
""")
    study = read_study(path, world_cache=tmp_path / "cache")
    assert [m.name for m in study.models] == ["resnet50", "inception_v3", "world"]
    resnet, inception, world = (m.spec for m in study.models)
    assert resnet.images == tmp_path / "imagenet/val" and resnet.weights == tmp_path / "resnet50-0676ba61.pth"
    assert str(resnet.vectors) == "/data/GoogleNews-vectors-negative300.bin.gz"
    assert inception.images == tmp_path / "imagenet/val299" and inception.labels == resnet.labels
    assert not world.is_world() and world.world_cache == tmp_path / "cache"  # the shared keys reach it
    c = study.config
    assert (c.reference_size, c.two_vs_two.memory_budget_gib, c.attack.n_sources) == (50, 2.0, 10)
    assert c.attack.targets_per_source == 6 and c.two_vs_two.n_permutations == 1000  # the paper's defaults


@pytest.mark.parametrize("text, match", [
    ("", "needs one \\[\\[models\\]\\] table"),
    ("[[models]]\nmodle = 'resnet50'", "unknown keys \\['modle'\\]"),
    ("[[models]]\nmodel = 'resnet50'\n[[models]]\nmodel = 'resnet50'", "two \\[\\[models\\]\\] named 'resnet50'"),
    ("[[models]]\nname = 'a/b'", "needs a name"),
    ("[[models]]\n[study]\nreference_size = 'many'", "reference_size must be int"),
    ("[[models]]\n[study]\nreference_size = 3", "reference_size must be >= 4"),
    ("[[models]]\n[study.two_vs_two]\nseed = 3", "'two_vs_two.seed' \\(set by \\[study\\] seed"),
    ("[[models]]\n[study.attack]\neps = -1", "eps"),
    ("[[models]]\n[study]\nsources = 3", "unknown key 'sources'"),
    ("[[models]\n", "not valid TOML"),
])
def test_a_bad_study_file_is_a_clear_error_naming_it(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        read_study(path)
    assert str(path) in str(error.value)


def test_the_command_names_the_file_on_a_bad_study(tmp_path):
    with pytest.raises(SystemExit, match=f"semguard reproduce: --subject {tmp_path / 'none.toml'}: no such file"):
        main(["reproduce", "--subject", str(tmp_path / "none.toml"), "--out", str(tmp_path / "out")])


def test_study_config_defaults_are_the_papers():
    c = StudyConfig()
    assert (c.two_vs_two.n_permutations, c.two_vs_two.image_sets, c.attack.n_sources,
            c.attack.targets_per_source, c.reference_size) == (1000, 5, 100, 6, 100)
    assert study_module.PAPER["concepts_matched"]["imagenet"] == [838, 1000]


def fit_head(assets, world_cache) -> None:
    """Rewrite the fixture's random resnet18 with a least-squares head on its own features of the
    images, so that some images are right (sources, references) and some wrong (misclassified)."""
    from semguard.subject.core import SubjectSpec, load_subject

    subject = load_subject(SubjectSpec(**assets.spec_kwargs(), world_cache=world_cache), progress=False)
    inner = subject.model.model  # Normalized(resnet18)
    head, inner.fc = inner.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = subject.model(subject.images.load(np.arange(len(subject.images)))).double()
    labels = torch.from_numpy(subject.images.labels).clone()
    labels[::4] = (labels[::4] + 1) % len(subject.classes)  # fitted to another class: these come out wrong
    design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(design, 10.0 * torch.nn.functional.one_hot(labels, len(subject.classes)).double(),
                           driver="gelsd").solution
    with torch.no_grad():
        head.weight.copy_(w[:-1].T.float())
        head.bias.copy_(w[-1].float())
    inner.fc = head
    torch.save(inner.state_dict(), assets.weights)


def test_the_study_on_real_format_assets(tmp_path):
    """A [[models]] table naming a torchvision model, weights file, ImageNet-style folder, labels file and
    word2vec binary (tests/subject/fixtures.py): the same stages through the real-asset loaders."""
    from tests.subject.fixtures import SMALL_STUDY, write_subject_assets

    assets = write_subject_assets(tmp_path / "assets", per_class=6)
    fit_head(assets, tmp_path / ".semguard" / "world")
    study = assets.root / "paper.toml"
    study.write_text(f"""
images = "val"
labels = "{assets.labels.name}"
vectors = "{assets.vectors.name}"
input_size = 64
resize = 72

[[models]]
model = "resnet18"
weights = "weights/{assets.weights.name}"
""" + SMALL_STUDY.format(image_sets=5))
    out = tmp_path / "out"
    summary = reproduce(study, out, "--world-cache", str(tmp_path / ".semguard" / "world"))
    m = summary["models"]["resnet18"]
    assert m["headline"]["classes_analysed"] == assets.n_classes - 1  # "tiger shark" has no vector
    assert m["two_vs_two"]["left_out"]["unmatched"] == 1 and len(m["two_vs_two"]["layers"]) >= 8
    assert m["subject"]["weights"] == str(assets.weights.resolve())
    assert "## resnet18" in (out / "report.md").read_text()
    assert reproduce(study, out, "--world-cache", str(tmp_path / ".semguard" / "world"))["models"]["resnet18"][
        "stages"] == {k: "reused" for k in ("two_vs_two", "attacks", "one_vs_two")}


def test_a_model_right_on_no_class_with_a_vector_still_gets_its_2_vs_2(monkeypatch, study_file, tmp_path):
    """Nothing to attack and no reference for 1 vs 2: both are skipped with their reasons, 2 vs 2 runs."""
    def load(spec, progress=True):
        s = small_world_subject(spec)
        with torch.no_grad():  # always class 0, which has no word vector
            s.model.fc.weight.zero_()
            s.model.fc.bias.copy_(torch.arange(N_CLASSES, 0, -1).float())
        matched = np.arange(N_CLASSES) != 0
        return s._replace(matched=matched, word_vectors=np.where(matched[:, None], s.word_vectors, 0))

    monkeypatch.setattr(core, "world_subject", load)
    out = tmp_path / "out"
    m = reproduce(study_file, out)["models"]["world"]
    nothing = {"reason": "no concept with a word vector has a correctly classified image to attack", "count": 0}
    assert m["attacks"]["skipped"] == m["adversarial_one_vs_two"]["skipped"] == nothing
    assert m["attacks"]["requested"] == 0 and m["attacks"]["eps"] is None  # the section keeps its keys
    assert m["misclassified"]["skipped"] == {"reason": "only 0 concepts have a correctly predicted image; 1 vs 2 "
                                                       "needs at least 4", "count": 0}
    assert "skipped" not in m["two_vs_two"] and m["headline"]["classes_analysed"] == N_CLASSES - 1
    assert m["header"]["accuracy"] == 0.0
    report = (out / "report.md").read_text()
    assert "WARNING: top-1 accuracy 0.000 is below 0.6" in report and f"- adversarial_one_vs_two: {nothing['reason']}" in report
    assert "- attacks:" not in report  # one reason, said once
    again = reproduce(study_file, out)["models"]["world"]  # a rerun reuses the skipped stages
    assert again["stages"] == {k: "reused" for k in ("two_vs_two", "attacks", "one_vs_two")}
