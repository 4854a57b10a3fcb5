"""One import name: everything installs as semguard.*, nothing is importable under two names."""
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("detector", "attacks", "service", "world", "models", "analysis", "subject", "evaluation")  # folders mapped to semguard.<name>
SOURCES = [*PACKAGES, "semguard", "tests", "benchmarks", "proto"]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_no_bare_imports_of_the_project_packages():
    bare = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                bare += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert bare == [], f"import semguard.<name>, not the bare folder name: {bare}"


def test_from_outside_the_repository_only_semguard_imports(tmp_path):
    done = _python("import semguard.detector, semguard.service, semguard.attacks, semguard.world, "
                   "semguard.models, semguard.analysis, semguard.service.generated; print('ok')", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    for name in PACKAGES:
        done = _python(f"import {name}", tmp_path)
        assert done.returncode != 0 and ("ModuleNotFoundError" in done.stderr or "ImportError" in done.stderr), name


@pytest.mark.parametrize("name", PACKAGES)
def test_inside_the_repository_a_bare_import_is_refused(name):
    done = _python(f"import {name}", REPO)  # the repository is on sys.path here, as in a notebook started in it
    assert done.returncode != 0
    assert f"import semguard.{name}, not {name}" in done.stderr


def test_every_module_is_loaded_under_one_name(tmp_path):
    code = """
import importlib, pkgutil, sys
import semguard
for folder in ("commands", "detector", "attacks", "service", "world", "models", "analysis", "subject", "evaluation"):
    package = importlib.import_module("semguard." + folder)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # an optional extra not installed (ray: .ci/run adds it after this suite)
            if e.name not in ("ray", "timm"):
                raise
names = {}
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None)
    # a virtual environment inside the clone (.ci/run's .venv-ci) holds installed packages, not project modules
    if path and ("/semguard/" in path or path.startswith(%r)) and "site-packages" not in path:
        names.setdefault(path, []).append(name)
twice = {p: n for p, n in names.items() if len(n) > 1}
print(len(names), "project modules;", "twice:", twice)
assert not twice and all(n[0].startswith("semguard") for n in names.values()), names
""" % str(REPO)
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) > 40


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("semguard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        names = z.namelist()
    assert tops == {"semguard"}
    for name in PACKAGES:
        assert f"semguard/{name}/__init__.py" in names
    assert "semguard/detector/data/cifar100.txt" in names and "semguard/service/generated/guard_pb2.py" in names
    assert "semguard/detector/native/reductions.c" in names  # built at start-up by --native-kernels


def test_a_batch_command_without_the_batch_toolkit_says_what_to_install(tmp_path):
    code = ("import sys\nsys.modules['gensim'] = None\nfrom semguard.cli import main\n"
            "sys.exit(main(['quickstart', '--out', 'runs', '--quiet']))")
    done = _python(code, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "semguard quickstart: needs the batch toolkit (missing 'gensim'): pip install 'semguard[all]'" in done.stderr
