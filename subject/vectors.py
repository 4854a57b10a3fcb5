"""A subject's word vectors: any format detector.words reads, converted once to the native mmap folder.

The first load of a word2vec / GloVe / fastText file parses it (GoogleNews: minutes) and writes
the native folder (detector.words.convert_to_native) into the cache, `<world cache's parent>/vectors/`
(`.semguard/vectors/` by default), keyed by the file's absolute path, size and modification time;
every later load maps that folder read-only (seconds, shared by workers through the page cache).
A native folder, or a `.npy` with its vocabulary (file or folder), is mapped as it is. gensim's pickled `.kv` loads only with
`--trust-pickled-vectors` and is never cached.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from gensim.models import KeyedVectors

from semguard.detector.words import _is_pickle, convert_to_native, load_vectors
from semguard.files import write_atomic

CACHE_FORMAT = "semguard-vectors-cache/1"


def vectors_cache_dir(world_cache: str | Path) -> Path:
    """Where converted vector files are kept: beside the world cache (`.semguard/vectors`)."""
    return Path(world_cache).absolute().parent / "vectors"


def _source_key(path: Path) -> dict:
    stat = path.stat()
    return {"format": CACHE_FORMAT, "source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_subject_vectors(path: str | Path, cache_dir: str | Path, *, trust_pickled: bool = False,
                         progress: bool = True) -> KeyedVectors:
    """KeyedVectors of `--vectors path`, memory-mapped from the native cache (converted on first use)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--vectors {path}: no such file or folder")
    if path.is_dir() or path.suffix == ".npy":  # native folder or .npy + vocabulary: mapped as they are
        return _named(path, lambda: load_vectors(path))
    if _is_pickle(path):
        if not trust_pickled:
            raise ValueError(f"--vectors {path}: a pickled gensim .kv file; semguard unpickles it only with "
                             "--trust-pickled-vectors (TOML trust_pickled_vectors = true), and only a file you made")
        return _named(path, lambda: load_vectors(path, trust_pickle=True))
    key = _source_key(path)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    native = Path(cache_dir) / f"{path.name}-{digest}"
    marker = native / "source.json"
    if not marker.is_file():
        if progress:
            print(f"--vectors {path}: converting once to the mmap format in {native} (later loads map it)",
                  file=sys.stderr)
        _named(path, lambda: convert_to_native(path, native))
        write_atomic(marker, json.dumps(key))  # last: a folder without it is an unfinished conversion
    return load_vectors(native)


def _named(path: Path, load):
    try:
        return load()
    except (ValueError, OSError) as error:
        message = str(error)
        raise ValueError(message if str(path) in message else f"--vectors {path}: {message}") from None
