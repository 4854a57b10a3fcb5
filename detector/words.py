"""Word vectors: load them (gensim KeyedVectors) and match class labels to them.

Formats, detected from the file's content (not its name):

- word2vec binary (GoogleNews-vectors-negative300.bin, optionally .gz / .bz2),
- word2vec text ("count dim" header line; a GloVe-style file without the header works too),
- semguard native: a directory written by `convert_to_native`, with `vectors.npy` (float32,
  memory-mapped read-only, so several workers share one copy in the page cache) and
  `words.json`. It replaces gensim's own `.save()` format, which is a pickle: semguard never
  unpickles a user's file. A gensim `.kv` file loads only with `trust_pickle=True`.
- a `.npy` matrix (n_words, d) with its vocabulary beside it (as packaged GloVe/fastText ship):
  `--vectors emb.npy` (vocabulary: `emb.txt` / `.vocab` / `.json` / `.parquet`, else the folder's
  only such file) or the folder holding the pair. Vocabulary: one word per line (a "word count"
  line keeps the word), a JSON list (or {word: row}), or a one-string-column Parquet table
  (`pip install 'semguard[parquet]'`). Memory-mapped like the native format.

The paper matches a class to the first of its synonyms that has a vector (838 of 1000
ImageNet classes, 100 of 100 CIFAR-100 classes against Google News).
"""
from __future__ import annotations

import bz2
import gzip
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Union

import numpy as np
from gensim.models import KeyedVectors

from semguard.files import atomic_path, read_json, write_atomic

Label = Union[str, list[str], tuple[str, ...]]

NATIVE_FORMAT = "semguard-vectors"
NATIVE_VERSION = 1
_NATIVE_WORDS = "words.json"
_NATIVE_VECTORS = "vectors.npy"
_PICKLE_MAGIC = b"\x80"  # every pickle protocol >= 2 starts with PROTO


# --------------------------------------------------------------------------- loading


def _open_raw(path: Path) -> IO[bytes]:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    return opener(path, "rb")


def _parse_floats(tokens: list[bytes]) -> bool:
    try:
        [float(t) for t in tokens]
    except ValueError:
        return False
    return True


def _sniff_word2vec(path: Path) -> tuple[bool, bool]:
    """(binary, has_header) of a word2vec-style file, from its first bytes."""
    try:
        with _open_raw(path) as f:
            first = f.readline(1 << 12)
            fields = first.split()
            header = len(fields) == 2 and all(x.isdigit() for x in fields)
            # Text: "word v1 .. vd" on one line. Binary: "word " then 4*d raw bytes, never d ASCII floats.
            record = f.readline(64 * int(fields[1]) + (1 << 12)).split() if header else []
    except (OSError, EOFError) as error:  # e.g. a .gz name on a file that is not gzip
        raise ValueError(f"path: {str(path)!r} could not be read: {error}") from error
    if first.startswith(_PICKLE_MAGIC):
        raise ValueError(
            f"path: {str(path)!r} is a pickle (gensim's .save() format); semguard does not unpickle "
            "user files: pass trust_pickle=True if you made it yourself, or convert the original "
            "word2vec file with detector.words.convert_to_native"
        )
    if header:
        is_text = len(record) == int(fields[1]) + 1 and _parse_floats(record[1:])
        return not is_text, True
    if len(fields) >= 2 and _parse_floats(fields[1:]):
        return False, False  # headerless text (GloVe style)
    raise ValueError(
        f"path: {str(path)!r} is not a word2vec binary/text file (first line {first[:60]!r}) "
        "nor a semguard native directory"
    )


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == _PICKLE_MAGIC


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected None or a positive int, got {limit!r}")


def _keyed_vectors(words: list[str], vectors: np.ndarray) -> KeyedVectors:
    """KeyedVectors around `vectors` (n, d) without copying it (a memmap stays a memmap)."""
    kv = KeyedVectors(vectors.shape[1], count=0, dtype=np.float32)
    kv.index_to_key = list(words)
    kv.key_to_index = {w: i for i, w in enumerate(words)}
    kv.vectors = vectors
    return kv


