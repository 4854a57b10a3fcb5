"""Imports point one way (ARCHITECTURE.md, "Layers"): a package imports only the layers below it.

    shared (semguard/*.py) < models < detector < attacks, service, world < subject < evaluation < analysis
    < commands

Every `import` and `from ... import` of every project file is parsed (function-level imports too), so a
deferred import cannot hide an upward dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Layer of each package; a package may import its own layer's modules only when it is itself.
LAYERS = {"shared": 0, "models": 1, "detector": 2, "attacks": 3, "service": 3, "world": 3, "subject": 4,
          "evaluation": 5, "analysis": 6, "commands": 7}
FOLDERS = ("semguard", "detector", "models", "attacks", "service", "world", "subject", "evaluation", "analysis")


def package_of_file(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] != "semguard":
        return rel.parts[0]
    return "commands" if rel.parts[1] in ("commands", "cli.py") else "shared"


def package_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "semguard":
        return None
    if len(parts) > 1 and parts[1] in ("commands", "cli"):
        return "commands"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "shared"


def imports_of(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
    return modules


def test_imports_point_down_the_layers():
    upward = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            src = package_of_file(path)
            for module in imports_of(path):
                dst = package_of_module(module)
                if dst is not None and dst != src and LAYERS[dst] >= LAYERS[src]:
                    upward.append(f"{path.relative_to(REPO)} ({src}) imports {module} ({dst})")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser finds imports inside functions (where deferred imports live)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from semguard.analysis.quickstart import run_quickstart\n")
    assert [package_of_module(m) for m in imports_of(probe)] == ["analysis"]
