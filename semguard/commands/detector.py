"""`semguard detector ...`: calibrate the guard on the embedded world, and evaluate it against baselines.

    semguard detector calibrate --out BUNDLE      # guard bundle from the world's calibration split
    semguard detector evaluate --out DIR          # attacks + every detector on the held-out split

The CLI is the edge: flags fill CalibrationConfig / DetectorEvalConfig, then it calls
detector.calibrate.calibrate_guard or evaluation.detector_eval.evaluate_detector. Both commands
split the world's clean test images with the same seed, so a bundle from `calibrate` never saw
the images `evaluate` holds out.

With the subject flags (semguard.subject.flags: --subject FILE, --model, --weights, --images, ...)
both work on the user's model instead (evaluation.detector_eval.calibrate_subject_guard /
evaluate_subject_detector); the bundle rebuilds that model (its ModelSpec). SUBJECT_POLICY says
what happens to the classes without a word vector.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from semguard.config_flags import Flag, add_world_cache_flag, config_from_flags, defer_config_flags
from semguard.subject.flags import add_subject_flags, subject_spec_from_args

if TYPE_CHECKING:
    from semguard.evaluation.detector_eval import DetectorEvalConfig

SUBJECT_POLICY = (
    "On a subject (--subject FILE or --model/--weights/--images/--labels/--vectors; none: the embedded world), "
    "classes without a word vector are never attack sources or targets and never reference concepts, nor "
    "alternatives in a signature. The bundle names every class the model outputs (a zero word vector for those "
    "without one); an image the model predicts as such a class is served with that prediction, and its 1 vs 2 "
    "signature judges the top class that has a vector (its meaning cannot be checked against the class itself: "
    "a blind spot of the signature, not of the Mahalanobis member). The guard is calibrated and evaluated on clean "
    "images of every class, so --target-fpr holds for all clean traffic. The clean images are read batch by batch (--memory-budget: "
    "activations per tapped pass); --max-images caps their number (stratified over classes)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `detector` with `calibrate` and `evaluate`; returns the detector subparsers."""
    det = subparsers.add_parser("detector", help="calibrate and evaluate the adversarial-image guard")
    commands = det.add_subparsers(dest="detector_command", required=True)
    cal = commands.add_parser("calibrate", description=SUBJECT_POLICY,
                              help="write a guard bundle (reference bank, Mahalanobis, flagger) for the world CNN "
                                   "or your model (subject flags)")
    cal.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    cal.add_argument("--allow-few-images", action="store_true",
                     help="write the bundle even when the clean images are too few for --target-fpr (warned)")
    ev = commands.add_parser("evaluate", description=SUBJECT_POLICY,
                             help="AUROC / TPR at 5%% FPR / realised FPR per attack, with baselines and ROC curves")
    ev.add_argument("--out", type=Path, required=True, help="output directory (bundle/, detector_roc.png, detector_eval.json)")
    ev.add_argument("--sources", type=int, default=None, help="images attacked per attack; unset: each attack's own count")
    ev.add_argument("--quick", action="store_true", help="reduced setting: 60 images per attack, short C&W")
    ev.add_argument("--no-art", action="store_true", help="skip ART's BinaryActivationDetector")
    ev.add_argument("--adaptive", action="store_true",
                    help="also attack the guard, the Mahalanobis baseline, the signature and ART's detector knowing them "
                         "(naive / white-box / gray-box, eps 2/255 4/255 8/255 0.15; adaptive_evasion.png)")
    ev.add_argument("--adaptive-images", type=int, default=None, help="images attacked per cell (default 100)")
    ev.add_argument("--adaptive-steps", type=int, default=None, help="PGD steps of every adaptive attack (default 100)")
    ev.add_argument("--adaptive-eps", default=None, help="comma list of L-inf eps, fractions allowed (e.g. 8/255,0.15)")
    for p in (cal, ev):
        add_world_cache_flag(p, "embedded world cache (built when missing)", "--cache-dir")  # its former name kept
        p.add_argument("--world-seed", type=int, default=0,
                       help="embedded world to use: 0 is the default world; the shipped design was chosen on 1 and 2 "
                            "(default: %(default)s)")
        defer_config_flags(p, "semguard.evaluation.detector_eval:DetectorEvalConfig", detector_flags)
        add_subject_flags(p)
        p.add_argument("--memory-budget", type=float, default=4.0, metavar="GIB",
                       help="GiB of activations one tapped pass holds (images per pass follow from it); the clean "
                            "images are read batch by batch, so peak memory does not grow with their number")
        p.add_argument("--max-images", type=int, default=None, metavar="N",
                       help="at most N clean images (stratified over the classes with a word vector; default: all)")
    cal.set_defaults(func=run_calibrate)
    ev.set_defaults(func=run_evaluate)


