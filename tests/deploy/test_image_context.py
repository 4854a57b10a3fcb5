"""The image's build stage receives every folder pyproject.toml maps to a package, so the wheel
it builds (`pip wheel .`) holds them all: the build context (deploy/Dockerfile.dockerignore, as BuildKit and
podman read it) and the build stage's COPY lines, simulated here, then the wheel built from them."""
from __future__ import annotations

import posixpath
import shutil
import subprocess
import sys
import zipfile

from tests.deploy.layout import DEPLOY, ROOT, build_context, ignore_rules, in_context, package_folders

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def build_stage_copies() -> list[tuple[list[str], str]]:
    """(sources, destination relative to WORKDIR) of each COPY from the context in the stages before the last."""
    build_stages = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").split("\nFROM ")[1:-1]
    return [(line.split()[1:-1], line.split()[-1]) for stage in build_stages for line in stage.splitlines()
            if line.upper().startswith("COPY ") and "--from" not in line]


def image_sources() -> dict[str, str]:
    """{path under the build stage's WORKDIR: context path} after its COPY lines."""
    context = build_context(ignore_rules((DEPLOY / "Dockerfile.dockerignore").read_text()))
    tree = {}
    for sources, dest in build_stage_copies():
        for source in sources:
            source = "" if source in (".", "./") else source.removeprefix("./").rstrip("/")
            for path in context:
                if not source:
                    rel = path
                elif path == source:  # a file, into the destination folder
                    rel = posixpath.basename(path)
                elif path.startswith(source + "/"):
                    rel = path[len(source) + 1:]
                else:
                    continue
                tree[posixpath.normpath(posixpath.join(dest, rel))] = path
    return tree


def expected_files() -> dict[str, str]:
    """{path in the wheel: repository path} of every module and package-data file pyproject maps."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    expected = {}
    for package, folder in package_folders().items():
        files = list((ROOT / folder).glob("*.py")) + [f for g in data.get(package, []) for f in (ROOT / folder).glob(g)]
        for f in files:
            expected[f"{package.replace('.', '/')}/{f.relative_to(ROOT / folder).as_posix()}"] = f.relative_to(ROOT).as_posix()
    return expected


def test_every_mapped_package_folder_reaches_the_build_stage():
    tree = image_sources()
    assert "pyproject.toml" in tree and "README.md" in tree
    missing = sorted({source.split("/")[0] for source in expected_files().values() if source not in tree})
    assert not missing, (f"mapped package folders not in the image's build stage: {missing} "
                         f"(add !{missing[0]}/ to deploy/Dockerfile.dockerignore)")


def test_the_check_fails_when_a_folder_is_left_out():
    rules = ignore_rules((DEPLOY / "Dockerfile.dockerignore").read_text())
    for folder in sorted({f.split("/")[0] for f in package_folders().values()}):
        without = [r for r in rules if r[2] != folder]
        assert not in_context(f"{folder}/__init__.py", without), folder


def test_runs_tests_and_virtualenvs_stay_out():
    rules = ignore_rules((DEPLOY / "Dockerfile.dockerignore").read_text())
    for path in ["runs/bundle/model.safetensors", "tests/conftest.py", ".venv/bin/python", ".semguard/world/x",
                 "detector/__pycache__/bundle.cpython-311.pyc", "semguard.egg-info/PKG-INFO", ".git/HEAD"]:
        assert not in_context(path, rules), path


def test_the_wheel_built_from_the_image_sources_has_every_package(tmp_path):
    src = tmp_path / "src"
    for dest, source in image_sources().items():
        (src / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / source, src / dest)
    # what `pip install .` does first, without pip's isolated environment (no index needed)
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    missing = sorted(set(expected_files()) - set(zipfile.ZipFile(wheel).namelist()))
    assert not missing, missing
