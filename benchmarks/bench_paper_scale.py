"""The paper's study at the paper's shapes, with synthetic content (issue 11, "Scale and speed").

ResNet-50 at 224 with random weights, 838 classes x 5 JPEG images in an ImageNet-style folder
(wnid folders, LOC_synset_mapping.txt), a word2vec binary of 1,000,000 words x 300 dimensions:
written once into --cache and reused. Everything goes through the subject loaders the commands
use (semguard.subject.core.load_subject). Prints side by side:

  - word vectors: the first conversion to the native mmap folder, and a later load (mmap reuse);
  - activation extraction (all 49 ReLU layers tapped and copied out) vs the plain forward pass, images/s;
  - one pass of `semguard analyze two-vs-two`'s plan under its 4 GiB budget, on one image set of
    838 images (the fullest pass): forward + tap seconds and C_I seconds per layer;
  - 2 vs 2 + permutations for one layer at w = 838, 5 image sets;
  - the peak resident memory of this whole process;
  - the projected time of the full study (Figure 1: 50 layers x 5 sets, 1000 permutations each) on
    this machine from the measured costs, and on one GPU from the same operation counts at stated
    rates (a projection, not a measurement).

Run (the full shapes; 46 min on a shared core of a 2-core EPYC, BENCHMARKS.md, Paper scale):
    nice -n 10 python benchmarks/bench_paper_scale.py
Quick smoke (about a minute):
    python benchmarks/bench_paper_scale.py --classes 20 --words 20000 --permutations 5 --extract-images 8
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

PAPER_CLASSES, PAPER_PER_CLASS, PAPER_WORDS, PAPER_DIMS = 838, 5, 1_000_000, 300
SPILL = Path(".semguard/bench-spill")  # a pass never spills at these shapes and a 4 GiB budget
# What the GPU projection assumes (not measured: no GPU was lent to this benchmark): one H200-class GPU.
GPU_FP64_FLOPS = 30e12  # sustained float64 matmul (H200 peak: 67 TFLOP/s with tensor cores)
GPU_MEMORY_BYTES_S = 4.0e12  # sustained HBM bandwidth (H200 peak: 4.8 TB/s)
GPU_LAUNCH_S = 10e-6  # per kernel launch
GPU_FORWARD_IMAGES_S = 1500.0  # ResNet-50 fp32 inference, batch 32, all 49 layers copied to host
HOST_TO_GPU_BYTES_S = 20e9  # activations sent for C_I (pinned memory would be faster)
PERMUTATION_KERNELS = 60  # kernels per permutation batch in detector.significance (one permutation x 5 sets)
PERMUTATION_TEMPORARIES = 24  # (w, w) float64 temporaries per matrix (detector.significance._TEMPORARIES)


# --------------------------------------------------------------------------- synthetic assets


def write_images(root: Path, n_classes: int, per_class: int, seed: int = 0) -> tuple[Path, Path]:
    """val/<wnid>/ILSVRC2012_val_*.JPEG (500 x 375, smooth random content) and LOC_synset_mapping.txt."""
    from PIL import Image

    images, labels = root / "val", root / "LOC_synset_mapping.txt"
    marker = root / "images.json"
    if marker.is_file() and json.loads(marker.read_text()) == [n_classes, per_class]:
        return images, labels
    shutil.rmtree(images, ignore_errors=True)
    rng = np.random.default_rng(seed)
    number = 0
    for k in range(per_class):  # val numbering interleaves the classes, as ImageNet's does
        for c in range(n_classes):
            number += 1
            folder = images / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # upsampled: JPEG-like size and decode cost
            Image.fromarray(coarse).resize((500, 375), Image.BILINEAR).save(
                folder / f"ILSVRC2012_val_{number:08d}.JPEG", quality=90)
    labels.write_text("".join(f"n{c:08d} {class_word(c)}, concept {c}\n" for c in range(n_classes)))
    marker.write_text(json.dumps([n_classes, per_class]))
    return images, labels


def class_word(c: int) -> str:
    return f"concept{c:04d}"


def write_word2vec(path: Path, n_words: int, dims: int, n_classes: int, seed: int = 0) -> Path:
    """A word2vec binary (gensim's layout: header, then `word ` + float32 bytes per word); the class
    words are spread through the vocabulary, the rest are filler words."""
    marker = path.with_suffix(".json")
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()) == [n_words, dims, n_classes]:
        return path
    rng = np.random.default_rng(seed)
    stride = max(1, n_words // max(1, n_classes))
    with open(path, "wb") as f:
        f.write(f"{n_words} {dims}\n".encode())
        for start in range(0, n_words, 100_000):
            stop = min(start + 100_000, n_words)
            block = rng.standard_normal((stop - start, dims), dtype=np.float32)
            words = [class_word(i // stride) if i % stride == 0 and i // stride < n_classes else f"w{i:07d}"
                     for i in range(start, stop)]
            f.write(b"".join(w.encode() + b" " + row.tobytes() for w, row in zip(words, block)))
    marker.write_text(json.dumps([n_words, dims, n_classes]))
    return path


def write_weights(path: Path, n_classes: int) -> Path:
    import torchvision

    if not path.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet50(num_classes=n_classes).state_dict(), path)
    return path


# --------------------------------------------------------------------------- measurements


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def note(line: str) -> None:
    """A measurement as soon as it is made (stderr), so a stopped run still leaves its figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def vectors_times(vectors: Path, cache: Path, timings: dict, reconvert: bool) -> tuple[float, float]:
    """(first conversion s, mmap reuse s); the conversion is measured once and kept in timings."""
    from semguard.subject.vectors import load_subject_vectors

    if reconvert or "vectors_first_s" not in timings:
        shutil.rmtree(cache, ignore_errors=True)
        _, timings["vectors_first_s"] = timed(lambda: load_subject_vectors(vectors, cache, progress=False))
    kv, reuse = timed(lambda: load_subject_vectors(vectors, cache, progress=False))
    assert len(kv) > 0
    return timings["vectors_first_s"], reuse


def decoded_read_rate(subject, n_images: int, batch: int, folder: Path) -> float:
    """images/s of a later pass reading a set that analysis.subject_two_vs_two.DecodedSets decoded once."""
    from semguard.analysis.subject_two_vs_two import DecodedSets

    decoded = DecodedSets(subject.images, np.arange(n_images)[None], folder, batch)
    decoded.load(0, 0, 1)  # the first pass: decode into the disk array
    _, seconds = timed(lambda: [decoded.load(0, i, i + batch) for i in range(0, n_images, batch)])
    decoded.remove()
    return n_images / seconds


def forward_vs_extraction(subject, n_images: int, batch: int) -> tuple[float, float, float]:
    """(load images/s, plain forward images/s, tapped-and-copied images/s), best of two rounds."""
    from semguard.detector.layers import LayerTap

    x, load_s = timed(lambda: subject.images.load(np.arange(n_images)))
    model, tap = subject.model.eval(), LayerTap(subject.model, subject.layers)

    def plain():
        with torch.no_grad():
            for i in range(0, n_images, batch):
                model(x[i:i + batch])

    def tapped():
        with torch.no_grad():
            for i in range(0, n_images, batch):
                for a in tap(x[i:i + batch]).acts.values():
                    np.array(a.numpy())  # the copy out of the tap run_two_vs_two makes

    best = {"plain": np.inf, "tapped": np.inf}
    for _ in range(2):
        for name, fn in (("plain", plain), ("tapped", tapped)):
            best[name] = min(best[name], timed(fn)[1])
    return n_images / load_s, n_images / best["plain"], n_images / best["tapped"]


def one_pass(subject, sets, config, sizes: dict[str, int]) -> dict:
    """The fullest pass of the plan, on image set 0: forward + tap s, and C_I s per layer."""
    from semguard.analysis import subject_two_vs_two as s2
    from semguard.detector.layers import LayerTap

    w = sets.indices.shape[1]
    passes = s2.plan_passes(sizes, w, config.memory_budget_gib * 2**30)
    fullest = max(passes, key=lambda p: sum(sizes[n] for n in p.layers))
    corr_s: dict[str, float] = {}
    real = s2.layer_correlation
    names = iter(fullest.layers)

    def timed_correlation(acts, workspace, device):
        out, seconds = timed(lambda: real(acts, workspace, device))
        corr_s[next(names)] = seconds
        return out

    s2.layer_correlation = timed_correlation
    try:
        tap = LayerTap(subject.model, [n for n in fullest.layers if n != s2.PIXELS])
        one_set = s2.ImageSets(sets.concepts, sets.indices[:1], sets.too_few)
        bar = type("NoBar", (), {"update": lambda self, n: None})()
        c, total = timed(lambda: s2._pass_correlations(subject, tap, fullest, sizes, one_set, config,
                                                       torch.device("cpu"), SPILL, bar))
    finally:
        s2.layer_correlation = real
    return {"passes": len(passes), "layers": list(fullest.layers), "features": sum(sizes[n] for n in fullest.layers),
            "total_s": total, "corr_s": corr_s, "forward_s": total - sum(corr_s.values()),
            "c_i": next(iter(c.values()))[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=PAPER_CLASSES)
    p.add_argument("--per-class", type=int, default=PAPER_PER_CLASS)
    p.add_argument("--words", type=int, default=PAPER_WORDS)
    p.add_argument("--dims", type=int, default=PAPER_DIMS)
    p.add_argument("--permutations", type=int, default=1000, help="permutations timed for one layer (paper: 1000)")
    p.add_argument("--extract-images", type=int, default=64, help="images timed for forward vs extraction")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--memory-budget", type=float, default=4.0, help="GiB (TwoVsTwoConfig's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--cache", type=Path, default=Path(".semguard/bench-paper-scale"))
    p.add_argument("--reconvert", action="store_true", help="measure the vectors' first conversion again")
    p.add_argument("--json", type=Path, default=None, help="also write the raw measurements and projections here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run_start = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    timings_file = args.cache / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    key = [args.classes, args.per_class, args.words, args.dims]
    if timings.get("key") != key:
        timings = {"key": key}

    from semguard.analysis.subject_two_vs_two import TwoVsTwoConfig, choose_image_sets, layer_sizes
    from semguard.detector.rsa import correlation_matrix
    from semguard.detector.significance import permutation_test_two_vs_two
    from semguard.subject.core import SubjectSpec, load_subject
    from semguard.subject.vectors import vectors_cache_dir

    (images, labels), assets_s = timed(lambda: write_images(args.cache, args.classes, args.per_class))
    vectors, words_s = timed(lambda: write_word2vec(args.cache / f"vectors-{args.words}x{args.dims}.bin", args.words,
                                                    args.dims, args.classes))
    weights = write_weights(args.cache / f"resnet50-random-{args.classes}.pth", args.classes)
    world_cache = args.cache / "world"  # the converted vectors go beside it, in cache/vectors
    note(f"assets ready ({assets_s + words_s:.0f} s)")
    first, reuse = vectors_times(vectors, vectors_cache_dir(world_cache), timings, args.reconvert)
    timings_file.write_text(json.dumps(timings))
    note(f"vectors: first load {first:.1f} s, mmap reuse {reuse:.2f} s")
    spec = SubjectSpec(model="resnet50", weights=weights, images=images, labels=labels, vectors=vectors,
                       world_cache=world_cache)
    subject, subject_s = timed(lambda: load_subject(spec, progress=False))
    load_rate, plain_rate, tap_rate = forward_vs_extraction(subject, min(args.extract_images, len(subject.images)),
                                                            args.batch_size)
    read_rate = decoded_read_rate(subject, min(args.extract_images, len(subject.images)), args.batch_size,
                                  args.cache / "decoded")
    note(f"subject {subject_s:.1f} s; images/s: load {load_rate:.1f}, decoded-set read {read_rate:.0f}, "
         f"forward {plain_rate:.2f}, tapped {tap_rate:.2f}")

    config = TwoVsTwoConfig(memory_budget_gib=args.memory_budget, batch_size=args.batch_size, device="cpu",
                            progress=False)
    sets = choose_image_sets(subject.images.labels, subject.matched, min(args.per_class, config.image_sets))
    w, n_sets = sets.indices.shape[1], len(sets.indices)
    sizes = layer_sizes(subject.model, subject.layers, subject.images.load(sets.indices[0, :1]), torch.device("cpu"))
    passed = one_pass(subject, sets, config, sizes)
    note(f"fullest pass of {passed['passes']}: {passed['total_s']:.0f} s, forward {passed['forward_s']:.0f} s, "
         f"C_I {json.dumps({k: round(v, 1) for k, v in passed['corr_s'].items()})}, features {passed['features']}, "
         f"peak RSS so far {peak_rss_gib():.2f} GiB")

    c_d = correlation_matrix(subject.word_vectors[sets.concepts])
    c_is = np.stack([passed["c_i"]] * n_sets)  # the cost does not depend on the values
    perm, perm_s = timed(lambda: permutation_test_two_vs_two(c_is, c_d, n_permutations=args.permutations, seed=0,
                                                             device="cpu"))
    rss_gib = peak_rss_gib()
    note(f"2 vs 2 + {args.permutations} permutations, one layer: {perm_s:.0f} s")

    report(args, locals())


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return kib / 2**20


def gpu_projection(passes: int, w: int, features: int, n_layers: int, load_rate: float,
                   read_rate: float) -> dict[str, float]:
    """Seconds of the full Figure 1 on one GPU at the assumed rates above: an estimate from operation
    counts, not a measurement. Images are decoded in the main process (run_two_vs_two has no loader
    workers) at this machine's one-core rate, once per set; later passes read the decoded sets."""
    evaluations = n_layers * 1000 * 5  # (permutation, image set) 2 vs 2 evaluations
    per_evaluation = max(2 * w**3 / GPU_FP64_FLOPS, 2 * PERMUTATION_TEMPORARIES * 8 * w * w / GPU_MEMORY_BYTES_S)
    return {
        "activations": 5 * w * (1 / load_rate + (passes - 1) / read_rate + passes / GPU_FORWARD_IMAGES_S),
        "C_I": 5 * (2 * w * w * features / GPU_FP64_FLOPS + 4 * w * features / HOST_TO_GPU_BYTES_S),
        "permutations": evaluations * per_evaluation + n_layers * 1000 * PERMUTATION_KERNELS * GPU_LAUNCH_S,
    }


def report(args, m: dict) -> None:
    """The side-by-side table and the projections."""
    sizes, passed, w, n_sets = m["sizes"], m["passed"], m["w"], m["n_sets"]
    features = sum(sizes.values())  # pixels + 49 layers, per image
    corr_rate = sum(w * w * sizes[n] for n in passed["corr_s"]) / max(sum(passed["corr_s"].values()), 1e-9)
    n_layers = len(sizes)
    per_image_s = passed["forward_s"] / w  # read + decode + tapped forward + copy (the pass decodes)
    decode_saved_s = (passed["passes"] - 1) * 5 * w * (1 / m["load_rate"] - 1 / m["read_rate"])  # DecodedSets
    perm_1000_s = m["perm_s"] * 1000 / args.permutations
    full = {
        "activations (passes x sets x images)": passed["passes"] * 5 * w * per_image_s - decode_saved_s,
        "C_I (every layer, 5 sets)": 5 * w * w * features / corr_rate,
        "permutations (1000 per layer)": n_layers * perm_1000_s * 5 / n_sets,
    }
    gpu = gpu_projection(passed["passes"], w, features, n_layers, m["load_rate"], m["read_rate"])
    rows = [
        ("machine", f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), Python "
                    f"{platform.python_version()}, torch {torch.__version__}", ""),
        ("shapes", f"ResNet-50 @224 random, {args.classes} classes x {args.per_class} JPEG, "
                   f"{args.words:,} words x {args.dims}", "paper: 838 x 5, GoogleNews 3M x 300"),
        ("assets written or reused", f"{m['assets_s'] + m['words_s']:.1f} s", ""),
        ("vectors: first load (conversion to mmap)", f"{m['first']:.1f} s", ""),
        ("vectors: later load (mmap reuse)", f"{m['reuse']:.2f} s", f"{m['first'] / max(m['reuse'], 1e-9):.0f}x faster"),
        ("subject load (scan folder, model, vectors, match)", f"{m['subject_s']:.1f} s",
         f"{int(np.sum(m['subject'].matched))} of {len(m['subject'].classes)} classes matched"),
        ("image read + decode + transform", f"{m['load_rate']:.1f} images/s", ""),
        ("a later pass reading a decoded set", f"{m['read_rate']:.0f} images/s", "DecodedSets (passes > 1)"),
        ("plain forward", f"{m['plain_rate']:.2f} images/s", ""),
        ("extraction (49 layers tapped, copied out)", f"{m['tap_rate']:.2f} images/s",
         f"{m['plain_rate'] / m['tap_rate']:.2f}x the forward's time (target <= 1.2x)"),
        ("activations per image, all layers", f"{4 * features / 2**20:.1f} MiB",
         f"study: {4 * features * w * 5 / 1e9:.0f} GB, never held at once"),
        ("passes under the memory budget", f"{passed['passes']} at {args.memory_budget:g} GiB", ""),
        ("fullest pass, one image set", f"{passed['total_s']:.0f} s ({passed['forward_s']:.0f} s read + forward, "
         f"{sum(passed['corr_s'].values()):.0f} s C_I)", f"{len(passed['layers'])} layer(s), "
         f"{4 * w * passed['features'] / 2**30:.2f} GiB of activations"),
        ("C_I rate (w^2 k per second)", f"{corr_rate / 1e9:.2f} G", ""),
        (f"2 vs 2 + {args.permutations} permutations, one layer, w={w}, {n_sets} sets", f"{m['perm_s']:.0f} s",
         f"accuracy {m['perm'].accuracy:.3f} (random weights: ~0.5)"),
        ("peak resident memory, whole run", f"{m['rss_gib']:.2f} GiB", "target < 8 GiB"),
        ("this benchmark's wall time", f"{time.perf_counter() - m['run_start']:.0f} s", ""),
        ("PROJECTED full Figure 1, this machine", f"{sum(full.values()) / 3600:.1f} h",
         "; ".join(f"{k} {v / 3600:.1f} h" for k, v in full.items())),
        ("PROJECTED full Figure 1, one GPU", f"{sum(gpu.values()) / 60:.1f} min",
         "; ".join(f"{k} {v / 60:.1f} min" for k, v in gpu.items()) + f" (estimate, not measured: "
         f"{GPU_FP64_FLOPS / 1e12:.0f} TFLOP/s fp64, {GPU_MEMORY_BYTES_S / 1e12:.0f} TB/s, "
         f"{GPU_FORWARD_IMAGES_S:.0f} images/s forward, decode at this machine's one-core rate)"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<28}  {note}")
    if args.json is not None:
        raw = {k: m[k] for k in ("assets_s", "words_s", "first", "reuse", "subject_s", "load_rate", "read_rate",
                                 "plain_rate",
                                 "tap_rate", "perm_s", "rss_gib", "w", "n_sets")}
        raw["pass"] = {k: v for k, v in passed.items() if k != "c_i"}
        args.json.write_text(json.dumps({"args": vars(args), "measured": raw, "sizes": sizes, "projected_cpu_s": full,
                                         "projected_gpu_s": gpu}, indent=1, default=str))


if __name__ == "__main__":
    main()
