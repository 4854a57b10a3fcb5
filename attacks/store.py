"""Attack sets on disk (ARCHITECTURE.md, Formats): a directory that a kill -9 cannot corrupt.

    params.json      what the set is: attack and its parameters, model hash, plan hash, sizes
    manifest.jsonl   one JSON row per example (source image id, source/target label, target
                     similarity rank, success, shard, index, attack parameters)
    shards/shard-00000.npz   images (n, C, H, W) float32, ids (n,) int64; no pickle

Images are stored as float32, exactly as the attack returned them, so every image stays
inside its eps ball and [0, 1] (uint8 would round some pixels out of the ball).

Crash safety: a shard is written to a temp file, fsynced and renamed into place; only
then are its manifest rows appended in one write and fsynced. On reopening, a torn last
line is cut off, and rows of a shard that is incomplete or whose file is missing are
dropped, so that shard is recomputed; complete shards are never recomputed.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from semguard.files import TMP_SUFFIX as _TMP  # leftovers of a killed run are removed
from semguard.files import atomic_path, loads_json, read_json

FORMAT = "semguard.attack_set/1"
PARAMS_FILE = "params.json"
MANIFEST_FILE = "manifest.jsonl"
SHARD_DIR = "shards"


_SHARD_NAME = re.compile(r"shard-\d{5,}\.npz")  # shard_name's output: never a path


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


@dataclass(frozen=True)
class AttackRecord:
    """One manifest row. source_image: index of the clean image in the test set."""

    id: int
    source_image: int
    source_class: int
    source_label: str
    target_class: int
    target_label: str
    rank: int  # target similarity rank: 0 most similar .. n_targets - 1 least similar
    similarity: float  # correlation of source and target word vectors
    success: bool  # the model predicts the target on the adversarial image
    predicted_class: int
    shard: str
    index: int  # row in the shard
    attack: str
    params: dict = field(hash=False, compare=False)


_RECORD_FIELDS = tuple(f.name for f in fields(AttackRecord))


def _atomic_write(path: Path, write) -> None:
    """write(file) into path.tmp, fsync, rename over path, fsync the directory."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        write(f)


