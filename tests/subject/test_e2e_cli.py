"""The issue's "Done when": real-format assets (a torchvision resnet18 state dict, an ImageNet-style
folder with wnid names and mixed-case suffixes, LOC_synset_mapping.txt, word2vec binary and GloVe
text) through the command line: `analyze two-vs-two`, `attack generate`, `attack analyze`,
`detector calibrate`, then `semguard serve --bundle` in a subprocess answering a tritonclient
request; and a bundle of a user's own model (`--model-entry`) that serve refuses without
`--trust-model-code` and serves with it.

The batch commands run in-process (`semguard.cli.main(argv)`: one import of torch for all of them);
serve runs as the operator runs it, `python -m semguard.cli serve`.
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from semguard.cli import main
from tests.subject.fixtures import INPUT_SIZE, write_subject_assets
from tests.service.subprocess_server import serving_port

pytestmark = pytest.mark.slow
WRONG_PER_CLASS = 1  # images of each class the fitted head sends to the next class (misclassified ones to analyse)


def fit_resnet_head(assets, world_cache: Path) -> None:
    """Rewrite the fixture's resnet18 state dict with a least-squares head on its random features, so the model
    gets every class's images right but the last WRONG_PER_CLASS, which it takes for the next class (a random
    resnet18 calls every image one class: no references to pick, nothing misclassified between classes)."""
    from semguard.subject.core import SubjectSpec, load_subject

    subject = load_subject(SubjectSpec(**assets.spec_kwargs(), world_cache=world_cache), progress=False)
    inner = subject.model.model  # Normalized(resnet18)
    labels = np.asarray(subject.images.labels)
    target = labels.copy()
    for c in np.unique(labels):
        last = np.flatnonzero(labels == c)[-WRONG_PER_CLASS:]
        target[last] = (c + 1) % len(subject.classes)
    head, inner.fc = inner.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = subject.model(subject.images.load(np.arange(len(labels)))).double()  # (N, 512)
        x = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
        onehot = 10.0 * torch.nn.functional.one_hot(torch.as_tensor(target), len(subject.classes)).double()
        w = torch.linalg.lstsq(x, onehot, driver="gelsd").solution  # (513, C)
        head.weight.copy_(w[:-1].T.float())
        head.bias.copy_(w[-1].float())
    inner.fc = head
    torch.save(inner.state_dict(), assets.weights)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    assets = write_subject_assets(root / "assets")
    fit_resnet_head(assets, root / "cache" / "world")
    return assets


def cache_flags(assets) -> list[str]:
    """--world-cache inside the test's tmp: the converted vectors go beside it, never into the working tree."""
    return ["--world-cache", str(assets.root.parent / "cache" / "world")]