def detector_flags() -> tuple[Flag, ...]:
    """Flags of DetectorEvalConfig and its CalibrationConfig (`detector.*`); choices from the constants they
    validate with (imported here, not at module level: torch, torchvision, scipy)."""
    from semguard.detector.flagger import FEATURE_KINDS, METHODS
    from semguard.detector.reference import REDUCTIONS, SPACES

    bank_reductions = tuple(r for r in REDUCTIONS if r != "exact")  # "exact" is what narrower layers get anyway
    return (
        Flag("--method", "detector.method", "flagger: gaussian (clean images only), logistic (also trained on MI-FGSM "
             "images) or ensemble (logistic members, the most surprised one scores)", METHODS),
        Flag("--features", "detector.features", f"comma list of {', '.join(FEATURE_KINDS)}"),
        Flag("--space", "detector.space", "similarity space of the signature", SPACES),
        Flag("--target-fpr", "detector.target_fpr", "false-positive rate the threshold is set for"),
        Flag("--references", "detector.k", "reference concepts K"),
        Flag("--bank-max-width", "detector.bank_max_width",
             "store layers wider than this reduced in the reference bank (fast mode); unset: exact"),
        Flag("--bank-reduction", "detector.bank_reduction", "how --bank-max-width reduces a wide layer", bank_reductions),
        Flag("--bank-dim", "detector.bank_projection_dim", "coordinates a layer reduced by --bank-max-width keeps "
             "(sketch, projection); more follow the exact bank more closely and cost a larger bank"),
        Flag("--eval-fraction", "eval_fraction", "share of test images held out"),
        Flag("--seed", "seed", "seed of the clean split and of the calibration"),
        Flag("--quiet", "progress", "no progress bars"),
    )


def _config(args: argparse.Namespace) -> DetectorEvalConfig:
    from semguard.evaluation.detector_eval import DetectorEvalConfig, quick_config

    cfg = config_from_flags(args, DetectorEvalConfig(), detector_flags())
    # one --seed: the clean split `evaluate` holds out and the calibration inside it
    cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, seed=cfg.seed))
    if getattr(args, "no_art", False):
        cfg = dataclasses.replace(cfg, art_layer=None)
    if getattr(args, "quick", False):
        cfg = quick_config(cfg)
    if getattr(args, "sources", None):
        cfg = dataclasses.replace(cfg, attacks=tuple(dataclasses.replace(a, n_sources=args.sources) for a in cfg.attacks))
    if getattr(args, "adaptive", False):
        cfg = dataclasses.replace(cfg, adaptive=_adaptive_config(args))
    return cfg


def _adaptive_config(args: argparse.Namespace):
    from fractions import Fraction

    from semguard.evaluation.adaptive_eval import AdaptiveConfig

    changes = {k: v for k, v in (("n_images", args.adaptive_images), ("iterations", args.adaptive_steps)) if v is not None}
    if args.adaptive_eps:
        try:
            changes["eps"] = tuple(float(Fraction(e.strip())) for e in args.adaptive_eps.split(","))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--adaptive-eps: a comma list of numbers or fractions, got {args.adaptive_eps!r}") from None
    if args.no_art:
        changes["detectors"] = tuple(d for d in AdaptiveConfig().detectors if d != "art_binary_activation")
    return AdaptiveConfig(**changes)


def _checked_config(args: argparse.Namespace) -> DetectorEvalConfig:
    """_config, a bad value ending the command with its message (before the world is built)."""
    from semguard.detector.calibrate import ensemble_members

    try:
        cfg = _config(args)
        ensemble_members(cfg.detector)  # the flagger's members against the features, before any work
        return cfg
    except ValueError as err:
        raise SystemExit(f"semguard detector {args.detector_command}: {err}") from None


