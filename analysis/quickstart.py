"""`semguard quickstart`: the paper's method end to end on the embedded world, offline."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from semguard.analysis.attack_analysis import analyze_attacks
from semguard.analysis.report import render_report
from semguard.analysis.subject_two_vs_two import TwoVsTwoConfig, run_two_vs_two
from semguard.attacks.generate import GenerateParams, generate_attack_set
from semguard.attacks.store import load_attack_set
from semguard.evaluation.adaptive_eval import QUICKSTART_ADAPTIVE
from semguard.evaluation.detector_eval import DetectorEvalConfig, evaluate_subject_detector
from semguard.files import write_json_atomic
from semguard.models.inputs import predict
from semguard.subject.core import SubjectSpec, world_subject
from semguard.world import WorldSettings
from semguard.world.inputs import DEFAULT_CACHE_DIR, WorldInputs, load_world_inputs


SUBJECT_FILE = "subject.json"  # the subject header (semguard.subject.header): the world's model, preprocessing, accuracy


@dataclass(frozen=True)
class QuickstartConfig:
    out: Path
    cache_dir: Path = DEFAULT_CACHE_DIR  # world, vectors, CNN and attack sets, reused across runs by settings hash
    world: WorldSettings = field(default_factory=WorldSettings)
    image_sets: int = 5  # paper 3.2: five distinct images per concept, one per set
    n_permutations: int = 1000  # paper 3.5
    seed: int = 0
    batch_size: int = 256
    attack: GenerateParams = field(default_factory=GenerateParams)  # paper: 100 sources x 6 targets, eps 0.15
    reference_size: int = 100  # paper 4: 100 correctly predicted reference concepts
    # Guard calibration and evaluation (clean test images split in halves; MI-FGSM, PGD, C&W L2), and a
    # reduced adaptive evaluation (the shipped guard, 8/255, 20 images, 30 steps; `detector evaluate --adaptive`
    # runs the whole one)
    detector: DetectorEvalConfig = field(default_factory=lambda: DetectorEvalConfig(adaptive=QUICKSTART_ADAPTIVE))
    # One intra-op thread: the world's tensors are small, and on shared cores oversubscribed
    # OpenMP threads stalled the permutation tests 45x (2 threads vs 1, measured here).
    torch_threads: int = 1
    progress: bool = True
    ray: str | None = None  # Ray address for the attack set's shards ("local" starts Ray here); None: in process


# Each stage's seconds in a first run on a 2-core machine (BENCHMARKS.md, Quickstart): the overall
# progress line's estimate of what is left, scaled by how fast this machine has been so far.
STAGES = {"world": ("the embedded world", 20.0), "test_accuracy": ("test accuracy", 1.5),
          "two_vs_two": ("2 vs 2 by layer", 40.0), "attacks": ("targeted MI-FGSM attack set", 10.0),
          "one_vs_two": ("1 vs 2 of adversarial and misclassified images", 2.0),
          "detector": ("guard calibration and evaluation", 110.0)}


class Timer:
    """Seconds per stage; with `progress`, one line per stage on stderr with the time left overall."""

    def __init__(self, progress: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.progress:
            print(self.progress_line(name), file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)

    def progress_line(self, name: str) -> str:
        done = sum(STAGES[s][1] for s in self.seconds)
        pace = min(max(sum(self.seconds.values()) / done, 0.25), 4.0) if done else 1.0
        left = pace * sum(STAGES[s][1] for s in STAGES if s not in self.seconds)
        elapsed = time.perf_counter() - self.start
        return (f"quickstart [{len(self.seconds) + 1}/{len(STAGES)}] {STAGES[name][0]} | "
                f"{_clock(elapsed)} elapsed, about {_clock(left)} left")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_quickstart(config: QuickstartConfig) -> dict:
    """Build or reuse the world, run every analysis, write summary.json, figures and report.md."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        return _run_quickstart(config)
    finally:
        torch.set_num_threads(threads)


