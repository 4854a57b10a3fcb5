"""scripts/image_pip_settings.py: this machine's pip settings as `podman build` secrets, mounts and torch choice."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.deploy.layout import ROOT

spec = importlib.util.spec_from_file_location("image_pip_settings", ROOT / "scripts" / "image_pip_settings.py")
settings_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(settings_script)


def wheels(folder: Path, *names: str) -> str:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).touch()
    return str(folder)


def test_a_cpu_torch_counts_only_with_its_cpu_torchvision(tmp_path):
    alone = wheels(tmp_path / "alone", "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                   "torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert settings_script.cpu_torch([alone], "cp311") is None
    pair = wheels(tmp_path / "pair", "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                  "torchvision-0.28.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                  "torch-2.14.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")  # no torchvision 0.29.1+cpu
    assert settings_script.cpu_torch([pair], "cp311") == ("2.13.0+cpu", "0.28.0+cpu")
    assert settings_script.cpu_torch([pair], "cp312") is None


@pytest.mark.parametrize("cpu_index_answers", [True, False])
def test_arguments_for_a_machine_with_local_indexes(tmp_path, monkeypatch, cpu_index_answers):
    links, index, constraints = tmp_path / "wheels", tmp_path / "pypi" / "simple", tmp_path / "constraints.txt"
    links.mkdir(), index.mkdir(parents=True), constraints.write_text("torch<=2.14.1\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(settings_script, "pip_settings", lambda: {
        ("global", "cert"): str(ca), ("global", "find-links"): str(links),
        ("global", "extra-index-url"): f"file://{index} https://example.org/simple",
        ("global", "constraint"): str(constraints), ("install", "timeout"): "180"})
    monkeypatch.setattr(settings_script, "reachable", lambda url, ca: cpu_index_answers)
    args = settings_script.main(tmp_path, "cp311")
    conf = (tmp_path / "pip.conf").read_text()
    assert f"--secret=id=pip.conf,src={tmp_path / 'pip.conf'}" in args and f"--secret=id=pip-ca,src={ca}" in args
    assert "cert" not in conf and "[install]\ntimeout = 180\n" in conf and f"find-links = {links}\n" in conf
    # an index folder links its files relative to its parent: the parent is mounted
    assert {a for a in args if a.startswith("--volume=")} == {
        f"--volume={p}:{p}:ro" for p in (links, index.parent, constraints)}
    torch_args = [a for a in args if a.startswith("--build-arg=")]
    assert torch_args == ([] if cpu_index_answers else ["--build-arg=TORCH_INDEX=https://pypi.org/simple"])