@contextlib.contextmanager
def serving(bundle: Path, *flags: str, cwd: Path | None = None, env: dict | None = None) -> Iterator[int]:
    """`python -m semguard.cli serve --bundle BUNDLE` on a free port; yields the port, SIGTERM at the end."""
    cmd = [sys.executable, "-m", "semguard.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--grpc-port", "0", "--metrics-port", "0", "--torch-threads", "1", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        port = serving_port(proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave a server behind
            proc.communicate()
            raise
    assert proc.returncode == 0, err


def infer(port: int, model_name: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """One OIP v2 ModelInfer through tritonclient.grpc: the outputs as arrays."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        request = triton.InferInput("IMAGE", list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        reply = client.infer(model_name, [request])
        return {name: reply.as_numpy(name) for name in ("PREDICTION", "SCORE", "FLAG", "SIGNATURE")}
    finally:
        client.close()


def subject_images(assets, indices: list[int]) -> np.ndarray:
    """float32 (n, 3, 64, 64) images of the subject as the model takes them (the loaders' transform)."""
    from semguard.subject.core import SubjectSpec, load_subject

    spec = SubjectSpec(**assets.spec_kwargs(), world_cache=assets.root.parent / "cache" / "world")
    return load_subject(spec, progress=False).images.load(np.array(indices)).numpy()


def test_every_command_on_real_assets(assets, tmp_path, capsys):
    from semguard.attacks.store import load_attack_set
    from semguard.detector.guard import Guard

    start = time.perf_counter()
    laps = {}

    def lap(name: str) -> None:
        laps[name] = round(time.perf_counter() - start - sum(laps.values()), 1)

    flags = [*assets.flags(), *cache_flags(assets)]
    out = tmp_path

    assert main(["analyze", "two-vs-two", *assets.flags(vectors=assets.glove), *cache_flags(assets),
                 "--permutations", "20", "--image-sets", "3", "--quiet", "--out", str(out / "fig1")]) == 0
    fig1 = json.loads((out / "fig1" / "two_vs_two.json").read_text())
    assert fig1["concepts"] == 5 and len(fig1["layers"]) == len(fig1["accuracy"]) >= 10  # tiger shark left out
    assert (out / "fig1" / "two_vs_two_by_layer.png").stat().st_size > 0
    lap("two-vs-two")

    assert main(["attack", "generate", "--out", str(out / "set"), *flags, "--sources", "3", "--targets-per-source",
                 "2", "--iterations", "5", "--batch-size", "8"]) == 0
    attack_set = load_attack_set(out / "set")
    assert attack_set.complete and len(attack_set) == 6 and attack_set.header["subject"]["images"] == str(assets.images)
    assert "tiger shark" not in {r.source_label for r in attack_set.records} | {r.target_label for r in attack_set.records}
    assert len(attack_set.successful()) >= 1
    lap("attack generate")

    capsys.readouterr()
    assert main(["attack", "analyze", "--attack-set", str(out / "set"), "--out", str(out / "analysis"),
                 "--permutations", "20", "--reference-size", "5", "--max-images", "20"]) == 0  # the subject: the set's
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    header = analysis["subject"].pop("header")  # the subject header (semguard.subject.header), printed first
    assert analysis["subject"] == {"name": "resnet18", "classes": 6, "with_word_vector": 5, "test_images": 20}
    assert header["images_analysed"] == 20 and capsys.readouterr().out.startswith("subject: resnet18 (weights ")
    assert analysis["misclassified"]["count"] >= 1
    lap("attack analyze")

    capsys.readouterr()
    # the gaussian flagger: the default ensemble also trains on MI-FGSM images (~45 s of attacks on 2 CPU cores)
    assert main(["detector", "calibrate", "--out", str(out / "bundle"), "--subject", str(assets.toml),
                 *cache_flags(assets), "--method", "gaussian", "--allow-few-images", "--quiet"]) == 0
    lap("detector calibrate")
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    guard = Guard.load(out / "bundle")
    assert guard.info.model_name == "resnet18" and len(guard.info.labels) == 6 and report["references"] >= 2

    images = subject_images(assets, [0, 1, 2, 3])
    want = guard.inspect_arrays(images)
    with serving(out / "bundle") as port:
        got = infer(port, "resnet18", images)
    np.testing.assert_array_equal(got["PREDICTION"], want.predicted)
    np.testing.assert_allclose(got["SCORE"], want.score, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["FLAG"], want.flagged)
    lap("serve + infer")
    print(f"\ne2e: {time.perf_counter() - start:.1f} s in all: {laps}")


USER_MODELS = '''
"""A user's own model code, named on the command line as usermodels:resnet18_6."""
import torchvision

def resnet18_6():
    return torchvision.models.resnet18(num_classes=6), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
'''


def serve_exit(bundle: Path, *flags: str, cwd: Path) -> tuple[int, str]:
    """`python -m semguard.cli serve` expected to stop at once: (exit code, stderr)."""
    cmd = [sys.executable, "-m", "semguard.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--grpc-port", "0", "--metrics-port", "0", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def test_entry_point_bundle_is_served_only_with_trust_model_code(assets, tmp_path, monkeypatch, capsys):
    """--model-entry pkg.module:factory (+ --weights into it): `detector calibrate` writes a bundle naming the entry
    point; serve refuses it (exit 2, one line naming --trust-model-code) unless --trust-model-code is given."""
    from semguard.detector.bundle import read_bundle
    from semguard.models.factory import UntrustedModelCode

    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)  # the entry point is found from the working directory, as uvicorn finds an app
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = ["--model-entry", "usermodels:resnet18_6", "--weights", str(assets.weights), "--images", str(assets.images),
             "--labels", str(assets.labels), "--vectors", str(assets.vectors), "--input-size", str(INPUT_SIZE)]
    assert main(["detector", "calibrate", "--out", "bundle", *entry, "--resize", "72", *cache_flags(assets),
                 "--method", "gaussian", "--allow-few-images", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert manifest["model"]["builder"] == "entry_point" and manifest["model"]["kwargs"]["entry"] == "usermodels:resnet18_6"
    with pytest.raises(UntrustedModelCode, match="--trust-model-code"):
        read_bundle(tmp_path / "bundle")

    rc, err = serve_exit(tmp_path / "bundle", cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--trust-model-code" in err and "usermodels:resnet18_6" in err, err

    images = subject_images(assets, [0, 5])
    with serving(tmp_path / "bundle", "--trust-model-code", cwd=tmp_path) as port:
        got = infer(port, "usermodels:resnet18_6", images)
    want = read_bundle(tmp_path / "bundle", trust_model_code=True)
    from semguard.detector.guard import Guard

    expected = Guard(want).inspect_arrays(images)
    np.testing.assert_array_equal(got["PREDICTION"], expected.predicted)
    np.testing.assert_allclose(got["SCORE"], expected.score, rtol=1e-4, atol=1e-5)