def _run_quickstart(config: QuickstartConfig) -> dict:
    timer = Timer(config.progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    with timer.stage("world"):
        inputs = load_world_inputs(config.world, config.cache_dir, progress=config.progress)
    world, model = inputs.world, inputs.model
    subject = world_subject(SubjectSpec(world_cache=Path(config.cache_dir), world_seed=config.world.seed),
                            inputs=inputs)
    with timer.stage("test_accuracy"):
        test_pred = predict(model, world.test_images, config.batch_size)
        test_accuracy = float(np.mean(test_pred == world.test_labels))
    with timer.stage("two_vs_two"):
        two_vs_two = two_vs_two_stage(subject, out, config)
    summary = {
        "world": {
            "classes": list(world.classes),
            "test_accuracy": test_accuracy,
            "test_images": int(len(world.test_labels)),
            "settings": asdict(config.world),
        },
        "two_vs_two": two_vs_two,
    }
    # Attack sets live beside the world they attack, keyed by their parameters, so reruns reuse them.
    attack_dir = world.root / f"attacks-{settings_key(asdict(config.attack))}"
    with timer.stage("attacks"):
        attack_stage(inputs, attack_dir, config)
    with timer.stage("one_vs_two"):
        analysis = analyze_attacks(subject, load_attack_set(attack_dir), out, config.reference_size,
                                   config.n_permutations, config.seed)
        summary.update({k: v for k, v in analysis.items() if k != "subject"})  # summary.json has "world"
        write_json_atomic(out / SUBJECT_FILE, analysis["subject"]["header"])  # report.md's and the screen's first lines
    with timer.stage("detector"):
        summary["detector"] = detector_stage(inputs, out, replace(config.detector, progress=config.progress))
    summary["timings_s"] = timer.seconds
    write_json_atomic(out / "summary.json", summary)
    (out / "report.md").write_text(render_report(summary, analysis["subject"]["header"]))
    return summary


# The quickstart's summary.json "two_vs_two" keys (two_vs_two.json, beside it, holds the whole record).
TWO_VS_TWO_KEYS = ("layers", "accuracy", "spread", "p_value", "p_bhy", "pixels", "pixels_p_value", "image_sets",
                   "n_permutations")


def two_vs_two_stage(subject, out: Path, config: QuickstartConfig) -> dict:
    """2 vs 2 of raw pixels and every tapped layer (paper Figure 1) through the pipeline every subject takes
    (two_vs_two.json, layers/ to resume from, two_vs_two_by_layer.png in `out`): summary.json's section."""
    figure1 = TwoVsTwoConfig(image_sets=config.image_sets, n_permutations=config.n_permutations, seed=config.seed,
                             progress=config.progress, device="cpu")  # the world's tensors are small
    result = run_two_vs_two(subject, out, figure1)
    return {key: result[key] for key in TWO_VS_TWO_KEYS}


def attack_stage(inputs: WorldInputs, attack_dir: Path, config: QuickstartConfig) -> None:
    """The targeted MI-FGSM set of the world's test images, in process or on Ray actors (config.ray)."""
    world = inputs.world
    args = (inputs.model, world.test_images, world.test_labels, list(world.classes), inputs.word_vectors, attack_dir,
            config.attack)
    if config.ray is None:
        generate_attack_set(*args, progress=config.progress)
    else:  # the only place the quickstart imports ray
        from semguard.attacks.distributed import RayParams, generate_attack_set_ray

        # CPU actors: the world's tensors are small (a GPU each would only be reserved, not used)
        generate_attack_set_ray(*args, RayParams(config.ray, gpus_per_actor=0), progress=config.progress)


# The code the detector stage's results depend on: a cached evaluation is reused only while it is unchanged.
DETECTOR_CODE = ("detector", "attacks", "models", "evaluation/detector_eval.py", "evaluation/adaptive_eval.py")


def code_fingerprint(paths: tuple[str, ...] = DETECTOR_CODE, root: Path = Path(__file__).resolve().parent.parent) -> str:
    """sha256 over the .py files under `paths` (relative to `root`, the repository's by default), in sorted order."""
    digest = hashlib.sha256()
    for rel in paths:
        target = root / rel
        for f in sorted(target.rglob("*.py") if target.is_dir() else [target] if target.exists() else []):
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def detector_stage(inputs: WorldInputs, out: Path, config: DetectorEvalConfig) -> dict:
    """Calibrate and evaluate the guard (or reuse an evaluation of the same world, settings and code);
    the bundle and the ROC figure land in out/."""
    settings = json.loads(json.dumps(asdict(config) | {"progress": None}, default=str))
    key = settings_key(settings | {"code": code_fingerprint()})
    cached = inputs.world.root / f"detector-{key}"
    if not (cached / "detector_eval.json").exists():
        staging = inputs.world.root / f"detector-{key}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        evaluate_subject_detector(world_subject(SubjectSpec(world_cache=inputs.world.root.parent), inputs=inputs),
                                  staging, config)
        os.replace(staging, cached)
    shutil.copytree(cached / "bundle", out / "bundle", dirs_exist_ok=True)
    for png in ("detector_roc.png", "adaptive_evasion.png", "adaptive_loss_curves.png"):
        if (cached / png).exists():
            shutil.copy2(cached / png, out / png)
    return json.loads((cached / "detector_eval.json").read_text())
