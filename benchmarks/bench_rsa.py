"""2 vs 2: loop-by-definition reference vs detector.rsa.two_vs_two, and permutation throughput.

Run: python benchmarks/bench_rsa.py [--permutations 50]
Prints one table: seconds per call and the speed-up of the exact vectorised form.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from semguard.detector.rsa import correlation_matrix, two_vs_two
from semguard.detector.significance import permutation_test_two_vs_two


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def two_vs_two_loop(c_i: np.ndarray, c_d: np.ndarray) -> float:
    """The definition, one concept pair at a time (numpy inside, Python loop over pairs)."""
    w = len(c_i)
    score = 0.0
    for a in range(w):
        for b in range(a + 1, w):
            keep = np.ones(w, bool)
            keep[[a, b]] = False
            i1, i2, d1, d2 = c_i[a, keep], c_i[b, keep], c_d[a, keep], c_d[b, keep]
            diff = pearson(i1, d1) + pearson(i2, d2) - pearson(i1, d2) - pearson(i2, d1)
            score += 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0
    return score / (w * (w - 1) / 2)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matrices(w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(w, 300))
    return correlation_matrix(x[:, :200]), correlation_matrix(x[:, 100:] + rng.normal(size=(w, 200)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--permutations", type=int, default=50, help="permutations timed at w=838")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (on shared cores more threads than free cores stall badly)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'w':>5} {'loop s':>10} {'two_vs_two s':>13} {'speed-up':>9}  agree")
    for w in (100, 200):
        c_i, c_d = matrices(w)
        loop_s = best_of(lambda: two_vs_two_loop(c_i, c_d), 1)
        fast_s = best_of(lambda: two_vs_two(c_i, c_d), 5)
        agree = abs(two_vs_two_loop(c_i, c_d) - two_vs_two(c_i, c_d)) < 1e-9
        print(f"{w:>5} {loop_s:>10.3f} {fast_s:>13.4f} {loop_s / fast_s:>8.0f}x  {agree}")
    c_i, c_d = matrices(838)
    fast_s = best_of(lambda: two_vs_two(c_i, c_d), 3)
    print(f"{838:>5} {'-':>10} {fast_s:>13.4f} {'-':>9}")
    c_sets = np.stack([matrices(838, seed)[0] for seed in range(5)])
    for sets, c in ((1, c_i), (5, c_sets)):
        start = time.perf_counter()
        permutation_test_two_vs_two(c, c_d, n_permutations=args.permutations, seed=0)
        rate = args.permutations / (time.perf_counter() - start)
        print(f"permutations at w=838, {sets} image set(s): {rate:.2f}/s -> 1000 in {1000 / rate / 60:.1f} min")


if __name__ == "__main__":
    main()
