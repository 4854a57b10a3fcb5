"""A subject's class list: names with synonyms in model-output order, and WordNet ids where given.

Formats (detected from the content):

- text, one class per line in class-index order, comma-separated synonyms ("cougar, puma,
  catamount"); a leading WordNet id is kept as the class's id (LOC_synset_mapping.txt,
  synset_words.txt: "n01440764 tench, Tinca tinca");
- JSON: a list of names ("cougar, puma" splits on commas) or of synonym lists, or an object
  {wnid or folder name: name or synonym list} in class-index order.

A class is its index (its line or item): two classes may share a name (ImageNet's two "crane" and two
"maillot", as the id-less files PyTorch's tutorials and OpenCV's `classification_classes_ILSVRC2012.txt`
write them). Such a class keeps its name for the word-vector lookup (`synonyms`), and its display name
(`names`: reports, attack sets, bundles) is made unique with its id or index: "crane (n03126707)",
"crane (#517)". A repeated id is refused (file and line named); a folder or CSV label that names a
shared class must use its id or index (semguard.subject.images.class_lookup says so).
JSON objects keyed by class index ("0", "1", ...: imagenet1k_label_to_names.json) must list the
indices in order.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

_WNID_LINE = re.compile(r"^(n\d{8})\s+(.*)$")


class ClassList(NamedTuple):
    synonyms: list[list[str]]  # per class, its names; the first is the display name
    ids: list[str | None]  # per class, its WordNet id / folder name, when the file gives one
    path: Path | None  # the file read (None: built in)

    @property
    def names(self) -> list[str]:
        """One unique display name per class: its first synonym, with " (id)" or " (#index)" added where
        another class has the same first synonym (case ignored)."""
        first = [s[0] for s in self.synonyms]
        counts = Counter(n.lower() for n in first)
        return [n if counts[n.lower()] == 1 else f"{n} ({self.ids[i] if self.ids[i] is not None else f'#{i}'})"
                for i, n in enumerate(first)]


def read_labels(path: str | Path) -> ClassList:
    """The class list of a labels file (text or JSON); ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--labels {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"--labels {path}: not UTF-8 text ({error})") from None
    entries = _json_entries(path, text) if text.lstrip().startswith(("[", "{")) else _text_entries(path, text)
    if not entries:
        raise ValueError(f"--labels {path}: holds no classes")
    _check_duplicates(path, entries)
    return ClassList([e[1] for e in entries], [e[0] for e in entries], path)


def builtin_classes(names: list[str]) -> ClassList:
    return ClassList([[n] for n in names], [None] * len(names), None)


Entry = tuple  # (id or None, synonyms, where: "line 3" / "item 3")


def _split(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def _text_entries(path: Path, text: str) -> list[Entry]:
    entries = []
    lines = text.rstrip().splitlines()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        found = _WNID_LINE.match(line)
        wnid, rest = (found.group(1), found.group(2)) if found else (None, line)
        synonyms = _split(rest)
        if not synonyms:
            raise ValueError(f"--labels {path}: line {number} is blank; expected one class per line "
                             "(a blank line would shift every later class)")
        entries.append((wnid, synonyms, f"line {number}"))
    return entries


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in file order."""


def _json_entries(path: Path, text: str) -> list[Entry]:
    from semguard.files import loads_json

    loads_json(text, f"--labels {path}")  # size and depth checked before the pairs are read
    data = json.loads(text, object_pairs_hook=_Pairs)  # every key kept: a repeated id is reported, not dropped
    items = list(data) if isinstance(data, _Pairs) else [(None, v) for v in data] if isinstance(data, list) else None
    if items is None:
        raise ValueError(f"--labels {path}: JSON must be a list of class names or an object {{id: name}}")
    entries = []
    for i, (key, value) in enumerate(items):
        if isinstance(value, str):
            synonyms = _split(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            synonyms = [v.strip() for v in value if v.strip()]
        else:
            synonyms = []
        if not synonyms:
            raise ValueError(f"--labels {path}: item {i} ({value!r}) is not a name or a non-empty list of names")
        entries.append((key, synonyms, f"item {i}"))
    keys = [k for k, _ in items]
    if isinstance(data, _Pairs) and all(k.isdigit() for k in keys):  # keyed by class index: the keys' order
        wrong = next((i for i, k in enumerate(keys) if int(k) != i), None)
        if wrong is not None:
            raise ValueError(f"--labels {path}: item {wrong} has key {keys[wrong]!r}; an object keyed by class "
                             f"index must list 0, 1, 2, ... in order")
    return entries


def _check_duplicates(path: Path, entries: list[Entry]) -> None:
    """A repeated id is an error; a repeated name is not (a class is its index)."""
    seen: dict = {}
    for wnid, _, where in entries:
        if wnid is None:
            continue
        if wnid in seen:
            raise ValueError(f"--labels {path}: {where} repeats id {wnid} of {seen[wnid]}")
        seen[wnid] = where
