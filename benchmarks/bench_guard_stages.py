"""The guard's signature and density stages, this checkout vs an older one, interleaved in one process.

Run: python benchmarks/bench_guard_stages.py --baseline DIR [--batches 1 32] [--repeats 7]

DIR is a checkout of an older commit (e.g. `git archive <commit> | tar -x -C DIR`); its
detector/reference.py, signature.py and mahalanobis.py are loaded beside this checkout's, and both
compute the same stage on the same resnet50 activations (random init, 49 ReLUs tapped, random
[0, 1] images): the fast-mode signature (every layer count-sketched to 4093 coordinates, K = 100
references, all 999 other labels as alternatives) and the Mahalanobis member (channel means, 1000
class means and a tied precision per layer, float64). The parameters are random: the figures are
about cost, which does not depend on the values. Times are the calling thread's CPU time (torch
threads 1), median of --repeats runs, old and new alternating, so other jobs on a shared machine
delay both alike; both results are checked equal first (to 1e-12 relative: the Mahalanobis member's
batched GEMMs may round float64's last bit differently).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semguard.detector import mahalanobis as new_mahalanobis
from semguard.detector.calibrate import layer_shapes
from semguard.detector import reference as new_reference
from semguard.detector import signature as new_signature
from semguard.detector.layers import LayerTap
from semguard.models.presets import preset_layers
from semguard.models.normalize import imagenet_classifier

K, CLASSES, DIM = 100, 1000, 4093


def load_old(baseline: Path, name: str):
    """detector/<name>.py of the baseline checkout, as module old_<name> (it imports the rest from this checkout)."""
    spec = importlib.util.spec_from_file_location(f"old_{name}", baseline / "detector" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parts(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict:
    """Random bank and Mahalanobis arrays with the shapes a resnet50 fast-mode bundle has."""
    layers = list(shapes)
    channels = {n: s[0] for n, s in shapes.items()}  # (C, H, W) maps: Lee et al.'s channel means
    precisions = {}
    for n, c in channels.items():
        a = rng.normal(size=(c, c)) / np.sqrt(c)
        precisions[n] = a @ a.T + np.eye(c)
    return dict(
        layers=tuple(layers), channels=channels, precisions=precisions,
        prototypes={n: rng.normal(size=(K, DIM)).astype(np.float32) for n in layers},
        concepts=np.sort(rng.choice(CLASSES, K, replace=False)),
        label_profiles=rng.uniform(-1, 1, size=(CLASSES, K)),
        means={n: rng.normal(size=(CLASSES, c)) for n, c in channels.items()},
    )


def stages(ref, sig, maha, p: dict):
    """(signature, density) callables of one checkout's modules on the arrays `p`."""
    bank = ref.ReferenceBank(p["layers"], p["prototypes"], p["concepts"], p["label_profiles"], "words",
                             {n: ref.Reduction("sketch", dim=DIM, seed=0) for n in p["layers"]})
    det = maha.MahalanobisDetector(p["layers"], p["means"], p["precisions"],
                                   {n: ref.Reduction("channel_pool", channels=c) for n, c in p["channels"].items()})
    return (lambda acts, pred: sig.signature_parts(acts, pred, bank)), (lambda acts, pred: det.layer_scores(acts))


def median_cpu_ms(fn, *args, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.thread_time()
        fn(*args)
        out.append(1e3 * (time.thread_time() - t))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the older commit")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not (args.baseline / "detector" / "signature.py").is_file():
        raise SystemExit(f"--baseline: {args.baseline} has no detector/signature.py (not a semguard checkout)")
    torch.set_num_threads(1)
    old = [load_old(args.baseline, n) for n in ("reference", "signature", "mahalanobis")]
    tap = LayerTap(imagenet_classifier("resnet50").eval(), preset_layers("resnet50"))
    shapes = layer_shapes(tap, (3, 224, 224))
    print(f"baseline {args.baseline}; torch {torch.__version__}, threads {torch.get_num_threads()}, CPU time per call")
    print("| stage | batch | old ms | new ms | new / old |\n|---|---|---|---|---|")
    for batch in args.batches:
        with torch.no_grad():
            out = tap(torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)))
        pred = out.logits.argmax(1)
        p = parts(shapes, np.random.default_rng(0))
        news = stages(new_reference, new_signature, new_mahalanobis, p)
        olds = stages(*old, p)
        for name, new_fn, old_fn in zip(("signature", "density"), news, olds):
            a, b = new_fn(out.acts, pred), old_fn(out.acts, pred)  # also the warm-up (lazy caches)
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=0)  # float64's last bits: batched GEMMs
            times = {"old": [], "new": []}
            for _ in range(args.repeats):
                times["old"] += median_cpu_ms(old_fn, out.acts, pred, repeats=1)
                times["new"] += median_cpu_ms(new_fn, out.acts, pred, repeats=1)
            o, n = statistics.median(times["old"]), statistics.median(times["new"])
            print(f"| {name} | {batch} | {o:.1f} | {n:.1f} | {n / o:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