def run_calibrate(args: argparse.Namespace) -> int:
    from semguard.evaluation.detector_eval import calibrate_subject_guard

    cfg = _checked_config(args)
    subject = _subject(args, cfg.progress)
    report = _on_subject(args, calibrate_subject_guard, subject, args.out, cfg, args.max_images, args.allow_few_images,
                         args.memory_budget)
    _print_header(subject, (report.clean_accuracy, report.n_fit + report.n_calib))
    return _print_calibration(report)


def _print_header(subject, measured: tuple[float, int]) -> None:
    from semguard.subject.header import render_subject_header, subject_header

    print("\n".join(render_subject_header(subject_header(subject, measured=measured))))


def _print_calibration(report) -> int:
    """The bundle's figures (held-out AUROC and realised FPR always), its warnings loudly on stderr."""
    for warning in report.warnings:
        print(f"WARNING: bundle {report.bundle_dir}: {warning}", file=sys.stderr)
    print(json.dumps({"bundle": str(report.bundle_dir), "threshold": report.threshold, "fpr_calib": report.fpr_calib,
                      "auroc_heldout": report.auroc_heldout, "n_attack_heldout": report.n_attack_heldout,
                      "n_fit": report.n_fit, "n_calib": report.n_calib, "references": report.n_references,
                      "warnings": list(report.warnings)}, indent=2))
    return 0


def _subject(args: argparse.Namespace, progress: bool):
    """The subject the flags name (semguard.subject.Subject; the embedded world when they name none)."""
    from semguard.subject.core import load_subject

    try:
        if args.max_images is not None and args.max_images < 4:
            raise ValueError(f"--max-images must be >= 4, got {args.max_images}")
        return load_subject(subject_spec_from_args(args, world_cache=args.world_cache, world_seed=args.world_seed),
                            progress)
    except ValueError as err:
        raise SystemExit(f"semguard detector {args.detector_command}: {err}") from None


def _on_subject(args: argparse.Namespace, run, *run_args):
    """run(*run_args), a ValueError (bad input found on the way) ending the command with its message."""
    try:
        return run(*run_args)
    except ValueError as err:
        raise SystemExit(f"semguard detector {args.detector_command}: {err}") from None


def run_evaluate(args: argparse.Namespace) -> int:
    from semguard.evaluation.detector_eval import evaluate_subject_detector

    cfg = _checked_config(args)
    subject = _subject(args, cfg.progress)
    ev = _on_subject(args, evaluate_subject_detector, subject, args.out, cfg, args.max_images, args.memory_budget)
    split = ev.results["split"]
    _print_header(subject, (ev.results["clean_accuracy"], split["n_calibration"] + split["n_evaluation"]))
    print(format_results(ev.results))
    if "adaptive" in ev.results:
        from semguard.evaluation.adaptive_eval import format_adaptive

        print(format_adaptive(ev.results["adaptive"]) + f"\nadaptive figure: {Path(args.out) / 'adaptive_evasion.png'}")
    print(f"bundle: {ev.bundle_dir}\nROC curves: {ev.roc_path}\nfigures: {Path(args.out) / 'detector_eval.json'}")
    return 0


def format_results(results: dict) -> str:
    """A table: per attack, AUROC / TPR at 5% FPR of every detector, realised FPR and image counts."""
    lines = ["attack           n_adv  detector  (tpr@5%)  fpr_real  signature  mahalanobis  others"]
    for name, a in results["per_attack"].items():
        others = {**a.get("baselines", {}), **a.get("controls", {})}
        rest = " ".join(f"{k}={v['auroc']:.3f}" for k, v in others.items() if k != "mahalanobis")
        maha = others.get("mahalanobis", {}).get("auroc", float("nan"))
        lines.append(f"{name:16s} {a['n_adversarial']:5d}  {a['auroc']:.3f}     ({a['tpr_at_5fpr']:.3f})   "
                     f"{a['fpr_realised']:.3f}     {a.get('signature_only_auroc', float('nan')):.3f}      {maha:.3f}  {rest}")
    return "\n".join(lines)
