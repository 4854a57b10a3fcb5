"""Make the virtual environment VENV see this interpreter's packages (run with the outer python).

`python -m venv --system-site-packages` run from inside a venv links the new one to the BASE
interpreter's site-packages, not to the outer venv's: the outer venv's packages (semguard itself,
installed editable) would be invisible. This writes a .pth file into VENV's site-packages that adds
each of this interpreter's site directories with site.addsitedir, so their own .pth files (the
editable install's) are processed too. VENV's own packages stay first on sys.path.

    python3 scripts/inherit_site.py .venv-kserve
"""
from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

PTH_NAME = "_semguard_outer_env.pth"


def venv_site_packages(venv: Path) -> Path:
    """VENV's own site-packages directory, as its interpreter reports it."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"inherit_site: {venv} has no bin/python (not a virtual environment)")
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: python3 scripts/inherit_site.py VENV")
    target = venv_site_packages(Path(argv[0]))
    outer = [d for d in site.getsitepackages() if Path(d).is_dir() and Path(d).resolve() != target.resolve()]
    # One line: .pth lines that start with "import" are executed, which lets addsitedir run their .pth files.
    line = "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in outer) + "\n"
    (target / PTH_NAME).write_text(line)
    print(f"inherit_site: {target / PTH_NAME} adds {outer}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
