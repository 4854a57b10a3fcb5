"""`semguard reproduce --subject paper.toml --out DIR`: the paper's whole study on real assets, resumable.

The study file holds the subject keys shared by every model (images, labels, vectors), one
[[models]] table per architecture (subject keys that override the shared ones, and an optional
`name` for its output folder) and an optional [study] table (StudyConfig). A [[models]] table
that, with the shared keys, names no asset is the embedded world.

For each model, in OUT/<name>/, each stage skipped when its finished output is there:
    two_vs_two/   2 vs 2 of pixels and every tapped layer (Figure 1; analysis.subject_two_vs_two,
                  itself resumable layer by layer)
    attacks/      the targeted MI-FGSM attack set (paper 4: sources x 6 targets; resumable by shard)
    one_vs_two/   1 vs 2 of the successful adversarial images (Figure 6) and of the misclassified
                  images (Figures 4-5, block averaged): analysis.attack_analysis.analyze_attacks
A stage is finished when its stage.json (written last) records the key it was computed under;
a stage whose settings or subject changed is computed again. A sub-study the sample is too small
for (semguard.too_small.TooSmall: too few images for the image sets, nothing to attack, no
misclassified image) is recorded as "skipped": {"reason", "count"} in its section and the rest
runs. Then OUT/study.json and OUT/report.md (each model's section under its subject header), with
the paper's numbers (PAPER, from ../shared/PAPER.md) beside ours.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from semguard.analysis.subject_two_vs_two import TwoVsTwoConfig
from semguard.attacks.generate import GenerateParams
from semguard.files import write_atomic, write_json_atomic
from semguard.subject.core import SubjectSpec
from semguard.subject.header import render_subject_header
from semguard.too_small import TooSmall
from semguard.world_cache import DEFAULT_WORLD_CACHE

FORMAT = "semguard.study/1"
STAGE_FILE = "stage.json"
SKIPPED_FILE = "skipped.json"  # in attacks/: why no attack set could be made (semguard.too_small.TooSmall)

# The paper's numbers, from ../shared/PAPER.md ("The paper in numbers"), which restates the paper
# (Dharmaretnam & Fyshe, ICLR 2019 submission). These are the paper's, not ours: the report shows them
# beside what this run measured. Keys by architecture are torchvision names.
PAPER: dict[str, Any] = {
    # rows "ImageNet concepts matched" and "CIFAR-100 concepts matched"
    "concepts_matched": {"imagenet": [838, 1000], "cifar100": [100, 100]},
    # row "images per concept (2 vs 2)": 5 image sets; spread of the 2 vs 2 across sets for Inception-v3
    "image_sets": 5,
    "two_vs_two_spread": {"inception_v3": 0.0064},
    # row "ResNet-50 layers" / "Inception-v3 layers"
    "layers": {"resnet50": "49 ReLU layers in 16 residual blocks", "inception_v3": "94 activations + mixed layers"},
    # row "misclassified sets": images analysed
    "misclassified_count": {"resnet50": 89, "inception_v3": 61, "vgg16": 89},
    # row "mistake similarity": mean cosine of true vs predicted word vectors
    "mistake_cosine": {"vgg16": 0.22, "inception_v3": 0.27, "resnet50": 0.29},
    # rows "adversarial sources / targets" and "failed attacks" (against Inception-v3)
    "attacks": {"model": "inception_v3", "requested": 600, "succeeded": 596},
    # row "reference 1 vs 2 figures" (authors' code, Inception-v3, adversarial; ranges over target buckets)
    "adversarial_one_vs_two": {"early_middle": [0.55, 0.75], "mixed_7c": [0.35, 0.55], "final_pool": [0.33, 0.47]},
    # row "headline findings": misclassified images, layers above chance after BHY
    "misclassified_significant_layers": 0,
}


@dataclass(frozen=True)
class StudyConfig:
    """[study] of the study file; the flags of `semguard reproduce` override it."""

    # Figure 1. Its seed and progress come from `seed` and `progress` below (one seed for the study).
    two_vs_two: TwoVsTwoConfig = field(default_factory=TwoVsTwoConfig)
    # Paper 4: 100 source classes x 6 targets, MI-FGSM eps 0.15 on [0, 1] (the paper's 0.3 on [-1, 1]).
    attack: GenerateParams = field(default_factory=GenerateParams)
    reference_size: int = 100  # paper 4: 100 correctly predicted reference classes for 1 vs 2
    seed: int = 0  # permutations (2 vs 2 and 1 vs 2), attacked sources, reference classes
    progress: bool = True

    def __post_init__(self) -> None:
        if self.reference_size < 4:  # analysis.one_vs_two.choose_reference_set: 1 vs 2 needs 4
            raise ValueError(f"reference_size must be >= 4, got {self.reference_size}")


class StudyModel(NamedTuple):
    name: str  # OUT/<name>/
    spec: SubjectSpec


class Study(NamedTuple):
    path: Path
    models: list[StudyModel]
    config: StudyConfig


# --------------------------------------------------------------------------- the study file

_SET_BY_STUDY = ("two_vs_two.seed", "two_vs_two.progress", "attack.seed")  # set by [study] seed / progress
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_study(path: str | Path, world_cache: str | Path | None = None) -> Study:
    """The study file: shared subject keys, [[models]] tables, optional [study]; ValueError naming the file."""
    from semguard.subject.flags import KNOWN_KEYS, read_toml

    path = Path(path)
    raw = read_toml(path)
    shared = {k: v for k, v in raw.items() if k not in ("models", "study")}
    tables = raw.get("models")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"--subject {path}: needs one [[models]] table per model (an empty one is the embedded "
                         f"world); subject keys {list(KNOWN_KEYS)}")
    base = _subject_values(path, shared, "top level")
    cache = Path(world_cache) if world_cache is not None else Path(DEFAULT_WORLD_CACHE)
    models = []
    for i, table in enumerate(tables):
        own = _subject_values(path, {k: v for k, v in table.items() if k != "name"}, f"[[models]] #{i + 1}")
        spec = SubjectSpec(**{**base, **own}, world_cache=cache)
        name = table.get("name", spec.default_name())
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"--subject {path}: [[models]] #{i + 1} needs a name (letters, digits, . _ -) for its "
                             f"output folder, got {name!r}")
        if name in [m.name for m in models]:
            raise ValueError(f"--subject {path}: two [[models]] named {name!r}; give each a distinct name = \"...\"")
        models.append(StudyModel(name, spec))
    study = raw.get("study", {})
    if not isinstance(study, dict):
        raise ValueError(f"--subject {path}: [study] must be a table")
    return Study(path, models, config_from_table(StudyConfig, study, f"--subject {path}: [study]"))


def _subject_values(path: Path, table: dict, where: str) -> dict:
    """SubjectSpec fields of one table, as a --subject file's (relative paths against the file's folder)."""
    from semguard.subject.flags import KNOWN_KEYS, PATH_KEYS, _toml_value

    unknown = sorted(set(table) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"--subject {path}: {where}: unknown keys {unknown}; subject keys: {list(KNOWN_KEYS)}, "
                         "plus [[models]] and [study]")
    values = {key: _toml_value(path, key, value) for key, value in table.items()}
    for key in PATH_KEYS:
        if key in values and not values[key].is_absolute():
            values[key] = path.parent / values[key]
    return values


def config_from_table(cls: type, table: dict, where: str, prefix: str = "") -> Any:
    """A config dataclass from a TOML table: nested tables for nested configs, each value checked
    against the field's type; ValueError naming `where` and the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        dotted = prefix + key
        if key not in names or dotted in _SET_BY_STUDY:
            hint = " (set by [study] seed / progress)" if dotted in _SET_BY_STUDY else ""
            raise ValueError(f"{where}: unknown key {dotted!r}{hint}; keys: {[prefix + n for n in names]}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {dotted} must be a table")
            values[key] = config_from_table(hints[key], value, where, dotted + ".")
        else:
            values[key] = _checked(hints[key], value, f"{where}: {dotted}")
    try:
        return cls(**values)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _checked(hint: Any, value: Any, where: str) -> Any:
    allowed = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{where} must be {names}, got {value!r}")


