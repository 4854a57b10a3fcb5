"""Hardening candidates for the guard, each measured naive / white-box / gray-box (issue 12, point 5).

    python benchmarks/adaptive_hardening.py [--n 100] [--iterations 100] [--eps 8/255] [--keep 7]
        [--keys 0,2,3,4,5] [--white-box-keys 0] [--eot-keys 4]

Designs (all: the shipped recipe, ensemble flagger, calibrated as `detector evaluate` does on the
calibration half of the embedded world's test images with its MI-FGSM training attacks, seed 0):

  shipped                 every tapped layer of the world CNN (14).
  secret_K_of_14_key_S    a server-side key S: the guard taps K of the 14 layers, drawn from the key; the
                          bank, alternatives and Gaussians live on those layers only. Nothing else changes,
                          so a white-box attacker (who holds the key) is as strong as before: a key can only
                          buy gray-box robustness. One design per K in --keep and S in --keys, so the
                          gray-box figure is seen across keys, not for one lucky draw.

Attackers (one seeded random target per image; the same held-out evaluation-half images as
`semguard detector evaluate --adaptive --adaptive-images N`; success decided by the real guard):

  naive             targeted PGD on the classifier alone.
  white_box         guard-aware PGD on the real guard (combined with lambda search and orthogonal;
                    per image the run the real guard likes best); the shipped guard and --white-box-keys.
  gray_box_all      the attacker knows the method but not the key: calibrates its own guard (seed 1,
                    held-out images that are not attacked) on every layer, which covers any key.
  gray_box_own_key  the same with a key of its own (key 1: K layers of its own).
  gray_box_eot_keys with --eot-keys M: M guards of its own on keys 100.. (K layers each), attacked through the
                    mean of their (score - threshold) margins: EOT over the key it does not know.

Per design: the clean false-positive rate on the evaluation half (target 5%), the naive AUROC (successful
naive images vs clean evaluation images; the issue's floor is the Mahalanobis baseline's), the evasion of
every attacker with its Wilson 95% interval, and against the shipped guard on the same images the paired
counts (gray_box_all evading only one of the two) with McNemar's exact p-value. Writes --out (JSON).
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
from scipy.stats import binomtest
from semguard.models.worldnet import worldnet_spec
from semguard.evaluation.adaptive_eval import AdaptiveConfig, attack_plan, strongest, wilson_interval
from semguard.evaluation.detector_eval import (
    AttackSpec, DetectorEvalConfig, run_attack, split_clean, training_attacks,
)
from semguard.attacks.adaptive import GuardSurrogate, SurrogateOutput, Verdict
from semguard.detector.calibrate import calibrate_guard
from semguard.detector.evaluate import detection_metrics
from semguard.detector.guard import Guard
from semguard.models.presets import preset_layers
from semguard.world.inputs import load_world_inputs


ATTACKER_KEY = 1  # the gray-box attacker's own key (it cannot know the server's)


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


def outcome(guard: Guard, adv: torch.Tensor, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reached, evaded), each (n,) bool: the image reaches its target / and the guard does not flag it."""
    v = guard.inspect_arrays(adv)
    reached = v.predicted == targets
    return reached, reached & ~v.flagged


def evasion_row(reached: np.ndarray, evaded: np.ndarray) -> dict:
    """Attack success, evasion and the Wilson 95% interval of the evasion."""
    return {"attack_success": float(reached.mean()), "evasion": float(evaded.mean()),
            "evasion_ci95": wilson_interval(int(evaded.sum()), len(evaded))}


class KeyAverage:
    """The gray-box attacker's EOT over keys: guards of its own, each on a key it drew, attacked through the mean
    of their (score - threshold); its exact reading is the same mean of the exact guards' margins."""

    def __init__(self, guards: list[Guard]) -> None:
        self.parts = [GuardSurrogate(g) for g in guards]
        self.threshold, self.members = 0.0, [("key_average",)]

    def __call__(self, images: torch.Tensor) -> SurrogateOutput:
        outs = [s(images) for s in self.parts]
        score = torch.stack([o.score - s.threshold for o, s in zip(outs, self.parts)]).mean(0)
        return outs[0]._replace(score=score)  # logits: the same classifier in every part

    def verdict(self, images: torch.Tensor) -> Verdict:
        parts = [s.verdict(images) for s in self.parts]
        score = np.mean([v.score - s.threshold for v, s in zip(parts, self.parts)], axis=0)
        return Verdict(parts[0].predicted, score > 0, score)


