"""Writing files so that a reader, or the next run after a killed one, finds the old file or the
whole new one, never half of one: write beside the target, then rename over it (atomic on POSIX)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

TMP_SUFFIX = ".tmp"  # files being written end so; a resuming writer may delete leftovers by it


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield `path` + TMP_SUFFIX to write; on success rename it over `path`, on error delete it.

    `durable`: fsync the file before the rename and the directory after it, so the rename
    survives a power cut (attack-set shards and manifests need it; caches do not).
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, os.O_RDONLY)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str, *, durable: bool = False) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: str | Path, payload: Any, *, indent: int | None = 2) -> Path:
    """JSON (numpy arrays and scalars, Paths as plain values) written atomically, parents created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(payload, indent=indent, default=_to_builtin) + "\n")


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only swap it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_like_open(path: str | Path) -> Path:
    """Give a file the mode open() would have created it with (0666 less the umask): for writers
    such as safetensors that create their files 0600 whatever the umask."""
    os.chmod(path, 0o666 & ~current_umask())
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MAX_JSON_BYTES = 256 << 20  # a bundle.json of 20k labels is ~1 MiB; a record file far less
MAX_JSON_DEPTH = 64  # semguard writes at most ~5 levels; Python's parser recurses per level
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def read_json(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file semguard did not necessarily write, size and nesting checked before parsing;
    ValueError naming the file (missing file: FileNotFoundError)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} a semguard JSON file may have")
    return loads_json(path.read_bytes(), str(path), max_depth=max_depth)


def loads_json(data: bytes | str, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads after a nesting-depth check (brackets outside strings); ValueError naming `where`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    brackets = np.frombuffer(_JSON_STRING.sub(b"", raw), np.uint8)
    step = np.isin(brackets, (ord("["), ord("{"))).astype(np.int64) - np.isin(brackets, (ord("]"), ord("}")))
    depth = int(np.cumsum(step).max(initial=0))
    if depth > max_depth:
        raise ValueError(f"{where}: JSON nested {depth} levels deep, more than {max_depth}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None


_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def check_safetensors(path: str | Path) -> None:
    """A .safetensors file's header is sane before any tensor is read: its declared length fits the
    file, it is shallow JSON, and every tensor's dtype x shape is exactly its byte range inside the
    file. ValueError naming the file and the tensor."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        header = loads_json(f.read(n), f"{path} (safetensors header)", max_depth=4)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_ITEMSIZE:
            raise ValueError(f"{where}: no known dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{where}: field shape must be a list of sizes, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise ValueError(f"{where}: field data_offsets {offsets!r} is not inside the file's {data} data bytes")
        declared = math.prod(shape) * _SAFETENSORS_ITEMSIZE[info["dtype"]]
        if declared != offsets[1] - offsets[0]:
            raise ValueError(f"{where}: field shape {shape} declares {declared} bytes, data_offsets hold "
                             f"{offsets[1] - offsets[0]}")


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
