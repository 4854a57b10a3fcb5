"""The default world's trained WorldNet and SkipGram vectors, shipped as package data.

Training WorldNet is 4 of a first quickstart's 7 minutes on 2 cores, and floating-point training
is only reproducible bit for bit on the same kind of machine, so the default world's two trained
files ship with semguard (about 0.8 MB): a first run renders the images (deterministic, 16 s) and
copies these instead of training, and every machine gets the same figures. `semguard world build
--from-scratch` trains them again and compares (tests/world/test_shipped.py).

data/shipped.json: the settings key the files belong to, their sha256, the test accuracy, and the
machine that built them.
"""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from semguard.files import atomic_path, sha256_file

SHIPPED_DIR = Path(__file__).resolve().parent / "data"
MANIFEST = SHIPPED_DIR / "shipped.json"
FILES = ("worldnet.safetensors", "vectors.bin")  # what training produces; images are rendered on the spot


def machine() -> dict[str, str]:
    """What bit-for-bit reproducibility of training depends on."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.machine())
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


def shipped_for(settings_key: str) -> bool:
    """Whether shipped files exist for a world of these settings."""
    return manifest().get("settings_key") == settings_key


def copy_shipped(name: str, dst: Path) -> None:
    """Copy one shipped file to `dst` after checking its hash (ValueError naming the file if it differs)."""
    src = SHIPPED_DIR / name
    want = manifest()["sha256"][name]
    if sha256_file(src) != want:
        raise ValueError(f"{src}: sha256 differs from {MANIFEST.name} (a damaged install; reinstall semguard)")
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_shipped(world_root: Path, settings_key: str, test_accuracy: float) -> None:
    """Replace the shipped files by a world built from scratch (maintainers, after a change to the world)."""
    SHIPPED_DIR.mkdir(exist_ok=True)
    for name in FILES:
        shutil.copyfile(world_root / name, SHIPPED_DIR / name)
    MANIFEST.write_text(json.dumps({
        "settings_key": settings_key,
        "sha256": {name: sha256_file(SHIPPED_DIR / name) for name in FILES},
        "test_accuracy": test_accuracy,
        "built_on": machine(),
    }, indent=1) + "\n")