def paired(shipped: np.ndarray, design: np.ndarray) -> dict:
    """Images evading the shipped guard only / the design only, and McNemar's exact two-sided p-value."""
    b, c = int((shipped & ~design).sum()), int((~shipped & design).sum())
    return {"shipped_only": b, "design_only": c, "mcnemar_p": binomtest(b, b + c).pvalue if b + c else 1.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--eps", type=lambda s: float(Fraction(s)), default=8 / 255)
    p.add_argument("--keep", default="7", help="comma list: layers a secret key keeps, of the world CNN's 14")
    p.add_argument("--keys", default="0,2,3,4,5", help="comma list of server keys (the attacker's own key is 1)")
    p.add_argument("--white-box-keys", default="0", help="keys whose guard is also attacked white-box")
    p.add_argument("--eot-keys", type=int, default=0,
                   help="also a gray-box attacker averaging over this many keys of its own per K (EOT over keys)")
    p.add_argument("--out", default="runs/adaptive/hardening.json")
    args = p.parse_args()
    keeps, keys = [int(k) for k in args.keep.split(",")], [int(k) for k in args.keys.split(",")]
    white_keys = {int(k) for k in args.white_box_keys.split(",") if k}
    if ATTACKER_KEY in keys:
        raise SystemExit(f"--keys: {ATTACKER_KEY} is the attacker's own key; choose others")
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
    n = len(sources)
    results: dict = {"n": n, "eps": args.eps, "iterations": args.iterations, "designs": {}}
    designs = [("shipped", None, None)] + [(f"secret_{k}_of_14_key_{key}", k, key) for k in keeps for key in keys]
    with tempfile.TemporaryDirectory(prefix="semguard-hardening-") as tmp:
        t0 = time.perf_counter()
        attackers = {"gray_box_all": guard_on(inputs, x, y, pred, pool, all_layers, 1, Path(tmp) / "att_all")}
        for k in keeps:
            attackers[f"gray_box_own_key_{k}"] = guard_on(inputs, x, y, pred, pool, key_layers(all_layers, k, ATTACKER_KEY),
                                                          1, Path(tmp) / f"att_key_{k}")
            if args.eot_keys:  # attacker keys 100, 101, ...: never the server's
                attackers[f"gray_box_eot_keys_{k}"] = [
                    guard_on(inputs, x, y, pred, pool, key_layers(all_layers, k, 100 + j), 1, Path(tmp) / f"att_eot_{k}_{j}")
                    for j in range(args.eot_keys)]
        print(f"attacker guards calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
        attacked = {}
        for name, g in attackers.items():
            t0 = time.perf_counter()
            surrogate = KeyAverage(g) if isinstance(g, list) else GuardSurrogate(g)
            attacked[name] = (strongest(surrogate, x_src, t_src, args.eps, acfg)[0], time.perf_counter() - t0)
            print(f"{name} attack: {attacked[name][1]:.0f} s", flush=True)
        evading: dict = {}
        for design, keep, key in designs:
            layers = key_layers(all_layers, keep, key)
            guard = guard_on(inputs, x, y, pred, split.calibration, layers, 0, Path(tmp) / design)
            clean = scores(guard, x[split.evaluation])
            row = {"layers": layers, "keep": keep, "key": key, "threshold": guard.info.threshold,
                   "clean_fpr": float((clean > guard.info.threshold).mean())}
            reached, evaded = outcome(guard, naive, targets)
            row["naive"] = evasion_row(reached, evaded)
            row["naive"]["auroc"] = detection_metrics(clean, scores(guard, naive[reached]), guard.info.threshold).auroc
            if keep is None or key in white_keys:
                t0 = time.perf_counter()
                white = strongest(GuardSurrogate(guard), x_src, t_src, args.eps, acfg)[0]
                row["white_box"] = evasion_row(*outcome(guard, white, targets)) | {"seconds": round(time.perf_counter() - t0, 1)}
            for name, (adv, s) in attacked.items():
                if name.startswith(("gray_box_own_key", "gray_box_eot_keys")) and not name.endswith(f"_{keep}"):
                    continue  # the shipped guard has no key; its gray-box attacker is gray_box_all
                reached, evading[design, name] = outcome(guard, adv, targets)
                row[name.removesuffix(f"_{keep}")] = evasion_row(reached, evading[design, name]) | {"seconds": round(s, 1)}
            if keep is not None:
                row["paired_vs_shipped"] = {"gray_box_all": paired(evading["shipped", "gray_box_all"],
                                                                   evading[design, "gray_box_all"])}
                if args.eot_keys:  # the shipped guard against its gray-box attacker vs the design against EOT over keys
                    row["paired_vs_shipped"]["gray_box_eot_keys"] = paired(evading["shipped", "gray_box_all"],
                                                                           evading[design, f"gray_box_eot_keys_{keep}"])
            results["designs"][design] = row
            print(design, json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # every finished design kept
    print(f"\n{'design':<28}{'clean FPR':>10}{'naive AUROC':>12}{'naive':>7}{'white':>7}{'gray all':>9}{'gray own':>9}"
          f"{'gray EOT':>9}")
    for design, r in results["designs"].items():
        white, own, eot = (r.get(k, {}).get("evasion", float("nan")) for k in ("white_box", "gray_box_own_key",
                                                                             "gray_box_eot_keys"))
        print(f"{design:<28}{r['clean_fpr']:>10.3f}{r['naive']['auroc']:>12.3f}{r['naive']['evasion']:>7.2f}"
              f"{white:>7.2f}{r['gray_box_all']['evasion']:>9.2f}{own:>9.2f}{eot:>9.2f}")


if __name__ == "__main__":
    main()
