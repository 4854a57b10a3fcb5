"""attacks.store: atomic shards, torn-manifest repair, refusal to overwrite another set."""
import json

import numpy as np
import pytest

from semguard.attacks.store import MANIFEST_FILE, PARAMS_FILE, SHARD_DIR, load_attack_set, open_attack_set, shard_name

HEADER = {"attack": "mifgsm", "attack_params": {"eps": 0.15}, "n_examples": 7, "shard_size": 3}


def rows(k: int, n: int, size: int = 3) -> list[dict]:
    return [{"id": k * size + i, "source_image": 10 + k * size + i, "source_class": 1, "source_label": "a",
             "target_class": 2, "target_label": "b", "rank": i % 6, "similarity": 0.5, "success": i != 1,
             "predicted_class": 2 if i != 1 else 1, "shard": shard_name(k), "index": i, "attack": "mifgsm",
             "params": {"eps": 0.15}} for i in range(n)]


def images(k: int, n: int) -> np.ndarray:
    return np.random.default_rng(k).random((n, 3, 4, 4), dtype=np.float32)


def write_all(out, shards=(0, 1, 2)):
    writer = open_attack_set(out, HEADER)
    for k in shards:
        n = writer.sizes[k]
        writer.write_shard(k, images(k, n), rows(k, n))
    return writer


def test_roundtrip(tmp_path):
    writer = write_all(tmp_path)
    assert writer.sizes == [3, 3, 1] and writer.pending == []
    s = load_attack_set(tmp_path)
    assert s.complete and len(s) == 7 and [r.id for r in s] == list(range(7))
    np.testing.assert_array_equal(s.images(), np.concatenate([images(0, 3), images(1, 3), images(2, 1)]))
    ok = s.successful()
    assert [r.id for r in ok] == [0, 2, 3, 5, 6] and ok.images().shape == (5, 3, 4, 4)
    np.testing.assert_array_equal(ok.images()[1], images(0, 3)[2])
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_skips_finished_shards(tmp_path):
    write_all(tmp_path, shards=(0,))
    before = (tmp_path / SHARD_DIR / shard_name(0)).stat().st_mtime_ns
    writer = open_attack_set(tmp_path, HEADER)
    assert writer.done == {0} and writer.pending == [1, 2]
    assert not load_attack_set(tmp_path).complete
    with pytest.raises(ValueError, match="already written"):
        writer.write_shard(0, images(0, 3), rows(0, 3))
    assert (tmp_path / SHARD_DIR / shard_name(0)).stat().st_mtime_ns == before


def test_torn_line_and_orphan_rows_repaired(tmp_path):
    write_all(tmp_path, shards=(0, 1))
    manifest = tmp_path / MANIFEST_FILE
    (tmp_path / SHARD_DIR / shard_name(1)).unlink()  # rows of shard 1 without its file
    with open(manifest, "ab") as f:  # a row of shard 2 cut mid-line by a kill
        f.write(json.dumps(rows(2, 1)[0]).encode()[:40])
    assert len(load_attack_set(tmp_path)) == 3  # the reader ignores both without touching the files
    writer = open_attack_set(tmp_path, HEADER)
    assert writer.pending == [1, 2]
    assert [json.loads(line)["id"] for line in manifest.read_text().splitlines()] == [0, 1, 2]
    for k in writer.pending:
        writer.write_shard(k, images(k, writer.sizes[k]), rows(k, writer.sizes[k]))
    s = load_attack_set(tmp_path)
    assert s.complete and [r.id for r in s] == list(range(7))


def test_partial_rows_of_a_shard_dropped(tmp_path):
    write_all(tmp_path)
    manifest = tmp_path / MANIFEST_FILE
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:5]))  # shard 1 lost its last row
    writer = open_attack_set(tmp_path, HEADER)
    assert writer.pending == [1, 2]


def test_different_parameters_refused_nothing_overwritten(tmp_path):
    write_all(tmp_path)
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"different parameters \(attack_params.eps: 0.15 -> 0.1\)"):
        open_attack_set(tmp_path, {**HEADER, "attack_params": {"eps": 0.1}})
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()} == snapshot


def test_foreign_directory_refused(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text('{"something": "else"}\n')
    with pytest.raises(ValueError, match="holds no params.json"):
        open_attack_set(tmp_path, HEADER)
    assert (tmp_path / MANIFEST_FILE).read_text() == '{"something": "else"}\n'
    assert not (tmp_path / PARAMS_FILE).exists()


def test_bad_shard_and_reader_errors(tmp_path):
    writer = open_attack_set(tmp_path / "set", HEADER)
    with pytest.raises(ValueError, match="needs 3 float32 images"):
        writer.write_shard(0, images(0, 3).astype(np.float16), rows(0, 3))
    with pytest.raises(ValueError, match="not an attack set"):
        load_attack_set(tmp_path)
