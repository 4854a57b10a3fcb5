"""The subject flags every batch command takes, and the TOML file (`--subject FILE`) they override.

    add_subject_flags(parser)                       # --subject, --model, --weights, ... on a command
    spec = subject_spec_from_args(args, world_cache=args.world_cache)
    subject = load_subject(spec)                    # the embedded world when nothing is given

TOML keys are the SubjectSpec field names, i.e. the flag names with underscores (`model_entry`,
`input_size`, `trust_pickled_vectors`); a key spelled with dashes is refused with the right spelling.
Relative paths in the file resolve against the file's folder; relative paths in flags against the
working directory. A flag given on the command line replaces the file's key.

    # paper-resnet50.toml
    model = "resnet50"
    weights = "resnet50-0676ba61.pth"
    images = "imagenet/val"
    labels = "LOC_synset_mapping.txt"
    vectors = "GoogleNews-vectors-negative300.bin.gz"

TOML-only keys (no flag): `mean`, `std` (lists of floats). `layers` (list of graph node names) is also
`--layers a,b,c`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from semguard.subject.core import SubjectSpec
from semguard.world_cache import DEFAULT_WORLD_CACHE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

PATH_KEYS = ("weights", "images", "labels", "vectors")
# key -> (type, help); the flags are --<key with dashes>, the TOML keys the keys themselves.
FLAG_KEYS: dict[str, tuple[type, str]] = {
    "model": (str, "torchvision or timm architecture (resnet50, inception_v3, vgg16, timm/convnext_tiny) or worldnet"),
    "weights": (Path, "the model's local weights file (.pth/.pt/.bin read weights_only, or .safetensors)"),
    "model_entry": (str, "your own model as pkg.module:factory (imported because you name it; see the README)"),
    "images": (Path, "ImageNet-style folder (class sub-folders), cifar-100-binary folder/file, or a CSV of file,label"),
    "labels": (Path, "class names: one class per line with comma-separated synonyms "
                     "(LOC_synset_mapping.txt style allowed), or JSON"),
    "vectors": (Path, "word vectors: word2vec binary/text, GloVe text, fastText .vec, a .npy with its vocabulary "
                      "(.txt/.json/.parquet beside it, or their folder), or a semguard native folder"),
    "input_size": (int, "centre-crop size (default: the architecture's convention, e.g. 224, 299)"),
    "resize": (int, "short side before the crop (default: the architecture's convention, e.g. 256, 342)"),
}
TOML_ONLY = {"mean": float, "std": float, "layers": str}  # lists of these
BOOL_KEYS = ("trust_pickled_vectors", "phrase_mean")
KNOWN_KEYS = (*FLAG_KEYS, *BOOL_KEYS, *TOML_ONLY)


def add_subject_flags(parser: argparse.ArgumentParser, without: tuple[str, ...] = ()) -> None:
    """--subject FILE and one flag per subject key; none given = the embedded world. `without`: keys whose flag
    the command spends on something else (attack query's --model names the served model); a TOML still sets them."""
    group = parser.add_argument_group("subject (default: the embedded world)")
    group.add_argument("--subject", type=Path, default=None, metavar="FILE",
                       help="TOML file with the keys below (underscores: model_entry, input_size); flags override it")
    for key, (kind, help_text) in FLAG_KEYS.items():
        if key in without:
            continue
        group.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=help_text)
    group.add_argument("--trust-pickled-vectors", dest="trust_pickled_vectors", action="store_true", default=None,
                       help="allow a gensim pickled .kv vectors file (unpickling runs code: only files you made)")
    group.add_argument("--no-phrase-mean", dest="phrase_mean", action="store_false", default=None,
                       help="match a multi-word class name only by its phrase token (tiger_shark), never by the "
                            "mean of its words' vectors (TOML phrase_mean = false)")
    group.add_argument("--layers", dest="layers", type=_layer_names, default=None, metavar="NAME,NAME,...",
                       help="graph node names to tap, comma-separated (TOML: layers = [...]), or `blocks`: each "
                            "block's output (ResNet's bottlenecks, EfficientNet's MBConv blocks, a ViT's encoder "
                            "blocks); default: the architecture's preset, else every activation-function output")


def subject_spec_from_args(args: argparse.Namespace, world_cache: Path | str | None = None,
                           world_seed: int = 0) -> SubjectSpec:
    """The SubjectSpec of `--subject FILE` with every flag given on top; ValueError naming the file or key."""
    values: dict[str, Any] = {}
    toml_path = getattr(args, "subject", None)
    if toml_path is not None:
        values.update(read_subject_toml(toml_path))
    for key in (*FLAG_KEYS, *BOOL_KEYS, "layers"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    cache = Path(world_cache) if world_cache is not None else Path(getattr(args, "world_cache", DEFAULT_WORLD_CACHE))
    return SubjectSpec(**values, world_cache=cache, world_seed=world_seed)


def _layer_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated graph node names, got {text!r}")
    return names


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML table of `--subject path`; ValueError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--subject {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--subject {path}: not valid TOML: {error}") from None


def read_subject_toml(path: str | Path) -> dict[str, Any]:
    """SubjectSpec fields from a subject TOML file, relative paths resolved against its folder."""
    path = Path(path)
    raw = read_toml(path)
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        dashed = [k for k in unknown if k.replace("-", "_") in KNOWN_KEYS]
        hint = f" (write {', '.join(k.replace('-', '_') for k in dashed)} with underscores)" if dashed else ""
        raise ValueError(f"--subject {path}: unknown keys {unknown}{hint}; known keys: {list(KNOWN_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        values[key] = _toml_value(path, key, value)
        if key in PATH_KEYS:
            values[key] = (path.parent / values[key]) if not values[key].is_absolute() else values[key]
    return values


def _toml_value(path: Path, key: str, value: Any) -> Any:
    def bad(expected: str) -> ValueError:
        return ValueError(f"--subject {path}: key {key} must be {expected}, got {value!r}")

    if key in BOOL_KEYS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in TOML_ONLY:
        kind = TOML_ONLY[key]
        ok = isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else isinstance(v, kind) for v in value)
        if not ok:
            raise bad(f"a non-empty list of {'numbers' if kind is float else 'strings'}")
        return tuple(kind(v) for v in value)
    kind = FLAG_KEYS[key][0]
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("a positive integer")
        return value
    if not isinstance(value, str) or not value:
        raise bad("a non-empty string")
    return Path(value).expanduser() if kind is Path else value

