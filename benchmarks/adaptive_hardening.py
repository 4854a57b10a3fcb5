"""Hardening candidates for the guard, each measured naive / white-box / gray-box (issue 12, point 5).

    python benchmarks/adaptive_hardening.py [--n 50] [--iterations 100] [--eps 8/255] [--keep 7]

Designs (all: the shipped recipe, ensemble flagger, calibrated as `detector evaluate` does on the
calibration half of the embedded world's test images with its MI-FGSM training attacks, seed 0):

  shipped        every tapped layer of the world CNN (14).
  secret_layers  a server-side key: the guard taps `--keep` of the 14 layers, drawn from the key
                 (seed 0); the bank, alternatives and Gaussians live on those layers only. Nothing
                 else changes, so a white-box attacker (who holds the key) is as strong as before:
                 the key can only buy gray-box robustness.

Attackers (one seeded random target per image; the same 50 held-out evaluation-half images as
`semguard detector evaluate --adaptive --adaptive-images 50`; success decided by the real guard):

  naive             targeted PGD on the classifier alone.
  white_box         guard-aware PGD on the real guard (combined with lambda search and orthogonal;
                    per image the run the real guard likes best).
  gray_box_all      the attacker knows the method but not the key: calibrates its own guard (seed 1,
                    held-out images that are not attacked) on every layer, which covers any key.
  gray_box_own_key  the same with a key of its own (seed 1: `--keep` layers of its own).

Per design: the clean false-positive rate on the evaluation half (target 5%), the naive AUROC (successful
naive images vs clean evaluation images; the issue's floor is the Mahalanobis baseline's), and the
evasion of every attacker. Writes runs/adaptive/hardening.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from semguard.analysis.adaptive_eval import AdaptiveConfig, attack_plan, strongest
from semguard.analysis.detector_eval import (
    AttackSpec, DetectorEvalConfig, run_attack, split_clean, training_attacks, worldnet_spec,
)
from semguard.attacks.adaptive import GuardSurrogate
from semguard.detector.calibrate import calibrate_guard
from semguard.detector.evaluate import detection_metrics
from semguard.detector.guard import Guard
from semguard.detector.layers import preset_layers
from semguard.world.inputs import load_world_inputs


def key_layers(layers: list[str], keep: int | None, key: int) -> list[str]:
    """`keep` of `layers` drawn from `key` (network order kept); all of them when keep is None."""
    if keep is None:
        return list(layers)
    pick = np.sort(np.random.default_rng(1000 + key).choice(len(layers), keep, replace=False))
    return [layers[i] for i in pick]


def guard_on(inputs, x, y, pred, pool: np.ndarray, layers: list[str], seed: int, out_dir: Path) -> Guard:
    """The shipped recipe with `seed` on `pool` images and `layers` (training attacks from `pool` as well)."""
    cfg = dataclasses.replace(DetectorEvalConfig(progress=False), seed=seed)
    adv, _ = training_attacks(inputs.model, x, y, pred, pool, inputs.word_vectors, cfg)
    calibrate_guard(inputs.model, worldnet_spec(inputs.model), layers, list(inputs.world.classes), inputs.word_vectors,
                    x[pool], y[pool], out_dir, model_name="worldnet", attack_images=adv,
                    config=dataclasses.replace(cfg.detector, seed=seed))
    return Guard.load(out_dir)


def scores(guard: Guard, images: torch.Tensor) -> np.ndarray:
    return np.concatenate([guard.inspect_arrays(images[i : i + 500]).score for i in range(0, len(images), 500)])


def evasion(guard: Guard, adv: torch.Tensor, targets: np.ndarray) -> dict:
    v = guard.inspect_arrays(adv)
    reached = v.predicted == targets
    return {"attack_success": float(reached.mean()), "evasion": float((reached & ~v.flagged).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--eps", type=lambda s: float(Fraction(s)), default=8 / 255)
    p.add_argument("--keep", type=int, default=7, help="layers the secret key keeps, of the world CNN's 14")
    p.add_argument("--out", default="runs/adaptive/hardening.json")
    args = p.parse_args()
    torch.set_num_threads(1)  # shared machine
    inputs = load_world_inputs(progress=False)
    x = torch.from_numpy(inputs.world.test_images).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    y = np.asarray(inputs.world.test_labels)
    with torch.no_grad():
        pred = torch.cat([inputs.model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)]).numpy()
    split = split_clean(y, 0.5, 0)  # detector evaluate's split
    sources, targets = attack_plan(y, pred, split.evaluation, args.n, 0)  # detector evaluate --adaptive's images
    pool = np.setdiff1d(split.evaluation, sources)  # the gray-box attacker's images: held out, never attacked
    acfg = AdaptiveConfig(eps=(args.eps,), n_images=args.n, iterations=args.iterations)
    t_src, x_src = torch.as_tensor(targets), x[sources]
    all_layers = preset_layers("worldnet")
    spec = AttackSpec("naive_pgd", "pgd", {"eps": args.eps, "step": args.eps / 4, "iterations": args.iterations},
                      n_sources=len(sources))
    naive = run_attack(inputs.model, x, sources, targets, spec).adversarial
    results: dict = {"n": len(sources), "eps": args.eps, "iterations": args.iterations, "keep": args.keep, "designs": {}}
    with tempfile.TemporaryDirectory(prefix="semguard-hardening-") as tmp:
        t0 = time.perf_counter()
        attackers = {"gray_box_all": guard_on(inputs, x, y, pred, pool, all_layers, 1, Path(tmp) / "att_all"),
                     "gray_box_own_key": guard_on(inputs, x, y, pred, pool, key_layers(all_layers, args.keep, 1), 1,
                                                  Path(tmp) / "att_key")}
        print(f"attacker guards calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
        attacked = {}
        for name, g in attackers.items():
            t0 = time.perf_counter()
            attacked[name] = (strongest(GuardSurrogate(g), x_src, t_src, args.eps, acfg)[0], time.perf_counter() - t0)
        for design, keep in (("shipped", None), ("secret_layers", args.keep)):
            layers = key_layers(all_layers, keep, 0)
            guard = guard_on(inputs, x, y, pred, split.calibration, layers, 0, Path(tmp) / design)
            clean = scores(guard, x[split.evaluation])
            row = {"layers": layers, "threshold": guard.info.threshold,
                   "clean_fpr": float((clean > guard.info.threshold).mean())}
            row["naive"] = evasion(guard, naive, targets)
            reached = guard.inspect_arrays(naive).predicted == targets
            row["naive"]["auroc"] = detection_metrics(clean, scores(guard, naive[reached]), guard.info.threshold).auroc
            t0 = time.perf_counter()
            white = strongest(GuardSurrogate(guard), x_src, t_src, args.eps, acfg)[0]
            row["white_box"] = evasion(guard, white, targets) | {"seconds": round(time.perf_counter() - t0, 1)}
            for name, (adv, s) in attacked.items():
                if design == "shipped" and name == "gray_box_own_key":
                    continue  # the shipped guard has no key; its gray-box attacker is gray_box_all
                row[name] = evasion(guard, adv, targets) | {"seconds": round(s, 1)}
            results["designs"][design] = row
            print(design, json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    print(f"\n{'design':<15}{'clean FPR':>10}{'naive AUROC':>12}{'naive':>7}{'white':>7}{'gray all':>9}{'gray own':>9}")
    for design, r in results["designs"].items():
        own = r.get("gray_box_own_key", {}).get("evasion", float("nan"))
        print(f"{design:<15}{r['clean_fpr']:>10.3f}{r['naive']['auroc']:>12.3f}{r['naive']['evasion']:>7.2f}"
              f"{r['white_box']['evasion']:>7.2f}{r['gray_box_all']['evasion']:>9.2f}{own:>9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
