"""Which flagger the guard ships, chosen on development worlds (never the default world's test images).

Run: python benchmarks/detector_design.py [--world-seeds 1 2] [--world-cache .semguard/world]

For each development world (the embedded world built with another seed: other images, another
WorldNet, other word vectors) this follows the evaluation protocol of `evaluation.detector_eval`
(the same clean split, training attacks on calibration-part images, the same evaluated attacks
on held-out images), computes every image's flagger features once, and prints side by side the
AUROC per attack of candidate flaggers against the Mahalanobis baseline (Lee et al.'s logistic
regression on per-layer scores) trained on the same attacks. "worst vs base" is the design's
smallest AUROC difference to that baseline over the attacks (>= 0: at least as good on every one); the default world's figures come only
from `semguard quickstart` / `semguard detector evaluate` with the design chosen here.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from semguard.models.worldnet import worldnet_spec
from semguard.evaluation.detector_eval import (
    DEFAULT_ATTACKS, EARLY_MIFGSM, PAPER_MIFGSM, SMALL_MIFGSM, AttackSpec, DetectorEvalConfig, plan_attack, run_attack,
    split_clean,
)
from semguard.config_flags import add_world_cache_flag
from semguard.detector.calibrate import calibrate_guard, fit_calib_split, guard_features
from semguard.detector.evaluate import detection_metrics
from semguard.detector.flagger import fit_flagger
from semguard.detector.guard import Guard
from semguard.models.presets import preset_layers
from semguard.models.inputs import as_model_input, predict
from semguard.world.build import WorldSettings
from semguard.world.inputs import load_world_inputs

KINDS = ("fraction", "margin", "mahalanobis")
TRAIN = {  # name -> (attack params, plan seed offset as in DetectorEvalConfig.train_attacks)
    "paper": (PAPER_MIFGSM, 101), "small": (SMALL_MIFGSM, 102), "early": (EARLY_MIFGSM, 103),
}
TRAIN_SETS = {"T0 (paper, 8/255)": ("paper", "small"), "T1 (+ early-stopped)": ("paper", "small", "early")}
DESIGNS = {  # name -> (method, features, ensemble members)
    "mahalanobis logistic (baseline)": ("logistic", ("mahalanobis",), None),
    "logistic, all features": ("logistic", KINDS, None),
    "ensemble(all, mahalanobis)": ("ensemble", KINDS, (KINDS, ("mahalanobis",))),
    "ensemble(signature, mahalanobis)": ("ensemble", KINDS, (("fraction", "margin"), ("mahalanobis",))),
    "ensemble(all, signature, mahalanobis)": ("ensemble", KINDS, (KINDS, ("fraction", "margin"), ("mahalanobis",))),
    "signature logistic": ("logistic", ("fraction", "margin"), None),
}


def world_features(seed: int, cache_dir: Path, n_sources: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Feature matrices (n, F) of every image set of the protocol on world `seed`, and the F column names."""
    inputs = load_world_inputs(WorldSettings(seed=seed), cache_dir, progress=False)
    model, vectors, world = inputs.model, inputs.word_vectors, inputs.world
    x, y = as_model_input(world.test_images), world.test_labels.astype(np.int64)
    cfg = DetectorEvalConfig()
    predicted = predict(model, x, cfg.batch_size)
    split = split_clean(y, cfg.eval_fraction, cfg.seed)
    base = dataclasses.replace(cfg.detector, method="gaussian")  # bank + Gaussians; the flaggers are fitted below
    with tempfile.TemporaryDirectory() as tmp:
        calibrate_guard(model, worldnet_spec(model), preset_layers("worldnet"), list(world.classes), vectors,
                        x[split.calibration], y[split.calibration], tmp, config=base)
        guard = Guard.load(tmp)
    bank, maha = guard.bundle.bank, guard.bundle.mahalanobis

    def feats(images: torch.Tensor) -> np.ndarray:
        return guard_features(guard.tap, images, bank, maha, KINDS, base.n_alternatives, base.seed, cfg.batch_size)[0]

    cal = split.calibration
    parts = fit_calib_split(len(cal), base.calib_fraction, base.seed)
    out = {"fit": feats(x[cal[parts.fit]]), "calib": feats(x[cal[parts.calib]]), "eval_clean": feats(x[split.evaluation])}
    for name, (params, offset) in TRAIN.items():
        s, t = plan_attack(y, predicted, cal, vectors, n_sources, cfg.seed + offset)
        out[f"train_{name}"] = feats(run_attack(model, x, s, t, AttackSpec(name, "mifgsm", params)).successful)
    for spec in DEFAULT_ATTACKS:
        s, t = plan_attack(y, predicted, split.evaluation, vectors, spec.n_sources, cfg.seed + 1)
        out[spec.name] = feats(run_attack(model, x, s, t, spec).successful)
    return out, list(guard.bundle.flagger.feature_names)


def design_aurocs(f: dict[str, np.ndarray], names: list[str]) -> dict[tuple[str, str], list[float]]:
    """(training set, design) -> AUROC per evaluated attack."""
    kind_of = np.array([n.split("/", 1)[0] for n in names])
    out = {}
    for train_name, train in TRAIN_SETS.items():
        attack = np.concatenate([f[f"train_{t}"] for t in train])
        for design, (method, kinds, members) in DESIGNS.items():
            cols = np.isin(kind_of, kinds)
            fl = fit_flagger(f["fit"][:, cols], f["calib"][:, cols], [n for n, c in zip(names, cols) if c], method,
                             attack[:, cols], members=members)
            clean = fl.score(f["eval_clean"][:, cols])
            out[train_name, design] = [detection_metrics(clean, fl.score(f[a.name][:, cols])).auroc for a in DEFAULT_ATTACKS]
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seeds", type=int, nargs="+", default=[1, 2])
    add_world_cache_flag(ap, "where the development worlds are built and reused")
    ap.add_argument("--train-sources", type=int, default=300, help="images per training attack (as shipped)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    for seed in args.world_seeds:
        if seed == WorldSettings().seed:
            raise SystemExit("detector_design: the default world is for the evaluation, not for choosing the design")
        t0 = time.perf_counter()
        f, names = world_features(seed, args.world_cache, args.train_sources)
        counts = ", ".join(f"{a.name} {len(f[a.name])}" for a in DEFAULT_ATTACKS)
        print(f"\nworld seed {seed}: successful adversarial images {counts}; clean {len(f['eval_clean'])} "
              f"({time.perf_counter() - t0:.0f} s)")
        print(f"| training attacks | flagger | {' | '.join(a.name for a in DEFAULT_ATTACKS)} | worst vs base |")
        print("|---|---|" + "---|" * (len(DEFAULT_ATTACKS) + 1))
        results = design_aurocs(f, names)
        for (train, design), aurocs in results.items():
            base = results[train, "mahalanobis logistic (baseline)"]
            worst = min(a - b for a, b in zip(aurocs, base))
            print(f"| {train} | {design} | {' | '.join(f'{a:.5f}' for a in aurocs)} | {worst:+.5f} |")


if __name__ == "__main__":
    main()
