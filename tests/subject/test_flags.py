"""The subject flags and the TOML file they override (semguard.subject.flags)."""
import argparse
from pathlib import Path

import pytest

from semguard.subject.core import SubjectSpec
from semguard.subject.flags import add_subject_flags, read_subject_toml, subject_spec_from_args


def parse(argv: list[str]) -> SubjectSpec:
    parser = argparse.ArgumentParser()
    add_subject_flags(parser)
    return subject_spec_from_args(parser.parse_args(argv), world_cache="cache/world")


def test_no_flags_is_the_embedded_world():
    spec = parse([])
    assert spec.is_world() and spec.world_cache == Path("cache/world")


def test_toml_paths_resolve_against_its_folder_and_flags_override(tmp_path):
    (tmp_path / "paper.toml").write_text(
        'model = "resnet50"\nweights = "w/resnet50.pth"\nimages = "/data/val"\nlabels = "labels.txt"\n'
        'vectors = "~/vectors.bin"\ninput_size = 224\nmean = [0.5, 0.5, 0.5]\nlayers = ["layer1", "layer2"]\n'
        "trust_pickled_vectors = true\n")
    spec = parse(["--subject", str(tmp_path / "paper.toml"), "--model", "vgg16", "--labels", "mine.txt"])
    assert spec.model == "vgg16"  # the flag wins
    assert spec.weights == tmp_path / "w/resnet50.pth"  # relative to the TOML file
    assert spec.images == Path("/data/val") and spec.vectors == Path("~/vectors.bin").expanduser()
    assert spec.labels == Path("mine.txt")  # a flag's path stays relative to the working directory
    assert spec.input_size == 224 and spec.mean == (0.5, 0.5, 0.5) and spec.layers == ("layer1", "layer2")
    assert spec.trust_pickled_vectors and not spec.is_world()
    assert parse(["--subject", str(tmp_path / "paper.toml"), "--layers", "conv1, layer4"]).layers == ("conv1", "layer4")


def test_unknown_and_dashed_keys_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('model-entry = "pkg:f"\n')
    with pytest.raises(ValueError, match=r"s\.toml: unknown keys \['model-entry'\] \(write model_entry with underscores\)"):
        read_subject_toml(path)
    path.write_text('modle = "resnet50"\n')
    with pytest.raises(ValueError, match=r"unknown keys \['modle'\]; known keys"):
        read_subject_toml(path)


@pytest.mark.parametrize("line, message", [
    ("input_size = -3", "input_size must be a positive integer"),
    ("mean = []", "mean must be a non-empty list of numbers"),
    ('weights = ""', "weights must be a non-empty string"),
    ('trust_pickled_vectors = "yes"', "trust_pickled_vectors must be true or false"),
    ("model = [", "not valid TOML"),
])
def test_bad_values_name_the_file_and_key(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_subject_toml(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_subject_toml(tmp_path / "absent.toml")