def _read_rows(path: Path) -> tuple[list[dict], int]:
    """Rows of a manifest and the byte length of its whole lines (a torn last line is ignored)."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1  # a line without its newline was cut by a kill
    rows = []
    for number, line in enumerate(data[:good].splitlines(), 1):
        try:
            row = loads_json(line, f"{path} line {number}")
        except ValueError as err:
            raise ValueError(f"{err}; the manifest is corrupt") from None
        if not isinstance(row, dict) or set(row) != set(_RECORD_FIELDS):
            raise ValueError(f"{path} line {number} is not an attack-set row (fields {sorted(_RECORD_FIELDS)})")
        if not isinstance(row["shard"], str) or not _SHARD_NAME.fullmatch(row["shard"]):
            raise ValueError(f"{path} line {number}: field shard must name a shard of the set (shard-NNNNN.npz), "
                             f"got {row['shard']!r}")
        rows.append(row)
    return rows, good


MAX_EXAMPLES = 10**8  # the paper's sets have ~10^4 examples; more is a corrupt or hostile params.json


def _check_sizes(params_path: Path, header: dict) -> None:
    """n_examples and shard_size are sane integers before anything is sized by them."""
    for key, low in (("n_examples", 0), ("shard_size", 1)):
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_EXAMPLES:
            raise ValueError(f"{params_path}: field {key} must be an integer in [{low}, {MAX_EXAMPLES}], got {value!r}")


def _shard_sizes(header: dict) -> list[int]:
    n, size = int(header["n_examples"]), int(header["shard_size"])
    return [min(size, n - start) for start in range(0, n, size)]


def _complete_shards(directory: Path, header: dict, rows: list[dict]) -> dict[int, list[dict]]:
    """Shards whose file exists and whose rows are exactly indices 0..size-1 of the right ids."""
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row)
    size = int(header["shard_size"])
    complete = {}
    for k, n in enumerate(_shard_sizes(header)):
        group = sorted(by_shard.get(shard_name(k), []), key=lambda r: r["index"])
        expected = [(i, k * size + i) for i in range(n)]
        if [(r["index"], r["id"]) for r in group] == expected and (directory / SHARD_DIR / shard_name(k)).exists():
            complete[k] = group
    return complete


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: dict, new: dict) -> list[str]:
    """'key.sub: old -> new' for every leaf that differs."""
    old, new = _flatten(old), _flatten(new)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class AttackSetWriter:
    """Writes shards of one attack set; use open_attack_set to create or resume one."""

    def __init__(self, directory: Path, header: dict, done: dict[int, list[dict]]):
        self.directory, self.header = directory, header
        self.sizes = _shard_sizes(header)
        self.done = set(done)
        self.n_success = sum(r["success"] for rows in done.values() for r in rows)

    @property
    def pending(self) -> list[int]:
        """Shard numbers still to compute, ascending."""
        return [k for k in range(len(self.sizes)) if k not in self.done]

    def write_shard(self, k: int, images: np.ndarray, rows: list[dict]) -> None:
        """Store shard k: images (n, C, H, W) float32 and its n manifest rows (AttackRecord fields)."""
        if k in self.done:
            raise ValueError(f"shard {k} is already written")
        if images.dtype != np.float32 or images.ndim != 4 or len(images) != self.sizes[k] or len(rows) != len(images):
            raise ValueError(f"shard {k} needs {self.sizes[k]} float32 images (n, C, H, W) and as many rows, "
                             f"got {images.dtype} {images.shape} and {len(rows)} rows")
        ids = np.array([r["id"] for r in rows], dtype=np.int64)
        path = self.directory / SHARD_DIR / shard_name(k)
        _atomic_write(path, lambda f: np.savez(f, images=images, ids=ids))
        lines = "".join(json.dumps({name: r[name] for name in _RECORD_FIELDS}, sort_keys=True) + "\n" for r in rows)
        with open(self.directory / MANIFEST_FILE, "ab") as f:  # rows only once the shard is in place
            f.write(lines.encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.add(k)
        self.n_success += sum(bool(r["success"]) for r in rows)


def open_attack_set(out_dir: str | Path, header: dict) -> AttackSetWriter:
    """Create the attack set `header` describes in out_dir, or resume it there.

    header: JSON-able dict with at least n_examples and shard_size. An out_dir that holds
    another set (different header) or foreign files -> ValueError, nothing written.
    """
    directory = Path(out_dir)
    header = json.loads(json.dumps({"format": FORMAT, **header}))  # normalised as it will be read back
    params_path, manifest = directory / PARAMS_FILE, directory / MANIFEST_FILE
    if params_path.exists():
        existing = json.loads(params_path.read_text())
        if existing != header:
            raise ValueError(f"out_dir {directory} holds an attack set with different parameters "
                             f"({'; '.join(_differences(existing, header))}); use another out dir or remove it")
    elif directory.exists() and any(p.name != SHARD_DIR and not p.name.endswith(_TMP) for p in directory.iterdir()):
        raise ValueError(f"out_dir {directory} is not empty and holds no {PARAMS_FILE}: "
                         f"refusing to write an attack set over {sorted(p.name for p in directory.iterdir())[:5]}")
    (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if not params_path.exists():
        _atomic_write(params_path, lambda f: f.write(json.dumps(header, indent=2, sort_keys=True).encode()))
    for stale in list(directory.glob("*" + _TMP)) + list((directory / SHARD_DIR).glob("*" + _TMP)):
        stale.unlink()  # a temp file of a killed run; its shard is recomputed
    rows, good = _read_rows(manifest)
    done = _complete_shards(directory, header, rows)
    kept = [r for k in sorted(done) for r in done[k]]
    if len(kept) != len(rows) or (manifest.exists() and good != manifest.stat().st_size):
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        _atomic_write(manifest, lambda f: f.write(text.encode()))
    return AttackSetWriter(directory, header, done)


@dataclass(frozen=True)
class AttackSet:
    """An attack set read back: records in id order; images loaded from shards on demand."""

    path: Path
    header: dict = field(compare=False)
    records: tuple[AttackRecord, ...]
    complete: bool  # every planned example was written (successful or not)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[AttackRecord]:
        return iter(self.records)

    def successful(self) -> AttackSet:
        """The examples the model classifies as their target (the paper keeps only these)."""
        return AttackSet(self.path, self.header, tuple(r for r in self.records if r.success), self.complete)

    def images(self, records: list[AttackRecord] | tuple[AttackRecord, ...] | None = None) -> np.ndarray:
        """Adversarial images (n, C, H, W) float32 of `records` (default: all of this set), in that order."""
        records = self.records if records is None else records
        out: list[np.ndarray | None] = [None] * len(records)
        by_shard: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_shard[r.shard].append(i)
        for shard, positions in by_shard.items():
            with np.load(self.path / SHARD_DIR / shard, allow_pickle=False) as npz:
                images = npz["images"]
            for i in positions:
                out[i] = images[records[i].index]
        if not records:
            return np.zeros((0,), np.float32)
        return np.stack(out)


def load_attack_set(path: str | Path) -> AttackSet:
    """Read an attack set directory (complete shards only; a run still in progress reads as a prefix)."""
    directory = Path(path)
    params_path = directory / PARAMS_FILE
    if not params_path.exists():
        raise ValueError(f"path {directory} is not an attack set: no {PARAMS_FILE}")
    header = read_json(params_path)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"path {directory}: format {found!r}, expected {FORMAT!r}")
    _check_sizes(params_path, header)
    rows, _ = _read_rows(directory / MANIFEST_FILE)
    done = _complete_shards(directory, header, rows)
    records = tuple(AttackRecord(**r) for k in sorted(done) for r in done[k])
    return AttackSet(directory, header, records, len(records) == header["n_examples"])
