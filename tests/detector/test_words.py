"""detector.words: loading word2vec / native vectors, label matching, shipped label sets."""
import shutil

import numpy as np
import pytest
from gensim.models import KeyedVectors

from semguard.detector.words import (
    CIFAR100_CLASSES,
    LabelMatch,
    candidate_keys,
    convert_to_native,
    imagenet_labels,
    load_vectors,
    match_labels,
    read_synonyms,
)

DIM = 8
# Extra vocabulary for the synonym and case tests; word2vec stores phrases with underscores.
EXTRA = ["puma", "mountain_lion", "Granny_Smith", "tiger_shark", "New_York", "tabby"]


@pytest.fixture(scope="module")
def reference() -> KeyedVectors:
    kv = KeyedVectors(DIM)
    words = list(CIFAR100_CLASSES) + EXTRA
    kv.add_vectors(words, np.random.default_rng(0).standard_normal((len(words), DIM)).astype(np.float32))
    return kv


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    reference.save_word2vec_format(str(root / "vectors.bin"), binary=True)
    reference.save_word2vec_format(str(root / "vectors.txt"), binary=False)
    lines = (root / "vectors.txt").read_text().splitlines()[1:]
    (root / "glove.txt").write_text("\n".join(lines) + "\n")  # no "count dim" header
    return root


def assert_same(kv: KeyedVectors, reference: KeyedVectors, n: int | None = None):
    n = len(reference) if n is None else n
    assert kv.index_to_key == reference.index_to_key[:n]
    np.testing.assert_allclose(np.asarray(kv.vectors), reference.vectors[:n], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["vectors.bin", "vectors.txt", "glove.txt"])
def test_load_each_format_and_match_all_cifar100(files, reference, name):
    kv = load_vectors(files / name)
    assert_same(kv, reference)
    match = match_labels(kv, CIFAR100_CLASSES)
    assert len(match.matched) == 100 and match.unmatched == []
    assert match.words[CIFAR100_CLASSES.index("maple_tree")] == "maple_tree"
    assert match.vectors.shape == (100, DIM) and match.vectors.dtype == np.float32
    np.testing.assert_allclose(match.vectors, reference.vectors[:100], rtol=1e-6, atol=1e-6)
    assert match.summary() == "matched 100/100 labels (word 91, phrase 9, mean 0)"


def test_cifar100_names_with_spaces_match_underscored_phrases(files):
    kv = load_vectors(files / "vectors.bin")
    spaced = [name.replace("_", " ") for name in CIFAR100_CLASSES]  # "pickup truck" -> "pickup_truck"
    match = match_labels(kv, spaced)
    assert len(match.matched) == 100
    assert match.words[CIFAR100_CLASSES.index("sweet_pepper")] == "sweet_pepper"


def test_format_is_detected_from_content_not_name(files, reference, tmp_path):
    shutil.copy(files / "vectors.bin", tmp_path / "looks_like_text.txt")
    shutil.copy(files / "vectors.txt", tmp_path / "looks_like_binary.bin")
    assert_same(load_vectors(tmp_path / "looks_like_text.txt"), reference)
    assert_same(load_vectors(tmp_path / "looks_like_binary.bin"), reference)


def test_limit_keeps_the_first_words(files, reference):
    for name in ["vectors.bin", "vectors.txt"]:
        kv = load_vectors(files / name, limit=10)
        assert_same(kv, reference, 10)
        match = match_labels(kv, CIFAR100_CLASSES)
        assert match.matched == list(range(10))


def test_synonyms_case_variants_and_unmatched(files):
    kv = load_vectors(files / "vectors.bin")
    labels = [
        "cougar, puma, catamount",          # ImageNet style: first synonym with a vector
        ["cougar", "mountain lion", "puma"],  # list of synonyms, spaces -> underscores
        "granny smith",                      # Title case + underscores
        "TIGER",                             # lower case
        "Tiger Shark",                       # as written + underscores
        "unicorn, snark",                    # nothing
        "Apple",                             # lower case
    ]
    match = match_labels(kv, labels)
    assert match.words == ["puma", "mountain_lion", "Granny_Smith", "tiger", "tiger_shark", None, "apple"]
    assert match.matched == [0, 1, 2, 3, 4, 6] and match.unmatched == [5]
    np.testing.assert_array_equal(match.vectors[2], kv["Granny_Smith"])
    np.testing.assert_array_equal(match.vectors[5], kv["apple"])
    assert match.labels[5] == ["unicorn", "snark"]
    assert match.summary() == "matched 6/7 labels (word 3, phrase 3, mean 0); unmatched (1): 5 'unicorn, snark'"


def test_candidate_keys_order():
    assert candidate_keys("Tiger shark") == [
        "Tiger shark", "Tiger_shark", "tiger shark", "tiger_shark", "Tiger Shark", "Tiger_Shark",
    ]


def test_match_labels_with_nothing_matched(reference):
    match = match_labels(reference, ["unicorn"])
    assert isinstance(match, LabelMatch)
    assert match.vectors.shape == (0, DIM) and match.matched == [] and match.unmatched == [0]


def test_match_labels_rejects_bad_labels(reference):
    with pytest.raises(ValueError, match=r"labels\[1\]: empty"):
        match_labels(reference, ["apple", " , "])
    with pytest.raises(ValueError, match=r"labels\[0\]: expected a string or a list of strings"):
        match_labels(reference, [3])
    with pytest.raises(ValueError, match=r"labels\[0\]: empty"):
        match_labels(reference, [[]])


