"""`attack generate` in one process vs on Ray actors (attacks.distributed), same attack set.

Run: python benchmarks/bench_ray.py [--sources 20] [--batch-size 16] [--iterations 20]
WorldNet (random init, 20 classes) on random 32x32 images, each labelled with the model's own
prediction so every concept is a source; 6 targets per source, one shard per batch. Times each
whole call (planning + attacks + writes) into a fresh out dir on a local Ray of 2 CPUs started
once beforehand (its start time is printed apart). Prints images/s, the ratio to the
single-process run, and the overhead per shard of Ray with one actor (1 CPU, so 1 torch thread)
against the single process on 1 torch thread; and checks that every set is byte-identical.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from semguard.attacks.generate import GenerateParams, generate_attack_set, predict
from semguard.models.inputs import as_model_input
from semguard.models.worldnet import WorldNet, WorldNetConfig


def world(n_classes: int = 20, n_images: int = 300, seed: int = 0):
    """(model, images, labels, names, vectors); the head is recentred so predictions spread over all classes."""
    torch.manual_seed(seed)
    model = WorldNet(WorldNetConfig(num_classes=n_classes)).eval()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_images, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = model(as_model_input(images))
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight /= logits.std(0).unsqueeze(1)
        head.bias.sub_(logits.mean(0)).div_(logits.std(0))
    labels = predict(model, images, 100, "cpu")
    names = [f"concept{c}" for c in range(n_classes)]
    return model, images, labels, names, rng.normal(size=(n_classes, 16))


def set_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    params = GenerateParams(n_sources=args.sources, batch_size=args.batch_size, iterations=args.iterations)
    inputs, tmp = world(), Path(tempfile.mkdtemp(prefix="bench_ray_"))
    cpu = subprocess.run("lscpu | grep 'Model name' | cut -d: -f2", shell=True, capture_output=True, text=True)
    print(f"{platform.python_version()} torch {torch.__version__} | {os.cpu_count()} CPUs{cpu.stdout.strip() and ','} "
          f"{cpu.stdout.strip()} | {params}")

    runs: dict[str, float] = {}
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        start = time.perf_counter()
        result = generate_attack_set(*inputs, tmp / f"single{n}", params, progress=False)
        runs[f"single process, {n} torch thread{'s' * (n > 1)}"] = time.perf_counter() - start
    torch.set_num_threads(threads)
    n_images, n_shards = result.n_examples, len(result.computed)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from semguard.attacks.distributed import RayParams, generate_attack_set_ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    print(f"ray {ray.__version__} local start: {time.perf_counter() - start:.1f} s (not counted below)")
    from semguard.attacks.distributed import ShardAttacker

    start = time.perf_counter()
    probe = ray.remote(ShardAttacker).options(num_cpus=1).remote(inputs[0], params)
    ray.get(probe.__ray_ready__.remote())
    actor_start = time.perf_counter() - start
    ray.kill(probe)
    for actors in (1, 2):
        start = time.perf_counter()
        generate_attack_set_ray(*inputs, tmp / f"ray{actors}", params, RayParams(actors=actors), progress=False)
        runs[f"ray, {actors} actor{'s' * (actors > 1)} x 1 CPU"] = time.perf_counter() - start
    ray.shutdown()

    reference = set_bytes(tmp / "single1")
    base = next(iter(runs.values()))
    print(f"\n{n_images} images in {n_shards} shards of {args.batch_size}\n")
    print(f"{'run':34s} {'s':>7s} {'images/s':>9s} {'vs 1 thread':>12s} {'s/shard':>8s} {'identical':>10s}")
    for name, seconds in runs.items():
        path = tmp / {"s": "single", "r": "ray"}[name[0]]
        key = name.split(",")[1].split()[0]
        same = set_bytes(Path(f"{path}{key}")) == reference
        print(f"{name:34s} {seconds:7.2f} {n_images / seconds:9.1f} {base / seconds:11.2f}x "
              f"{seconds / n_shards:8.3f} {str(same):>10s}")
    overhead = (runs["ray, 1 actor x 1 CPU"] - actor_start - base) / n_shards
    print(f"\nstarting one actor (process, imports, model): {actor_start:.2f} s, once per run")
    print(f"Ray overhead per shard beyond that (1 actor vs 1 thread in-process): {overhead * 1000:+.0f} ms "
          f"({overhead / (base / n_shards):+.0%} of a shard's work)")


if __name__ == "__main__":
    main()