def _load_native(path: Path, limit: int | None, mmap: bool) -> KeyedVectors:
    meta = read_json(path / _NATIVE_WORDS)
    if not isinstance(meta, dict) or meta.get("format") != NATIVE_FORMAT:
        raise ValueError(f"path: {str(path / _NATIVE_WORDS)!r} is not a {NATIVE_FORMAT} vocabulary")
    words = meta["words"]
    vectors = np.load(path / _NATIVE_VECTORS, mmap_mode="r" if mmap else None, allow_pickle=False)
    if vectors.ndim != 2 or vectors.shape[0] != len(words) or vectors.dtype != np.float32:
        raise ValueError(
            f"path: {str(path)!r}: vectors {vectors.shape} {vectors.dtype} do not match {len(words)} words "
            "(expected float32 (n_words, d))"
        )
    if len(set(words)) != len(words):
        raise ValueError(f"path: {str(path)!r}: words.json repeats words")
    n = len(words) if limit is None else min(limit, len(words))
    return _keyed_vectors(words[:n], vectors[:n])


VOCABULARY_SUFFIXES = (".txt", ".vocab", ".json", ".parquet")


def _vocabulary_beside(npy: Path) -> Path:
    """The vocabulary of `npy`: same stem with a vocabulary suffix, else the folder's only vocabulary file."""
    same = [npy.with_suffix(s) for s in VOCABULARY_SUFFIXES if npy.with_suffix(s).is_file()]
    others = sorted(p for p in npy.parent.iterdir() if p.suffix in VOCABULARY_SUFFIXES and p.is_file())
    found = same or others
    if len(found) != 1:
        raise ValueError(f"path: {str(npy)!r}: a .npy needs its vocabulary beside it ({npy.stem}.txt, .vocab, .json "
                         f"or .parquet, or the folder's only such file); found {[p.name for p in found]}")
    return found[0]


def _pair_in_folder(folder: Path) -> tuple[Path, Path]:
    arrays = sorted(folder.glob("*.npy"))
    if len(arrays) != 1:
        raise ValueError(f"path: directory {str(folder)!r} lacks {_NATIVE_WORDS} and {_NATIVE_VECTORS} (a native "
                         f"folder) and holds {len(arrays)} .npy files (one .npy with its vocabulary)")
    return arrays[0], _vocabulary_beside(arrays[0])


