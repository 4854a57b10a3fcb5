"""MI-FGSM cost: ART's MomentumIterativeMethod vs the native loop vs the floor, same model and batch.

Run: python benchmarks/bench_attack.py [--models worldnet resnet50] [--repeats 3] [--resnet-repeats 1] [--threads N]
The floor is `iterations` x (forward + gradient with respect to the input), the least any
gradient attack of that many iterations can cost. Prints seconds per batch (best of the
repeats) and the ratios native/floor, ART/floor, ART/native, and whether the two
backends gave identical images.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch
import torch.nn.functional as F
import torchvision

from semguard.attacks.mifgsm import mifgsm
from semguard.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalized
from semguard.models.worldnet import WorldNet

ITERATIONS = 20


def floor(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """iterations x (forward + d loss / d input): the attack without its arithmetic."""
    x = images
    for _ in range(ITERATIONS):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), targets), x)
        x = images + 0 * grad  # keep the data dependency, change nothing
    return x


def best_of_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each fn over `repeats` rounds, the fns run in turn within a round, so that
    load from other processes on a shared machine hits every method alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, oneDNN kernel choice, ART import
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def workloads(names: list[str]):
    g = torch.Generator().manual_seed(0)
    if "worldnet" in names:
        torch.manual_seed(0)
        yield "worldnet 32x32 b32", WorldNet().eval(), torch.rand(32, 3, 32, 32, generator=g), 100
    if "resnet50" in names:
        torch.manual_seed(0)
        model = Normalized(torchvision.models.resnet50(weights=None), IMAGENET_MEAN, IMAGENET_STD).eval()
        yield "resnet50 224 b4", model, torch.rand(4, 3, 224, 224, generator=g), 1000


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["worldnet", "resnet50"], choices=["worldnet", "resnet50"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best kept), small models")
    parser.add_argument("--resnet-repeats", type=int, default=1, help="timed runs per method for resnet50")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a loaded shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{ITERATIONS} iterations, eps 0.15, step 0.03, decay 1.0")
    print(f"{'workload':<20} {'floor s':>8} {'native s':>9} {'ART s':>8} {'native/floor':>13} "
          f"{'ART/floor':>10} {'ART/native':>11}  identical")
    for name, model, images, n_classes in workloads(args.models):
        targets = torch.randint(0, n_classes, (len(images),), generator=torch.Generator().manual_seed(1))
        repeats = args.resnet_repeats if name.startswith("resnet50") else args.repeats
        outputs = {}

        def run(backend):
            return lambda: outputs.__setitem__(backend, mifgsm(model, images, targets, iterations=ITERATIONS,
                                                                backend=backend))

        t = best_of_interleaved({"floor": lambda: floor(model, images, targets),
                                 "native": run("native"), "art": run("art")}, repeats)
        t_floor, t_native, t_art = t["floor"], t["native"], t["art"]
        same = torch.equal(outputs["native"], outputs["art"])
        print(f"{name:<20} {t_floor:8.3f} {t_native:9.3f} {t_art:8.3f} {t_native / t_floor:13.2f} "
              f"{t_art / t_floor:10.2f} {t_art / t_native:11.2f}  {same}", flush=True)


if __name__ == "__main__":
    main()