# --------------------------------------------------------------------------- the stages


class _Lazy:
    """The subject, loaded on first use: a rerun whose stages are all finished loads nothing."""

    def __init__(self, load: Callable[[], Any]):
        self._load, self._value = load, None

    def __call__(self):
        if self._value is None:
            self._value = self._load()
        return self._value


def _file_identity(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _stage(folder: Path, key: dict, compute: Callable[[], None], say: Callable[[str], None]) -> str:
    """Run `compute` unless folder/stage.json records `key`; "reused" or "computed"."""
    key = json.loads(json.dumps(key, default=str))
    marker = folder / STAGE_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        say(f"  {folder.name}: finished earlier, reused")
        return "reused"
    marker.unlink(missing_ok=True)
    compute()
    write_json_atomic(marker, {"key": key})
    return "computed"


def run_model(model: StudyModel, out: Path, config: StudyConfig) -> dict:
    """The three stages of one model in out; the model's section of study.json."""
    from semguard.analysis.attack_analysis import analyze_attacks
    from semguard.analysis.subject_two_vs_two import run_two_vs_two, skipped_summary
    from semguard.subject.core import subject_record
    from semguard.attacks.generate import generate_attack_set
    from semguard.attacks.store import load_attack_set
    from semguard.detector.significance import default_device
    from semguard.subject.core import load_subject

    say = _sayer(config)
    say(f"{model.name}: {model.spec.describe()}")
    figure1 = replace(config.two_vs_two, seed=config.seed, progress=config.progress)
    attack = replace(config.attack, seed=config.seed)
    device = torch.device(figure1.device) if figure1.device else default_device()  # every stage runs there

    def load():
        loaded = load_subject(model.spec, progress=config.progress)
        loaded.model.to(device)
        return loaded

    subject = _Lazy(load)
    record = subject_record(model.spec)
    base = {"subject": record, "weights": _file_identity(model.spec.weights)}
    how = ("memory_budget_gib", "workspace_gib", "batch_size", "device", "progress")  # how, not what
    stages = {}
    def two_vs_two() -> None:
        try:
            run_two_vs_two(subject(), out / "two_vs_two", figure1)
        except TooSmall as error:  # the other stages still run; the report says why this one did not
            say(f"  two_vs_two: skipped: {error.reason}")
            (out / "two_vs_two" / "two_vs_two_by_layer.png").unlink(missing_ok=True)
            write_json_atomic(out / "two_vs_two" / "two_vs_two.json", skipped_summary(subject(), figure1, error))

    stages["two_vs_two"] = _stage(
        out / "two_vs_two", {**base, **{k: v for k, v in asdict(figure1).items() if k not in how}}, two_vs_two, say)

    def attacks() -> None:
        s = subject()  # a killed generation in out/attacks resumes (the store checks it is the same set)
        vectors = np.asarray(s.word_vectors, np.float64).copy()
        vectors[~np.asarray(s.matched, bool)] = np.nan  # no word vector: neither source nor target
        (out / "attacks" / SKIPPED_FILE).unlink(missing_ok=True)
        try:
            generate_attack_set(s.model, s.images, s.images.labels, list(s.classes), vectors, out / "attacks",
                                attack, device=device, progress=config.progress, subject=record)
        except TooSmall as error:
            say(f"  attacks: skipped: {error.reason}")
            write_json_atomic(out / "attacks" / SKIPPED_FILE, error.record())

    def attack_set():
        skipped = out / "attacks" / SKIPPED_FILE
        return TooSmall(**json.loads(skipped.read_text())) if skipped.is_file() else load_attack_set(out / "attacks")

    attack_key = {**base, "attack": asdict(attack)}
    _clear_if_changed(out / "attacks", attack_key)
    stages["attacks"] = _stage(out / "attacks", attack_key, attacks, say)
    analysis_key = {**attack_key, "reference_size": config.reference_size,
                    "n_permutations": figure1.n_permutations, "seed": config.seed}
    stages["one_vs_two"] = _stage(
        out / "one_vs_two", analysis_key,
        lambda: analyze_attacks(subject(), attack_set(), out / "one_vs_two",
                                        config.reference_size, figure1.n_permutations, config.seed), say)
    two = json.loads((out / "two_vs_two" / "two_vs_two.json").read_text())
    analysis = json.loads((out / "one_vs_two" / "analysis.json").read_text())
    return {"subject": record, "stages": stages, "headline": headline(two, analysis),
            "header": (analysis.get("subject") or {}).get("header"),
            "two_vs_two": {k: two[k] for k in ("layers", "accuracy", "spread", "p_value", "p_bhy", "pixels",
                                                "pixels_p_value", "concepts", "left_out", "skipped") if k in two},
            "attacks": analysis["attacks"], "subject_counts": analysis.get("subject"),
            "adversarial_one_vs_two": analysis["adversarial_one_vs_two"], "misclassified": analysis["misclassified"]}


def _clear_if_changed(folder: Path, key: dict) -> None:
    """An attack set finished under other settings (its stage.json says so) is ours to replace: the
    store refuses to resume a set with another header."""
    marker = folder / STAGE_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("key") != json.loads(json.dumps(key, default=str)):
        shutil.rmtree(folder)


# --------------------------------------------------------------------------- numbers and report


def headline(two: dict, analysis: dict) -> dict:
    """The numbers the report compares with the paper's, for one model; None for a skipped analysis."""
    from semguard.models.presets import layer_blocks

    acc = np.asarray(two["accuracy"], float)
    blocks = layer_blocks(two["model"], two["layers"]) if len(acc) else []
    ends = [i for i in range(len(blocks)) if i == len(blocks) - 1 or blocks[i + 1] != blocks[i]]
    inside = [i for i in range(len(blocks)) if i not in ends]
    adv = np.asarray(analysis["adversarial_one_vs_two"]["accuracy"], float)
    third = max(1, len(adv) // 3)
    mis = analysis["misclassified"]

    def measured(values: np.ndarray, f: Callable[[np.ndarray], Any]) -> Any:
        return f(values) if len(values) else None

    return {
        "classes_analysed": two["concepts"],
        "unmatched_classes": two["left_out"]["unmatched"],
        "layers": len(two["layers"]),
        "two_vs_two_pixels": two["pixels"],
        "two_vs_two_first_layer": measured(acc, lambda a: float(a[0])),
        "two_vs_two_last_layer": measured(acc, lambda a: float(a[-1])),
        "two_vs_two_best": measured(acc, lambda a: {"layer": two["layers"][int(np.argmax(a))],
                                                    "accuracy": float(a.max())}),
        "two_vs_two_significant_layers": measured(acc, lambda _: int(np.sum(np.asarray(two["p_bhy"]) < 0.05))),
        "two_vs_two_spread_mean": measured(acc, lambda _: float(np.mean(two["spread"]))),
        "two_vs_two_block_ends": measured(acc, lambda a: float(a[ends].mean())),
        "two_vs_two_inside_blocks": float(acc[inside].mean()) if inside else None,
        "attacks_requested": analysis["attacks"]["requested"],
        "attacks_succeeded": analysis["attacks"]["succeeded"],
        "adversarial_one_vs_two_early": measured(adv, lambda a: float(a[:third].mean())),
        "adversarial_one_vs_two_last_layer": measured(adv, lambda a: float(a[-1])),
        "misclassified_count": mis["count"],
        "misclassified_mean_cosine": mis["mean_cosine"],
        "misclassified_significant_layers": None if "skipped" in mis else int(np.sum(np.asarray(mis["p_bhy"]) < 0.05)),
    }


def reproduce(study: Study, out: str | Path) -> dict:
    """Every model of the study, then study.json and report.md in out; returns study.json's record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = {m.name: run_model(m, out / m.name, study.config) for m in study.models}
    summary = {"format": FORMAT, "study": str(Path(study.path).resolve()),
               "config": json.loads(json.dumps(asdict(study.config), default=str)), "paper": PAPER, "models": models}
    write_json_atomic(out / "study.json", summary)
    write_atomic(out / "report.md", render_study_report(summary))
    return summary


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _arch(name: str, record: dict) -> str:
    return record.get("model") or name


def render_study_report(summary: dict) -> str:
    """report.md: per model, our numbers beside the paper's (PAPER), then the figures."""
    paper = summary["paper"]
    lines = ["# The paper's study, reproduced", "",
             "Paper: Dharmaretnam & Fyshe, \"Using word embeddings to explore the learned representations of "
             "convolutional neural networks\" (numbers restated in PAPER.md). \"paper\" columns are the paper's "
             "figures; \"ours\" are this run's. Chance is 0.5 for 2 vs 2 and 1 vs 2.", ""]
    for name, m in summary["models"].items():
        h, arch = m["headline"], _arch(name, m["subject"])
        best = h["two_vs_two_best"]
        matched = paper["concepts_matched"]["imagenet"]
        adv = paper["adversarial_one_vs_two"]
        rows = [
            ("classes analysed (with a word vector and enough images)", h["classes_analysed"],
             f"{matched[0]} of {matched[1]} (ImageNet)"),
            ("tapped layers", h["layers"], paper["layers"].get(arch, "-")),
            ("2 vs 2, raw pixels", _f(h["two_vs_two_pixels"]), "-"),
            ("2 vs 2, first / last layer", f"{_f(h['two_vs_two_first_layer'])} / {_f(h['two_vs_two_last_layer'])}",
             "rises (noisily) with depth"),
            ("2 vs 2, best layer", f"{_f(best['accuracy'])} ({best['layer']})" if best else "-", "-"),
            ("2 vs 2, block ends / inside blocks", f"{_f(h['two_vs_two_block_ends'])} / "
             f"{_f(h['two_vs_two_inside_blocks'])}", "block ends higher"),
            ("2 vs 2 layers significant after BHY", f"{_f(h['two_vs_two_significant_layers'])} of {h['layers']}", "-"),
            ("2 vs 2 spread across image sets (mean)", _f(h["two_vs_two_spread_mean"], 4),
             _f(paper["two_vs_two_spread"].get(arch), 4)),
            ("attacks succeeded / requested", f"{h['attacks_succeeded']} / {h['attacks_requested']}",
             f"{paper['attacks']['succeeded']} / {paper['attacks']['requested']} (Inception-v3)"),
            ("1 vs 2 adversarial, first third of layers", _f(h["adversarial_one_vs_two_early"]),
             f"{adv['early_middle'][0]}-{adv['early_middle'][1]} (early and middle layers)"),
            ("1 vs 2 adversarial, last layer", _f(h["adversarial_one_vs_two_last_layer"]),
             f"{adv['final_pool'][0]}-{adv['final_pool'][1]} (final pool, Inception-v3)"),
            ("misclassified images", h["misclassified_count"], paper["misclassified_count"].get(arch, "-")),
            ("mistake similarity (mean cosine)", _f(h["misclassified_mean_cosine"], 2),
             _f(paper["mistake_cosine"].get(arch), 2)),
            ("misclassified: layers significant after BHY", _f(h["misclassified_significant_layers"]),
             paper["misclassified_significant_layers"]),
        ]
        stages = ", ".join(f"{k} {v}" for k, v in m["stages"].items())
        lines += [f"## {name}", "", "```", *render_subject_header(m.get("header") or _unrecorded(m)), "```", ""]
        lines += [f"Stages this run: {stages}.", "", "| | ours | paper |", "|---|---|---|"]
        lines += [f"| {label} | {ours} | {theirs} |" for label, ours, theirs in rows]
        skipped = skipped_parts(m)
        if skipped:
            lines += ["", "Skipped (too little data; the rest of the study ran):", ""]
            lines += [f"- {part}: {s['reason']} (count: {s['count']})" for part, s in skipped.items()]
        figures = (("two_vs_two", "2 vs 2 by layer", "two_vs_two/two_vs_two_by_layer.png"),
                   ("adversarial_one_vs_two", "1 vs 2 adversarial", "one_vs_two/adversarial_one_vs_two_by_layer.png"),
                   ("misclassified_one_vs_two", "1 vs 2 misclassified",
                    "one_vs_two/misclassified_one_vs_two_by_block.png"))
        lines += [""] + [f"![{title}]({name}/{path})" for part, title, path in figures if part not in skipped] + [""]
    return "\n".join(lines)


def skipped_parts(m: dict) -> dict[str, dict]:
    """part -> {"reason", "count"} for each analysis of a model's section that was skipped."""
    parts = {"two_vs_two": m["two_vs_two"], "attacks": m["attacks"],
             "adversarial_one_vs_two": m["adversarial_one_vs_two"], "misclassified_one_vs_two": m["misclassified"]}
    found = {part: section["skipped"] for part, section in parts.items() if "skipped" in section}
    if "attacks" in found and found.get("adversarial_one_vs_two") == found["attacks"]:
        del found["attacks"]  # one reason, said once
    return found


def _unrecorded(m: dict) -> dict:
    """A header from what an analysis.json written before headers holds."""
    counts = m.get("subject_counts") or {}
    return {"model": counts.get("name", "?"), "weights": None, "preprocessing": None,
            "classes": counts.get("classes", "?"), "classes_matched": counts.get("with_word_vector", "?"),
            "images_read": counts.get("test_images", "?"), "images_skipped": "?", "accuracy": None}


def _sayer(config: StudyConfig) -> Callable[[str], None]:
    def say(line: str) -> None:
        if config.progress:
            print(line, file=sys.stderr, flush=True)
    return say
