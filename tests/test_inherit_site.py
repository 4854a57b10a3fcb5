"""scripts/inherit_site.py: a venv made from inside another venv sees the outer venv's packages
(scripts/test.sh's .venv-kserve inside .ci/run's fresh venv), where --system-site-packages alone would
show it the base interpreter's instead."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _venv(path: Path, python: str | Path, *flags: str) -> Path:
    subprocess.run([str(python), "-m", "venv", "--without-pip", *flags, str(path)], check=True)
    return path / "bin" / "python"


def _purelib(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout bin/python")
def test_inner_venv_sees_outer_venv_packages(tmp_path):
    outer = _venv(tmp_path / "outer", sys.executable)
    site_dir = _purelib(outer)
    (site_dir / "outer_marker_mod.py").write_text("VALUE = 1\n")
    # an editable-style .pth in the outer venv: its target must be visible too (addsitedir runs it)
    (tmp_path / "editable").mkdir()
    (tmp_path / "editable" / "editable_marker_mod.py").write_text("VALUE = 2\n")
    (site_dir / "__editable__marker.pth").write_text(str(tmp_path / "editable") + "\n")

    plain = _venv(tmp_path / "plain", outer, "--system-site-packages")
    assert not _imports(plain, "outer_marker_mod")  # the problem: it links to the base interpreter

    inner = _venv(tmp_path / "inner", outer)
    subprocess.run([str(outer), str(ROOT / "scripts" / "inherit_site.py"), str(tmp_path / "inner")], check=True,
                   capture_output=True)
    assert _imports(inner, "outer_marker_mod") and _imports(inner, "editable_marker_mod")
    # the inner venv's own packages come first (kserve's pinned pydantic shadows the outer one)
    (_purelib(inner) / "outer_marker_mod.py").write_text("VALUE = 3\n")
    out = subprocess.run([str(inner), "-c", "import outer_marker_mod; print(outer_marker_mod.VALUE)"],
                         check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "3"
