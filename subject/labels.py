"""A subject's class list: names with synonyms in model-output order, and WordNet ids where given.

Formats (detected from the content):

- text, one class per line in class-index order, comma-separated synonyms ("cougar, puma,
  catamount"); a leading WordNet id is kept as the class's id (LOC_synset_mapping.txt,
  synset_words.txt: "n01440764 tench, Tinca tinca");
- JSON: a list of names ("cougar, puma" splits on commas) or of synonym lists, or an object
  {wnid or folder name: name or synonym list} in class-index order.

Duplicates are refused (file and line named): a repeated id, or, without ids, a repeated class
(two classes with one name could not be told apart by folder name nor by word vector; ImageNet's
two "crane" and two "maillot" classes need their WordNet ids).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

_WNID_LINE = re.compile(r"^(n\d{8})\s+(.*)$")


class ClassList(NamedTuple):
    synonyms: list[list[str]]  # per class, its names; the first is the display name
    ids: list[str | None]  # per class, its WordNet id / folder name, when the file gives one
    path: Path | None  # the file read (None: built in)

    @property
    def names(self) -> list[str]:
        """One display name per class (its first synonym)."""
        return [s[0] for s in self.synonyms]


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


def _json_entries(path: Path, text: str) -> list[Entry]:
    from semguard.files import loads_json

    data = loads_json(text, f"--labels {path}")
    items = list(data.items()) if isinstance(data, dict) else [(None, v) for v in data] if isinstance(data, list) else None
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
    return entries


def _check_duplicates(path: Path, entries: list[Entry]) -> None:
    seen: dict = {}
    for wnid, synonyms, where in entries:
        key = wnid if wnid is not None else tuple(s.lower() for s in synonyms)
        if key in seen:
            what = f"id {wnid}" if wnid is not None else f"class {', '.join(synonyms)!r}"
            hint = "" if wnid is not None else " (classes with one name need ids: 'n02012849 crane')"
            raise ValueError(f"--labels {path}: {where} repeats {what} of {seen[key]}{hint}")
        seen[key] = where
