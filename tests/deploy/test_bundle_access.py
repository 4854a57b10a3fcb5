"""A bundle as `detector calibrate` / `quickstart` writes it is readable by the user who serves it
(the image's uid 10001, not the writer), and one that is not stops `semguard serve` with one line
naming the file, its mode and the user, instead of a traceback."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_worldnet import write_worldnet_bundle

NOBODY = 65534
# Root reads any file; without these two capabilities it is held to the mode bits like any other user.
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[int, Path]:
    """The same bundle written under two umasks: {umask: bundle dir}."""
    bundles, old = {}, os.umask(0o022)
    try:
        for mask in (0o022, 0o077):
            os.umask(mask)
            bundles[mask] = write_worldnet_bundle(tmp_path_factory.mktemp(f"umask{mask:03o}"))
    finally:
        os.umask(old)
    return bundles


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_bundle_file_has_the_mode_the_umask_gives(written, mask):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written[mask].iterdir()}
    assert "model.safetensors" in modes and "bundle.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)


def unreadable_copy(bundle: Path, dest: Path) -> tuple[Path, list[str]]:
    """A copy whose model.safetensors this process cannot read for real, and the prefix to run as such.

    As root: the file belongs to nobody with mode 0600 and the server runs without the capabilities
    that let root ignore modes. Otherwise: mode 0000 on our own file."""
    copy = Path(shutil.copytree(bundle, dest))
    model = copy / "model.safetensors"
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's read-anything capability")
        os.chown(model, NOBODY, NOBODY)
        model.chmod(0o600)
        return model, NO_DAC
    model.chmod(0o000)
    return model, []


@pytest.mark.slow  # a server process importing torch: 5-15 s
def test_serve_names_an_unreadable_bundle_file_in_one_line(written, tmp_path):
    model, prefix = unreadable_copy(written[0o022], tmp_path / "bundle")
    mode = stat.S_IMODE(model.stat().st_mode)
    semguard = Path(sys.executable).with_name("semguard")
    result = subprocess.run([*prefix, str(semguard), "serve", "--bundle", str(model.parent),
                             "--grpc-port", "0", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SEMGUARD_TORCH_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    line = result.stderr
    assert line.startswith(f"semguard serve: --bundle {model.parent}: {model}: not readable by ")
    assert f"(uid {os.geteuid()})" in line and f"mode {mode:04o}" in line
    assert f"owner uid {model.stat().st_uid}" in line
