"""`semguard serve` run with the image's command line (deploy/Dockerfile ENTRYPOINT + CMD) in the
image's layout: a read-only bundle, a HOME that does not exist, the working directory /tmp-like,
the environment the image sets, and as `nobody` where this machine lets that user run the
interpreter (under /root here, it does not: then as the current user). Only the ports (busy on a
shared machine) and the bundle path (the mount point) are swapped. It answers tritonclient and
`semguard health`, and SIGTERM drains it to exit 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.deploy.layout import dockerfile_argv
from tests.tiny_worldnet import IMAGE_SIZE, write_worldnet_bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_nobody() -> list[str]:
    """`runuser -u nobody --` if we are root and nobody can run this interpreter, else []."""
    if os.geteuid() != 0:
        return []
    probe = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", ""], capture_output=True)
    return ["runuser", "-u", "nobody", "--"] if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def readonly_bundle(tmp_path_factory) -> Path:
    bundle = write_worldnet_bundle(tmp_path_factory.mktemp("bundle"))
    for path in [*bundle.iterdir(), bundle]:  # a read-only mount: write bits off, read bits as written
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return bundle


def container_argv(bundle: Path, grpc_port: int, metrics_port: int) -> list[str]:
    argv = dockerfile_argv()
    swap = {"--bundle": str(bundle), "--grpc-port": str(grpc_port), "--metrics-port": str(metrics_port)}
    argv = [swap.get(prev, arg) for prev, arg in zip([""] + argv, argv)]
    entry = Path(sys.executable).with_name(argv[0])  # the console script beside this interpreter
    return [str(entry) if entry.exists() else argv[0], *argv[1:]]


def health(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(["semguard", "health", "--address", f"127.0.0.1:{port}", "--timeout", "2"],
                          capture_output=True, text=True)


@pytest.mark.slow
def test_serve_with_the_image_command_line(readonly_bundle, tmp_path):
    grpc_port, metrics_port = free_port(), free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": "/nonexistent",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "SEMGUARD_TORCH_THREADS": "1"}
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o555)
    cmd = as_nobody() + container_argv(readonly_bundle, grpc_port, metrics_port)
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        give_up, checked = time.monotonic() + 120, None
        while time.monotonic() < give_up and proc.poll() is None:
            checked = health(grpc_port)  # what the HEALTHCHECK runs
            if checked.returncode == 0:
                break
            time.sleep(0.5)
        assert checked is not None and checked.returncode == 0, f"not SERVING: {checked}\n{tmp_path / 'serve.log'}"
        assert checked.stdout == f"127.0.0.1:{grpc_port}: SERVING\n"
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        model = json.loads((readonly_bundle / "bundle.json").read_text())["model_name"]
        images = np.random.default_rng(0).random((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        request = triton.InferInput("IMAGES", list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        reply = client.infer(model, [request])
        client.close()
        assert reply.as_numpy("FLAG").shape == (2,) and np.isfinite(reply.as_numpy("SCORE")).all()
    finally:
        proc.send_signal(signal.SIGTERM)  # docker stop / Kubernetes: drain, then exit
        code = proc.wait(60)
        log.seek(0)
        output = log.read()
        log.close()
    assert code == 0, output
    assert "shutting down" in output and "stopped" in output
    assert health(grpc_port).returncode == 1