def test_native_conversion_maps_the_same_vectors(files, reference, tmp_path):
    out = convert_to_native(files / "vectors.bin", tmp_path / "native")
    assert out == tmp_path / "native" and not list(out.glob("*.tmp"))
    mapped = load_vectors(out)
    assert_same(mapped, reference)
    assert isinstance(mapped.vectors, np.memmap) and not mapped.vectors.flags.writeable
    np.testing.assert_array_equal(mapped["maple_tree"], reference["maple_tree"])
    assert mapped.most_similar("apple", topn=1) == reference.most_similar("apple", topn=1)
    in_memory = load_vectors(out, mmap=False)
    assert not isinstance(in_memory.vectors, np.memmap)
    assert_same(in_memory, reference)
    assert_same(load_vectors(out, limit=5), reference, 5)
    assert_same(load_vectors(convert_to_native(files / "vectors.txt", tmp_path / "small", limit=7)), reference, 7)
    assert len(match_labels(mapped, CIFAR100_CLASSES).matched) == 100


def test_gensim_pickle_needs_explicit_trust(reference, tmp_path):
    reference.save(str(tmp_path / "vectors.kv"))
    with pytest.raises(ValueError, match="pickle"):
        load_vectors(tmp_path / "vectors.kv")
    assert_same(load_vectors(tmp_path / "vectors.kv", trust_pickle=True), reference)
    assert_same(load_vectors(tmp_path / "vectors.kv", limit=3, trust_pickle=True), reference, 3)


def test_load_vectors_errors(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_vectors(tmp_path / "missing.bin")
    (tmp_path / "junk.txt").write_text("this is not\na vector file\n")
    with pytest.raises(ValueError, match="not a word2vec"):
        load_vectors(tmp_path / "junk.txt")
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="could not be read"):
        load_vectors(tmp_path / "junk.gz")
    truncated = (files / "vectors.bin").read_bytes()[:500]
    (tmp_path / "truncated.bin").write_bytes(truncated)
    with pytest.raises(ValueError, match="could not be read as word2vec"):
        load_vectors(tmp_path / "truncated.bin")
    for limit in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            load_vectors(files / "vectors.bin", limit=limit)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="lacks words.json"):
        load_vectors(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="not a directory"):
        convert_to_native(files / "vectors.bin", files / "vectors.txt")


def test_cifar100_classes_are_the_official_list():
    assert len(CIFAR100_CLASSES) == 100 and len(set(CIFAR100_CLASSES)) == 100
    assert CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)  # the dataset's fine labels are alphabetical
    assert CIFAR100_CLASSES[:3] == ["apple", "aquarium_fish", "baby"] and CIFAR100_CLASSES[-1] == "worm"
    for name in ["lawn_mower", "maple_tree", "oak_tree", "palm_tree", "pickup_truck", "pine_tree",
                 "sweet_pepper", "willow_tree"]:
        assert name in CIFAR100_CLASSES


def test_imagenet_labels_from_torchvision():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[0] == ["tench"] and labels[-1] == ["toilet tissue"]
    assert all(len(synonyms) == 1 for synonyms in labels)


def test_read_synonyms(tmp_path, reference):
    path = tmp_path / "synonyms.txt"
    path.write_text("n02125311 cougar, puma, catamount\nmaple tree\n  Granny Smith ,apple \n\n")
    classes = read_synonyms(path)
    assert classes == [["cougar", "puma", "catamount"], ["maple tree"], ["Granny Smith", "apple"]]
    assert match_labels(reference, classes).words == ["puma", "maple_tree", "Granny_Smith"]
    path.write_text("apple\n\nbear\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        read_synonyms(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no classes"):
        read_synonyms(path)
    with pytest.raises(FileNotFoundError):
        read_synonyms(tmp_path / "missing.txt")


def test_multi_word_names_by_phrase_token_else_the_mean_of_unit_word_vectors():
    from gensim.models import KeyedVectors

    rng = np.random.default_rng(0)
    vocab = ["tiger_shark", "tiger", "shark", "indigo", "bunting", "bald", "eagle", "three-toed", "sloth", "eater", "man"]
    kv = KeyedVectors(6)
    kv.add_vectors(vocab, rng.normal(size=(len(vocab), 6)).astype(np.float32))
    labels = ["tiger shark", "indigo bunting, indigo finch", "Bald Eagle", "three-toed sloth", "man-eater",
              "snow leopard", "glacier shark, tiger"]
    match = match_labels(kv, labels)
    assert match.words == ["tiger_shark", "indigo+bunting", "bald+eagle", "three-toed+sloth", "man+eater", None,
                           "tiger"]  # a phrase token first; "glacier shark" lacks a word: the next synonym
    assert match.rules == ["phrase", "mean", "mean", "mean", "mean", None, "word"]
    assert match.counts() == {"word": 1, "phrase": 1, "mean": 4}
    unit = lambda w: kv[w] / np.linalg.norm(kv[w])  # noqa: E731
    np.testing.assert_allclose(match.vectors[1], (unit("indigo") + unit("bunting")) / 2, rtol=1e-6)
    np.testing.assert_array_equal(match.vectors[0], kv["tiger_shark"])
    off = match_labels(kv, labels, phrase_mean=False)
    assert off.words == ["tiger_shark", None, None, None, None, None, "tiger"] and off.counts()["mean"] == 0
