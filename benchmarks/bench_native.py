"""The native kernels (detector/native.py) against the eager torch they replace, per call, side by side.

Run: python benchmarks/bench_native.py [--repeats 7] [--threads 1]

Per activation shape (resnet50's ReLU maps at batch 32, and one at batch 1): a plain read of the map
(`x.sum()`, the bandwidth floor), the eager count sketch + eager float64 channel means (what the fast
mode's guard runs without the kernel), and the kernel doing both in one read; then the 1 vs 2 margins of
49 layers x 32 images x 999 alternatives (K = 100 references, 1000 labels), eager vs kernel. Prints the
best of --repeats per cell, the ratio, and how far the outputs are apart.
"""
from __future__ import annotations

import argparse
import time

import torch

from semguard.detector.mahalanobis import _reduce_rows_float64
from semguard.detector.native import load_kernels
from semguard.detector.reference import Reduction, count_sketch, label_terms, sketch_signs
from semguard.detector.signature import one_vs_two_margins

SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7), (1, 256, 56, 56)]
DIM = 4093


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = load_kernels()
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print("| map (B, C, H, W) | MB | read ms | eager sketch + channel means ms | kernel ms | eager / kernel | "
          "sketch max diff (of its max) | channel means max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for b, c, h, w in SHAPES:
        x = torch.relu(torch.randn(b, c * h * w, generator=gen))
        pool = Reduction("channel_pool", channels=c)
        signs, folded = sketch_signs(x.shape[1], DIM, 0, torch.float32)

        def eager():
            return count_sketch(x, DIM, 0), _reduce_rows_float64(pool, x)

        def native():
            fold, mean, channels = kernels.sketch_and_channel_means(x, signs, DIM, c)
            return fold - mean.float()[:, None] * folded, channels

        (es, ec), (ns, nc) = eager(), native()
        read, e, n = best_ms(x.sum, args.repeats), best_ms(eager, args.repeats), best_ms(native, args.repeats)
        print(f"| {(b, c, h, w)} | {x.numel() * 4 / 1e6:.0f} | {read:.1f} | {e:.1f} | {n:.1f} | {e / n:.2f}x | "
              f"{float((es - ns).abs().max() / es.abs().max()):.1e} | {float(((ec - nc).abs() / ec.abs().clamp_min(1e-300)).max()):.1e} |")

    layers, batch, k, labels = 49, 32, 100, 1000
    terms = label_terms(torch.rand(labels, k, dtype=torch.float64, generator=gen), torch.randperm(labels, generator=gen)[:k].numpy())
    profiles = torch.rand(layers, batch, k, dtype=torch.float64, generator=gen) * 2 - 1
    predicted = torch.randint(0, labels, (batch,), generator=gen)
    alternatives = torch.stack([torch.tensor([a for a in range(labels) if a != int(p)]) for p in predicted])
    want = one_vs_two_margins(profiles, predicted, terms, alternatives)
    got = kernels.one_vs_two_margins(profiles, predicted, terms, alternatives)
    e = best_ms(lambda: one_vs_two_margins(profiles, predicted, terms, alternatives), args.repeats)
    n = best_ms(lambda: kernels.one_vs_two_margins(profiles, predicted, terms, alternatives), args.repeats)
    print(f"\nmargins ({layers}, {batch}, {labels - 1}): eager {e:.1f} ms, kernel {n:.1f} ms, {e / n:.2f}x; "
          f"{int((got != want).sum())} of {want.numel()} differ, by at most {float((got - want).abs().max()):.1e}")


if __name__ == "__main__":
    main()
