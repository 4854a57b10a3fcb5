"""deploy/Dockerfile: hadolint-clean, non-root, bundle mounted not baked, health-checked, lean install.

The image is linted and its layout checked here; scripts/build_image.sh builds and runs it with podman
(.ci/run), test_container_layout.py runs the same command line outside a container.
"""
from __future__ import annotations

import re
import subprocess

from tests.deploy.layout import DEPLOY, dockerfile_argv, dockerfile_instructions, load_all, require_binary


def test_hadolint_is_clean():
    hadolint = require_binary("hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_ignored_rule_says_why():
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = line.split("=", 1)[1].split(None, 1)[1:] or [lines[i - 1]]
            assert reason[0].strip().lstrip("#").strip(), f"line {i + 1}: hadolint ignore without a reason"


def test_runs_as_non_root_with_the_ports_and_health_check():
    assert dockerfile_instructions("USER")[-1].split(":")[0] not in ("root", "0")
    assert dockerfile_instructions("EXPOSE") == ["8001 8002"]
    (check,) = dockerfile_instructions("HEALTHCHECK")
    assert re.search(r'"semguard", "health", "--address", "127\.0\.0\.1:8001"', check)
    argv = dockerfile_argv()
    assert argv[:2] == ["semguard", "serve"]
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags == {"--bundle": "/bundle", "--host": "0.0.0.0", "--grpc-port": "8001", "--metrics-port": "8002"}


def test_bundle_is_mounted_not_baked_and_the_install_is_lean():
    assert dockerfile_instructions("VOLUME") == ['["/bundle"]']
    copies = " ".join(dockerfile_instructions("COPY"))
    assert "runs" not in copies and "bundle" not in copies
    rules = [r for r in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if r and r[0] != "#"]
    assert rules[0] == "*" and not any(r.startswith("!runs") for r in rules)  # only the sources go in
    runs = " ".join(dockerfile_instructions("RUN"))
    # semguard's wheel built from the context, installed with its base dependencies only
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in runs and "[all]" not in runs
    assert "pip install --no-cache-dir /wheels/semguard-*.whl" in runs
    assert "download.pytorch.org/whl/cpu" in " ".join(dockerfile_instructions("ARG"))


def test_kubernetes_runs_the_image_as_its_user_and_command():
    (deployment,) = load_all(DEPLOY / "k8s" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] + container["args"] == dockerfile_argv()
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_instructions("USER")[-1].split(":")[0]
