"""Peak memory of `semguard detector calibrate` against the number of clean images (issue 27); not a timed test.

Writes, under --work, a user's setup at --size x --size pixels: a small ReLU6/GELU entry-point model
(random weights), an id-less labels file of --classes classes with one word each, .npy + vocabulary
vectors, and --per-class JPEG photos per class for every count in --counts (each count its own folder).
Then runs `detector calibrate --method gaussian` on each, each as its own process, and prints the
peak resident memory (`wait4`) side by side with the ratio to the smallest count. Extra arguments
after `--` go to every calibrate (e.g. `-- --memory-budget 0.25`).

    python benchmarks/calibrate_memory.py --work /tmp/calmem --counts 60,240
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def peak_gib(argv: list[str], cwd: Path) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS GiB, stderr) of one semguard command in its own process."""
    import os
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "semguard.cli", *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "PYTHONPATH": str(cwd)})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        err.seek(0)
        return os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss / 2**20, err.read()

MODULE = '''
import torch
from torch import nn


def small():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU6(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                        nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, {classes}))
    return net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
'''
WORDS = ["tench", "goldfish", "shark", "eagle", "crane", "bunting", "robin", "jay", "magpie", "owl",
         "frog", "turtle", "lizard", "snake", "spider", "crab", "lobster", "snail", "slug", "whale"]


def write_setup(work: Path, counts: list[int], classes: int, size: int) -> None:
    import torch
    from PIL import Image

    if classes > len(WORDS):
        raise SystemExit(f"--classes: at most {len(WORDS)}")
    (work / "calmodels.py").write_text(MODULE.format(classes=classes))
    sys.path.insert(0, str(work))
    import calmodels

    (work / "labels.txt").write_text("".join(w + "\n" for w in WORDS[:classes]))
    rng = np.random.default_rng(0)
    (work / "vectors").mkdir(exist_ok=True)
    np.save(work / "vectors" / "emb.npy", rng.standard_normal((classes, 16)).astype(np.float32))
    (work / "vectors" / "vocab.txt").write_text("".join(w + "\n" for w in WORDS[:classes]))
    bases = rng.integers(0, 256, (classes, 3))  # each class's colour, the same in every folder

    def photo(c: int, gen: np.random.Generator) -> np.ndarray:
        return np.clip(bases[c] + gen.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)

    for per_class in counts:
        gen = np.random.default_rng(per_class)  # a folder's photos do not depend on the other counts
        for c in range(classes):
            folder = work / f"photos{per_class}" / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                pixels = photo(c, gen)
                if not (folder / f"{k}.jpg").exists():
                    Image.fromarray(pixels).save(folder / f"{k}.jpg", quality=90)
    gen = np.random.default_rng(10**6)
    x = np.stack([photo(c, gen) for c in range(classes) for _ in range(10)])
    torch.save(fitted(calmodels.small()[0], x, np.repeat(np.arange(classes), 10), classes).state_dict(),
               work / "small.pth")


def fitted(net, pixels: np.ndarray, labels: np.ndarray, classes: int):
    """The net with its last layer fitted by least squares on pixels (n, H, W, 3) uint8 (so references exist)."""
    import torch

    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = net[:-1]((x.float() / 255 - 0.5) / 0.25).double()
        design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
        target = 10.0 * torch.nn.functional.one_hot(torch.from_numpy(labels), classes).double()
        w = torch.linalg.lstsq(design, target).solution
        net[-1].weight.copy_(w[:-1].T.float())
        net[-1].bias.copy_(w[-1].float())
    return net


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--counts", default="60,240", help="photos per class, comma list")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.counts.split(",")]
    write_setup(work, counts, args.classes, args.size)
    first = None
    for per_class in counts:
        out = work / f"bundle{per_class}"
        argv = ["detector", "calibrate", "--model-entry", "calmodels:small", "--weights", str(work / "small.pth"),
                "--images", str(work / f"photos{per_class}"), "--labels", str(work / "labels.txt"),
                "--vectors", str(work / "vectors"), "--input-size", str(args.size), "--method", "gaussian",
                "--out", str(out), "--quiet", "--world-cache", str(work / "world"), *extra]
        code, seconds, peak, err = peak_gib(argv, work)
        if code != 0:
            print(err[-2000:])
            return code
        first = first or peak
        print(f"calibrate {per_class * args.classes:6d} images  {seconds:7.1f} s  peak RSS {peak:.3f} GiB  "
              f"x{peak / first:.2f} of the first  {' '.join(extra)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
