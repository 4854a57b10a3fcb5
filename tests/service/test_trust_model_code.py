"""A bundle whose model is the user's own code (an entry point, `--model-entry pkg.module:factory`) is
loaded by `semguard serve` only with `--trust-model-code`: without it, exit code 2 and one line that
says so, before any of that code is imported. (tests/subject/test_e2e_cli.py serves one for real.)"""
from __future__ import annotations

import sys

import pytest

from semguard.detector.calibrate import CalibrationConfig
from semguard.detector.guard import calibrate_guard
from semguard.models.normalize import entry_point_spec
from semguard.service.errors import StartupError
from semguard.service.server import load_guard
from tests.tiny_cnn import LAYERS, tiny_task

ENTRY = "tests.tiny_cnn:TinyCNN"  # TinyCNN() is width 6, 8 classes


@pytest.fixture(scope="module")
def entry_bundle(tmp_path_factory):
    model, images, labels, words, _ = tiny_task(8, 96)
    out = tmp_path_factory.mktemp("entry") / "bundle"
    calibrate_guard(model, entry_point_spec(ENTRY), LAYERS, [f"c{i}" for i in range(8)], words, images, labels, out,
                    model_name="mycnn", config=CalibrationConfig(method="gaussian", per_concept=2, target_fpr=0.1))
    return out, images[:3]


def test_load_guard_refuses_user_code_unless_trusted(entry_bundle):
    bundle, images = entry_bundle
    with pytest.raises(StartupError, match=r"--trust-model-code") as refused:
        load_guard(bundle)
    assert refused.value.exit_code == 2 and ENTRY in str(refused.value) and str(bundle) in str(refused.value)
    guard = load_guard(bundle, trust_model_code=True)
    assert guard.info.model_name == "mycnn" and len(guard.inspect(images)) == 3


def test_serve_without_trust_exits_2_with_one_line(entry_bundle, capsys, monkeypatch):
    from semguard.cli import main

    monkeypatch.delitem(sys.modules, "tests.tiny_cnn", raising=False)  # to see that refusing imports none of it
    bundle, _ = entry_bundle
    rc = main(["serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--trust-model-code" in err, err
    assert "tests.tiny_cnn" not in sys.modules
