"""Adaptive attacks on the shipped guard: what it keeps against an attacker who knows it.

    python benchmarks/adaptive_attack.py [--n 100] [--iterations 100] [--eps 8/255] [--extra-eps] [--gray-box]

The embedded world's quickstart bundle (runs/quickstart/bundle) and test images; the attacked images are
correctly classified images of the quickstart evaluation's held-out half (`split_clean(labels, 0.5, 0)`,
as `evaluation.detector_eval.evaluate_detector` splits), so no calibration image is attacked; one seeded
random target each. Rows: PGD ignoring the guard (naive), combined PGD with the per-image lambda search,
orthogonal PGD, combined PGD on the Mahalanobis member only and on the signature columns only. Success is
decided by the exact Guard: evasion = the target is predicted AND the image is not flagged. Gray-box:
the attacker calibrates its own guard (same code and classifier, seed 1, on held-out images that are not
attacked, its own MI-FGSM training attacks), attacks it, and the real guard scores the result.
Prints the tables; writes runs/adaptive/adaptive.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from semguard.models.worldnet import worldnet_spec
from semguard.evaluation.detector_eval import (
    DetectorEvalConfig,
    plan_attack,
    run_attack,
    split_clean,
)
from semguard.attacks.adaptive import GuardSurrogate
from semguard.attacks.guard_pgd import GuardAttackConfig, GuardAttackResult, guard_pgd
from semguard.detector.calibrate import CalibrationConfig, calibrate_guard
from semguard.detector.guard import Guard
from semguard.models.presets import preset_layers
from semguard.world.inputs import load_world_inputs

ROWS = {  # name -> (mode, objective)
    "naive": ("naive", "score"),
    "white_box_combined": ("combined", "score"),
    "white_box_orthogonal": ("orthogonal", "score"),
    "mahalanobis_member_only": ("combined", "mahalanobis"),
    "signature_only": ("combined", "signature"),
}
CHECKPOINTS = (1, 5, 10, 25, 50, 75, 100, 150, 200)


def attacked_images(world, guard: Guard, n: int, seed: int = 0):
    """n correctly classified held-out (evaluation-half) images, a seeded random other class as target each."""
    x = torch.from_numpy(world.test_images).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32) in [0, 1]
    y = np.asarray(world.test_labels)
    split = split_clean(y, 0.5, 0)  # the quickstart evaluation's split (DetectorEvalConfig: eval_fraction 0.5, seed 0)
    pred = np.concatenate([guard.inspect_arrays(x[i : i + 500]).predicted for i in range(0, len(x), 500)])
    correct = split.evaluation[pred[split.evaluation] == y[split.evaluation]]
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(correct, n, replace=False))
    c = len(guard.info.labels)
    targets = (y[idx] + rng.integers(1, c, n)) % c  # uniform over the other classes
    return x, y, pred, split, idx, torch.as_tensor(targets)


def summarise(name: str, r: GuardAttackResult) -> dict:
    # the detector gradient where it matters: iterates not (yet) evading; at the score's floor (below every
    # clean logit) the tail is flat and the gradient is 0 by design, not vanishing
    gn = np.concatenate([t.grad_norm[~t.evading_now] for t in r.traces] + [np.zeros(0)])
    gn = gn if gn.size else np.full(1, np.nan)  # every iterate evaded
    curve = r.traces[0]  # the first run covers every image (the lambda search's first round, the first restart)
    return {"row": name, "reached": float(r.reached.mean()), "evaded": float(r.evaded.mean()),
            "mean_linf_255": float(r.linf.mean() * 255), "seconds": round(r.seconds, 1),
            "median_score": float(np.median(r.score)),
            "lambda": {str(k): int(v) for k, v in zip(*np.unique(np.nan_to_num(r.lam, nan=-1), return_counts=True))},
            "grad_norm": {"median": float(np.median(gn)), "p05": float(np.quantile(gn, 0.05)),
                          "zero_share": float((gn == 0).mean())},
            "evaded_by_step": {s: float(curve.evaded_best[s - 1]) for s in CHECKPOINTS if s <= len(curve.evaded_best)},
            "ce_by_step": {s: float(curve.ce[s - 1]) for s in CHECKPOINTS if s <= len(curve.ce)},
            "score_by_step": {s: float(curve.score[s - 1]) for s in CHECKPOINTS if s <= len(curve.score)}}


def print_table(title: str, rows: list[dict], threshold: float) -> None:
    print(f"\n{title} (threshold {threshold:.3f})")
    print(f"{'row':<26}{'reached':>8}{'evasion':>8}{'L-inf*255':>10}{'time s':>8}{'med score':>10}{'|g| med':>9}{'|g|=0':>7}")
    for r in rows:
        print(f"{r['row']:<26}{r['reached']:>8.2f}{r['evaded']:>8.2f}{r['mean_linf_255']:>10.2f}{r['seconds']:>8.1f}"
              + (f"{r['median_score']:>10.2f}{r['grad_norm']['median']:>9.3g}{r['grad_norm']['zero_share']:>7.2f}"
                 if not r["row"].startswith("naive") else f"{r['median_score']:>10.2f}{'-':>9}{'-':>7}"))
    print("evasion (any iterate so far, first run of each row) by step: " + ", ".join(map(str, CHECKPOINTS)))
    for r in rows:
        print(f"  {r['row']:<26}" + " ".join(f"{v:.2f}" for v in r["evaded_by_step"].values())
              + "   CE: " + " ".join(f"{v:.2f}" for v in r["ce_by_step"].values()))


def attacker_guard(inputs, x, y, pred, pool: np.ndarray, out_dir: Path, seed: int = 1) -> Guard:
    """The gray-box attacker's own guard: same code and classifier, another seed, images disjoint from the real guard's."""
    cfg = DetectorEvalConfig(seed=seed, progress=False)
    adv = []
    for i, spec in enumerate(cfg.train_attacks):
        s, t = plan_attack(y, pred, pool, inputs.word_vectors, spec.n_sources, seed + 101 + i)
        adv.append(run_attack(inputs.model, x, s, t, spec).successful)
    calibrate_guard(inputs.model, worldnet_spec(inputs.model), preset_layers("worldnet"), list(inputs.world.classes),
                    inputs.word_vectors, x[pool], y[pool], out_dir, model_name="worldnet", attack_images=torch.cat(adv),
                    config=dataclasses.replace(CalibrationConfig(method="ensemble"), seed=seed))
    return Guard.load(out_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="runs/quickstart/bundle")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--eps", type=lambda s: float(Fraction(s)), default=8 / 255)
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--extra-eps", action="store_true", help="naive and combined rows at eps 4/255 and 0.15 too")
    p.add_argument("--gray-box", action="store_true")
    p.add_argument("--out", default="runs/adaptive/adaptive.json")
    args = p.parse_args()
    torch.set_num_threads(1)  # shared machine
    inputs = load_world_inputs(progress=False)
    guard = Guard.load(args.bundle)
    surrogate = GuardSurrogate(guard)
    x, y, pred, split, idx, targets = attacked_images(inputs.world, guard, args.n)
    clean = guard.inspect_arrays(x[idx])
    print(f"{platform.processor() or platform.machine()}, torch threads 1; {len(idx)} held-out images, "
          f"clean flagged {clean.flagged.mean():.2f}, eps {args.eps * 255:.1f}/255, step eps/4, {args.iterations} steps, "
          f"restarts {args.restarts}")
    results: dict = {"n": len(idx), "eps": args.eps, "iterations": args.iterations, "threshold": guard.info.threshold,
                     "clean_flagged": float(clean.flagged.mean()), "rows": {}}
    rows = []
    for name in args.rows.split(","):
        mode, objective = ROWS[name]
        cfg = GuardAttackConfig(mode=mode, objective=objective, eps=args.eps, iterations=args.iterations,
                                restarts=args.restarts if mode != "naive" else 1)
        rows.append(summarise(name, guard_pgd(surrogate, x[idx], targets, cfg)))
        results["rows"][name] = rows[-1]
    print_table(f"white-box, eps {args.eps * 255:.1f}/255", rows, guard.info.threshold)
    if args.extra_eps:
        for eps in (4 / 255, 0.15):
            extra = [summarise(n, guard_pgd(surrogate, x[idx], targets, GuardAttackConfig(
                mode=ROWS[n][0], eps=eps, iterations=args.iterations))) for n in ("naive", "white_box_combined")]
            print_table(f"eps {eps * 255:.1f}/255", extra, guard.info.threshold)
            results[f"eps_{eps:.4f}"] = {r["row"]: r for r in extra}
    if args.gray_box:
        pool = np.setdiff1d(split.evaluation, idx)  # held out from the real guard, and not attacked
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="semguard-graybox-") as tmp:
            own = attacker_guard(inputs, x, y, pred, pool, Path(tmp) / "bundle")
        calib_s = time.perf_counter() - t0
        gray = []
        for name in ("white_box_combined", "white_box_orthogonal"):
            r = guard_pgd(GuardSurrogate(own), x[idx], targets, GuardAttackConfig(mode=ROWS[name][0], eps=args.eps,
                                                                                 iterations=args.iterations))
            real = guard.inspect_arrays(r.adversarial)
            row = summarise(f"gray_box_{ROWS[name][0]}", r)
            row.update(evaded_own_guard=row["evaded"], reached=float(r.reached.mean()),
                       evaded=float((r.reached & ~real.flagged).mean()), median_score=float(np.median(real.score)))
            gray.append(row)
        print_table(f"gray-box (attacker's own guard, calibrated in {calib_s:.0f} s; evasion and score by the real guard)",
                    gray, guard.info.threshold)
        for r in gray:
            print(f"  {r['row']}: evades the attacker's own guard {r['evaded_own_guard']:.2f}, the real one {r['evaded']:.2f}")
        results["gray_box"] = {r["row"]: r for r in gray} | {"attacker_calibration_s": round(calib_s, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
