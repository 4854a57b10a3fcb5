"""Class lists: text with synonyms and WordNet ids, JSON; duplicates refused (semguard.subject.labels)."""
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
    ("crane\nheron\nCrane\n", r"line 3 repeats class 'Crane' of line 1 \(classes with one name need ids"),
    ('["a", "b", "a"]', r"item 2 repeats class 'a' of item 0"),
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