def read_vocabulary(path: Path) -> list[str]:
    """The words of a vocabulary file, in row order (module docstring)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"path: {str(path)!r}: a Parquet vocabulary needs pyarrow (`pip install 'semguard[parquet]'`)") from None
        table = pq.read_table(path)
        columns = [n for n, t in zip(table.column_names, table.schema.types) if str(t) in ("string", "large_string")]
        if len(columns) != 1:
            raise ValueError(f"path: {str(path)!r}: expected one string column of words, got columns "
                             f"{dict(zip(table.column_names, map(str, table.schema.types)))}")
        return table.column(columns[0]).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):  # {word: row}
            return [w for w, _ in sorted(data.items(), key=lambda item: item[1])]
        return data
    fields = [line.split() for line in text.splitlines()]
    return [f[0] if len(f) == 2 and f[1].isdigit() else " ".join(f) for f in fields]


def _load_pair(npy: Path, vocabulary: Path, limit: int | None, mmap: bool) -> KeyedVectors:
    try:
        vectors = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
        words = read_vocabulary(vocabulary)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"path: {str(npy)!r} with vocabulary {str(vocabulary)!r}: {error}") from None
    if vectors.ndim != 2 or vectors.shape[0] != len(words) or not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"path: {str(npy)!r}: vectors {vectors.shape} {vectors.dtype} do not match the "
                         f"{len(words)} words of {str(vocabulary)!r} (expected floats (n_words, d))")
    if not all(isinstance(w, str) and w for w in words) or len(set(words)) != len(words):
        raise ValueError(f"path: {str(vocabulary)!r}: words must be unique non-empty strings")
    n = len(words) if limit is None else min(limit, len(words))
    rows = vectors[:n] if vectors.dtype == np.float32 else np.asarray(vectors[:n], np.float32)
    return _keyed_vectors(words[:n], rows)


def load_vectors(
    path: str | Path, limit: int | None = None, mmap: bool = True, *, trust_pickle: bool = False
) -> KeyedVectors:
    """Load word vectors, the format detected from content (see the module docstring).

    limit: keep the first `limit` words (files are sorted by frequency, so the most common).
    mmap: for the native format, map the vectors read-only instead of reading them into memory.
    trust_pickle: allow a gensim `.save()` file (a pickle: only for files you made yourself).
    """
    path = Path(path)
    _check_limit(limit)
    if not path.exists():
        raise FileNotFoundError(f"path: no word-vector file or directory {str(path)!r}")
    if path.is_dir() and not (path / _NATIVE_WORDS).is_file():
        return _load_pair(*_pair_in_folder(path), limit, mmap)
    if path.is_dir():
        if not (path / _NATIVE_VECTORS).is_file():
            raise ValueError(f"path: directory {str(path)!r} lacks {_NATIVE_WORDS} and {_NATIVE_VECTORS}")
        return _load_native(path, limit, mmap)
    if path.suffix == ".npy":
        return _load_pair(path, _vocabulary_beside(path), limit, mmap)
    if trust_pickle and _is_pickle(path):
        kv = KeyedVectors.load(str(path), mmap="r" if mmap else None)
        return kv if limit is None else _keyed_vectors(kv.index_to_key[:limit], kv.vectors[:limit])
    binary, has_header = _sniff_word2vec(path)
    try:
        return KeyedVectors.load_word2vec_format(
            str(path), binary=binary, limit=limit, no_header=not has_header, datatype=np.float32
        )
    except (UnicodeDecodeError, EOFError, ValueError) as error:
        raise ValueError(f"path: {str(path)!r} could not be read as word2vec: {error}") from error


def convert_to_native(src: str | Path, dst: str | Path, limit: int | None = None) -> Path:
    """One-time conversion of any loadable vector file to the native directory `dst` (returned).

    Loading the result with `load_vectors(dst)` maps the vectors instead of parsing 3.6 GB.
    Each file is written to a temporary name and renamed, so an interrupted run leaves no half file.
    """
    kv = load_vectors(src, limit=limit, mmap=False)
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"dst: {str(dst)!r} exists and is not a directory")
    dst.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(kv.vectors, dtype=np.float32)  # (n, d)
    with atomic_path(dst / _NATIVE_VECTORS) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    meta = {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "words": list(kv.index_to_key)}
    write_atomic(dst / _NATIVE_WORDS, json.dumps(meta, ensure_ascii=False))
    return dst


# --------------------------------------------------------------------------- label matching


MATCH_RULES = ("word", "phrase", "mean")  # how a label got its vector (LabelMatch.rules)


@dataclass(frozen=True)
class LabelMatch:
    """Labels matched to word vectors.

    words: per label, the vocabulary key used ("tiger_shark"), the words averaged joined by "+"
    ("indigo+bunting"), or None. rules: per label, "word" (a one-word key), "phrase" (a multi-word key:
    a phrase token), "mean" (the mean of its words' unit vectors) or None. vectors: (n_matched, d)
    float32, rows in `matched` order. matched / unmatched: label indices. labels: per label, its synonyms.
    """

    words: list[str | None]
    vectors: np.ndarray
    matched: list[int]
    unmatched: list[int]
    labels: list[list[str]]
    rules: list[str | None] | None = None

    def counts(self) -> dict[str, int]:
        """Matched labels by rule, e.g. {"word": 640, "phrase": 12, "mean": 190}."""
        rules = self.rules or ["word" if w is not None else None for w in self.words]
        return {rule: sum(r == rule for r in rules) for rule in MATCH_RULES}

    def summary(self, max_listed: int = 20) -> str:
        """e.g. "matched 838/1000 labels (word 640, phrase 8, mean 190); unmatched (162): 3 'tiger shark', ..."."""
        total = len(self.words)
        by_rule = ", ".join(f"{rule} {n}" for rule, n in self.counts().items())
        text = f"matched {len(self.matched)}/{total} labels ({by_rule})"
        if not self.unmatched:
            return text
        listed = ", ".join(f"{i} {', '.join(self.labels[i])!r}" for i in self.unmatched[:max_listed])
        more = ", ..." if len(self.unmatched) > max_listed else ""
        return f"{text}; unmatched ({len(self.unmatched)}): {listed}{more}"


def _synonyms(label: Label, index: int) -> list[str]:
    if isinstance(label, str):
        parts = label.split(",")
    elif isinstance(label, (list, tuple)) and all(isinstance(s, str) for s in label):
        parts = list(label)
    else:
        raise ValueError(f"labels[{index}]: expected a string or a list of strings, got {label!r}")
    synonyms = [s.strip() for s in parts if s.strip()]
    if not synonyms:
        raise ValueError(f"labels[{index}]: empty label {label!r}")
    return synonyms


def candidate_keys(phrase: str) -> list[str]:
    """Vocabulary keys to try for a phrase, in order: the phrase with its own case, lower case,
    then Title Case; each as written and with spaces joined by underscores (word2vec phrases)."""
    keys: list[str] = []
    for cased in (phrase, phrase.lower(), phrase.title()):
        for form in (cased, re.sub(r"\s+", "_", cased)):
            if form not in keys:
                keys.append(form)
    return keys


def _key(kv: KeyedVectors, phrase: str) -> str | None:
    return next((k for k in candidate_keys(phrase) if k in kv.key_to_index), None)


def _word_keys(kv: KeyedVectors, phrase: str) -> list[str] | None:
    """One key per word of a multi-word phrase ("indigo bunting", "aquarium_fish"; a hyphenated word
    without a key split at its hyphens), or None when a word has none or the phrase is one word."""
    words = [w for w in re.split(r"[\s_]+", phrase) if w]
    keys: list[str] = []
    for word in words:
        key = _key(kv, word)
        parts = [_key(kv, p) for p in word.split("-") if p] if key is None and "-" in word else [key]
        if any(k is None for k in parts):
            return None
        keys.extend(parts)
    return keys if len(keys) > 1 else None


def _unit_mean(kv: KeyedVectors, keys: list[str]) -> np.ndarray:
    rows = np.stack([np.asarray(kv.vectors[kv.key_to_index[k]], np.float64) for k in keys])  # (n_words, d)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1)).mean(0).astype(np.float32)  # (d,)


def match_labels(kv: KeyedVectors, labels: list[Label], *, phrase_mean: bool = True) -> LabelMatch:
    """Match each label to the first of its synonyms that has a vector (paper: 838/1000 ImageNet).

    A label is a string, a comma-separated synonym string ("cougar, puma, catamount") or a list
    of synonyms. A synonym has a vector when a vocabulary key spells it (`candidate_keys`: the
    word, or a multi-word name's phrase token "tiger_shark"), else, with `phrase_mean`, when every
    word of a multi-word name has a key: the mean of those words' unit vectors (the usual way to
    place a phrase in a word-level space such as GloVe).
    """
    synonyms = [_synonyms(label, i) for i, label in enumerate(labels)]
    words: list[str | None] = []
    rules: list[str | None] = []
    means: dict[int, np.ndarray] = {}
    for i, options in enumerate(synonyms):
        word, rule = None, None
        for phrase in options:
            key = _key(kv, phrase)
            if key is not None:
                word, rule = key, "phrase" if len(phrase.split()) > 1 or "_" in key else "word"
                break
            parts = _word_keys(kv, phrase) if phrase_mean else None
            if parts is not None:
                word, rule, means[i] = "+".join(parts), "mean", _unit_mean(kv, parts)
                break
        words.append(word)
        rules.append(rule)
    matched = [i for i, w in enumerate(words) if w is not None]
    unmatched = [i for i, w in enumerate(words) if w is None]
    vectors = np.zeros((len(matched), kv.vector_size), dtype=np.float32)  # (n_matched, d)
    for row, i in enumerate(matched):
        vectors[row] = means[i] if i in means else kv.vectors[kv.key_to_index[words[i]]]
    return LabelMatch(words, vectors, matched, unmatched, synonyms, rules)


# --------------------------------------------------------------------------- label sets


def _read_cifar100() -> list[str]:
    text = importlib.resources.files(__package__).joinpath("data/cifar100.txt").read_text(encoding="utf-8")
    return text.split()


# The 100 CIFAR-100 fine classes in label order (the dataset's meta file), e.g. "aquarium_fish".
CIFAR100_CLASSES: list[str] = _read_cifar100()


def imagenet_labels() -> list[list[str]]:
    """torchvision's 1000 ImageNet category names (one name per class, no synonyms; no download)."""
    from torchvision.models import ResNet50_Weights

    return [[name] for name in ResNet50_Weights.IMAGENET1K_V1.meta["categories"]]


_WNID = re.compile(r"^n\d{8}\s+")  # synset_words.txt lines start with a WordNet id


def read_synonyms(path: str | Path) -> list[list[str]]:
    """One class per line, comma-separated synonyms ("cougar, puma, catamount"), in class order.

    A leading WordNet id ("n02125311 cougar, puma") is dropped; trailing blank lines are
    ignored, a blank line between classes is an error (it would shift every later class).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no synonyms file {str(path)!r}")
    lines = path.read_text(encoding="utf-8").rstrip().splitlines()
    classes = []
    for number, line in enumerate(lines, start=1):
        synonyms = [s.strip() for s in _WNID.sub("", line.strip()).split(",") if s.strip()]
        if not synonyms:
            raise ValueError(f"path: {str(path)!r} line {number} is blank; expected one class per line")
        classes.append(synonyms)
    if not classes:
        raise ValueError(f"path: {str(path)!r} holds no classes")
    return classes
