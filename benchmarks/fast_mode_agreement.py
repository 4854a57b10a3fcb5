"""How closely a reduced ("fast") reference bank follows the exact one, on a trained network and real images.

Run: python benchmarks/fast_mode_agreement.py [--world-seed 0] [--max-width 1024] [--dim 1021] [--out DIR]
     python benchmarks/fast_mode_agreement.py --bundles EXACT FAST --photos DIR [--attack-set DIR] [--trust-model-code]

bench_guard.py times fast mode on resnet50, but without trained weights a random network's
signature is noise, so agreement measured there says little. Here the embedded world's trained
CNN plays the large model: its layers wider than --max-width (9 of 14: 4096 and 2048 features)
are stored reduced to --dim coordinates, as `semguard detector calibrate --bank-max-width` does
for resnet50 (4096 -> 4093), and for each reduction this prints, against the exact bank:

  * per image (held-out clean images and successful MI-FGSM 8/255 images): the signature
    fraction's mean absolute difference and correlation across images over the reduced layers,
    the Spearman correlation of the shipped detector's scores, and how often the flags agree;
  * the whole evaluation of `semguard detector evaluate` (same split, training attacks and
    held-out attacks): AUROC of the shipped detector and of the signature alone, per attack.

--out keeps the bundles (DIR/exact, DIR/sketch, ...) for benchmarks/bench_guard.py --bundle.

--bundles EXACT FAST: two bundles `semguard detector calibrate` wrote for one model on the same images,
one exact and one with --bank-max-width (e.g. EfficientNet-Lite0 on foolbox's 20 ImageNet photos, see
benchmarks/real_assets.py); the per-image table on the photos at --photos (class folders, read at the
bundle's size from a centre crop of the short side resized by 256/224) and on the successful images of
an attack set on that model (`semguard attack generate`), over the layers the fast bank reduces.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from semguard.subject.core import world_subject
from semguard.evaluation.detector_eval import (
    SMALL_MIFGSM, AttackSpec, DetectorEvalConfig, evaluate_subject_detector, plan_attack, run_attack, split_clean,
)
from semguard.config_flags import add_world_cache_flag
from semguard.detector.guard import Guard
from semguard.detector.signature import reduction_agreement
from semguard.models.inputs import as_model_input, predict
from semguard.world.build import WorldSettings
from semguard.world.inputs import load_world_inputs

REDUCTIONS = ("exact", "sketch", "projection", "channel_pool")


def per_image(exact: Guard, reduced: Guard, images: torch.Tensor) -> dict[str, float]:
    a, b = exact.inspect_arrays(images), reduced.inspect_arrays(images)
    with torch.no_grad():
        acts = exact.tap(images).acts
    agree = reduction_agreement(acts, a.predicted, exact.bundle.bank, reduced.bundle.bank)
    layers = [i for i, n in enumerate(exact.bundle.bank.layers) if n in reduced.bundle.bank.reductions]
    return {"fraction_mae": float(agree.fraction_mae[layers].mean()), "fraction_corr": float(agree.fraction_corr[layers].mean()),
            "score_spearman": float(spearmanr(a.score, b.score).statistic), "flags_agree": float(np.mean(a.flagged == b.flagged))}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-seed", type=int, default=0)
    add_world_cache_flag(ap, "where the world is built and reused")
    ap.add_argument("--max-width", type=int, default=1024, help="layers wider than this are reduced")
    ap.add_argument("--dim", type=int, default=1021, help="sketch / projection output dimension (prime: see CalibrationConfig)")
    ap.add_argument("--images", type=int, default=500, help="clean images for the per-image comparison")
    ap.add_argument("--reductions", default=",".join(REDUCTIONS[1:]),
                    help=f"comma-separated reduced banks to compare with exact (of {', '.join(REDUCTIONS[1:])})")
    ap.add_argument("--out", type=Path, default=None, help="keep the bundles here (default: a temporary folder)")
    ap.add_argument("--bundles", type=Path, nargs=2, metavar=("EXACT", "FAST"), default=None,
                    help="compare these two written bundles instead of evaluating the world")
    ap.add_argument("--photos", type=Path, default=None, help="with --bundles: clean images (class folders)")
    ap.add_argument("--attack-set", type=Path, default=None, help="with --bundles: an attack set on the same model")
    ap.add_argument("--trust-model-code", action="store_true", help="with --bundles: allow an entry-point model")
    return ap


def compare_bundles(args: argparse.Namespace) -> None:
    """The per-image table for two written bundles on real photos and an attack set's successful images."""
    from semguard.attacks.store import load_attack_set
    from semguard.detector.bundle import read_bundle
    from semguard.subject.images import Transform, scan_images

    if args.photos is None:
        raise SystemExit("--bundles needs --photos (the clean images to compare on)")
    exact, fast = (Guard(read_bundle(d, trust_model_code=args.trust_model_code)) for d in args.bundles)
    _, size, _ = exact.info.input_shape
    source = scan_images(args.photos, None, progress=False)
    sets = {"clean photos": source.image_set(Transform(size, round(size * 256 / 224))).load(np.arange(len(source.labels)))}
    if args.attack_set is not None:
        attacks = load_attack_set(args.attack_set).successful()
        sets["attack set (successful)"] = torch.from_numpy(attacks.images()).clamp(0, 1)
    bank = {k: sum(g.bundle.bank.bytes_per_layer().values()) / 2**20 for k, g in (("exact", exact), ("fast", fast))}
    reduced = {n: r.kind for n, r in fast.bundle.bank.reductions.items()}
    print(f"{exact.info.model_name}: exact bank {bank['exact']:.2f} MiB ({args.bundles[0]}), fast bank "
          f"{bank['fast']:.2f} MiB ({args.bundles[1]}: {len(reduced)} of {len(exact.bundle.bank.layers)} layers "
          f"reduced, {sorted(set(reduced.values()))}); K = {len(exact.bundle.bank.concepts)} references")
    print("| images | n | fraction MAE | fraction corr | score Spearman | flags agree | flagged exact / fast |")
    print("|---|---|---|---|---|---|---|")
    for name, images in sets.items():
        f = per_image(exact, fast, images)
        a, b = exact.inspect_arrays(images), fast.inspect_arrays(images)
        print(f"| {name} | {len(images)} | {f['fraction_mae']:.3f} | {f['fraction_corr']:.3f} | {f['score_spearman']:.3f} | "
              f"{f['flags_agree']:.3f} | {int(a.flagged.sum())} / {int(b.flagged.sum())} |")


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    if args.bundles is not None:
        return compare_bundles(args)
    reductions = ("exact", *args.reductions.split(","))
    if set(reductions) - set(REDUCTIONS):
        raise SystemExit(f"--reductions: unknown {sorted(set(reductions) - set(REDUCTIONS))}; choose from {REDUCTIONS[1:]}")
    inputs = load_world_inputs(WorldSettings(seed=args.world_seed), args.world_cache, progress=False)
    world, model = inputs.world, inputs.model
    shipped = DetectorEvalConfig()
    base = dataclasses.replace(shipped, variants=("signature_only",), art_layer=None, progress=False)
    x, y = as_model_input(world.test_images), world.test_labels.astype(np.int64)
    split = split_clean(y, base.eval_fraction, base.seed)
    s, t = plan_attack(y, predict(model, x, 256), split.evaluation, inputs.word_vectors, 300, base.seed + 1)
    sets = {"clean": x[split.evaluation[: args.images]],
            "mifgsm_8_255": run_attack(model, x, s, t, AttackSpec("a", "mifgsm", SMALL_MIFGSM)).successful}
    guards, figures = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out if args.out is not None else Path(tmp)
        for kind in reductions:
            start = time.perf_counter()
            det = shipped.detector if kind == "exact" else dataclasses.replace(
                shipped.detector, bank_max_width=args.max_width, bank_reduction=kind, bank_projection_dim=args.dim)
            ev = evaluate_subject_detector(world_subject(inputs=inputs), root / kind, dataclasses.replace(base, detector=det))
            guards[kind] = Guard.load(ev.bundle_dir)
            figures[kind] = ev.results["per_attack"]
            print(f"  {kind}: evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    attacks = list(figures["exact"])
    bank = {k: sum(g.bundle.bank.bytes_per_layer().values()) / 2**20 for k, g in guards.items()}
    print(f"\nworld seed {args.world_seed}: layers wider than {args.max_width} reduced to {args.dim} "
          f"(channel_pool: to their channels); per image on {len(sets['clean'])} clean and "
          f"{len(sets['mifgsm_8_255'])} MI-FGSM 8/255 images")
    print("| bank | MiB | images | fraction MAE | fraction corr | score Spearman | flags agree |")
    print("|---|---|---|---|---|---|---|")
    for kind in reductions[1:]:
        for name, images in sets.items():
            f = per_image(guards["exact"], guards[kind], images)
            print(f"| {kind} | {bank[kind]:.2f} | {name} | {f['fraction_mae']:.3f} | {f['fraction_corr']:.3f} | "
                  f"{f['score_spearman']:.3f} | {f['flags_agree']:.3f} |")
    print(f"\nAUROC, shipped detector / signature alone (exact bank {bank['exact']:.2f} MiB)")
    print(f"| bank | {' | '.join(attacks)} |")
    print("|---|" + "---|" * len(attacks))
    for kind in reductions:
        cells = [f"{figures[kind][a]['auroc']:.4f} / {figures[kind][a]['signature_only_auroc']:.4f}" for a in attacks]
        print(f"| {kind} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
