"""The guard as a drop-in in front of a real third-party OIP v2 server: KServe's Python model server
(tests/service/kserve_server.py, in KServe's environment: SEMGUARD_KSERVE_PYTHON, set up by
scripts/test.sh). A client written against that server, metadata-driven, must work unchanged
through the guard, and read the guard's verdict beside the server's outputs; the guard's
readiness must follow the server through restarts, clashes and freezes."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from tests.service.test_server import expected
from tests.service.test_upstream import _health, _wait_for

SERVER = Path(__file__).with_name("kserve_server.py")
OUTPUTS = "output-0,CLASS,LABEL"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def kserve_python() -> str:
    python = os.environ.get("SEMGUARD_KSERVE_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("SEMGUARD_KSERVE_PYTHON is unset: run the tests through scripts/test.sh")
        pytest.skip("KServe is installed by scripts/test.sh (SEMGUARD_KSERVE_PYTHON)")
    return python


class KServe:
    """KServe's model server in a subprocess, serving one model under `names` (comma-separated);
    restartable on its port."""

    def __init__(self, python: str, names: str):
        self.python, self.names, self.port, self.proc = python, names, 0, None

    def start(self, outputs: str = OUTPUTS, port: int | None = None) -> int:
        self.proc = subprocess.Popen([self.python, str(SERVER), "--name", self.names, "--outputs", outputs,
                                      "--port", str(self.port if port is None else port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # "port N" once serving
        assert line.startswith("port "), f"KServe did not start (exit code {self.proc.poll()})"
        self.port = int(line.split()[1])
        return self.port

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def kserve(kserve_python) -> Iterator[KServe]:
    """A KServe server for the test to start, stop and restart, serving the bundle's name (tinycnn), so
    that the guard's own name reaches it also where the guard cannot take the upstream's name."""
    server = KServe(kserve_python, "tinycnn")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kworld(kserve_python) -> Iterator[KServe]:
    """A KServe server serving kworld (outputs output-0, CLASS, LABEL; also named tinycnn) for the module."""
    server = KServe(kserve_python, "kworld,tinycnn")
    server.start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def metadata_client(port: int, model: str, images: np.ndarray, **infer_kw) -> tuple[dict, object]:
    """What a client of the upstream does: build the request from the model's metadata, read every
    output the metadata lists by name. Returns ({output name: array}, the answer)."""
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        meta = client.get_model_metadata(model)
        inp = triton.InferInput(meta.inputs[0].name, list(images.shape), meta.inputs[0].datatype)
        inp.set_data_from_numpy(images)
        result = client.infer(model, [inp], **infer_kw)
        return {o.name: result.as_numpy(o.name) for o in meta.outputs}, result.get_response()
    finally:
        client.close()


def tensors(meta) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype, list(t.shape)) for t in meta]


def test_a_client_of_the_upstream_works_unchanged_through_the_guard(make_server, kworld, guard, clean_images,
                                                                    flagged_images):
    kserve = kworld
    front = make_server(upstream=f"127.0.0.1:{kserve.port}", upstream_model="kworld", output_prefix="SEMGUARD_",
                        model_name="guarded")
    images = np.concatenate([clean_images, flagged_images])
    direct, direct_answer = metadata_client(kserve.port, "kworld", images)
    through, answer = metadata_client(front.port, "kworld", images)
    for name, value in direct.items():  # the upstream's outputs, bit for bit
        same = value.tolist() == through[name].tolist() if value.dtype == object else \
            through[name].tobytes() == value.tobytes()
        assert through[name].dtype == value.dtype and through[name].shape == value.shape and same, name
    verdicts = expected(guard, images)
    assert through["SEMGUARD_FLAG"].tolist() == [v.flagged for v in verdicts]
    np.testing.assert_allclose(through["SEMGUARD_SCORE"], [v.score for v in verdicts], rtol=1e-6)
    assert (answer.model_name, answer.model_version) == (direct_answer.model_name, direct_answer.model_version)

    client = triton.InferenceServerClient(f"127.0.0.1:{front.port}")
    assert client.get_model_metadata("kworld").name == "kworld"
    # versions are the upstream's to judge (KServe accepts any); the alias answers under its own name
    _, answer = metadata_client(front.port, "kworld", images, model_version="7")
    assert answer.model_name == "kworld"
    _, answer = metadata_client(front.port, "guarded", images)
    assert answer.model_name == "guarded" and client.get_model_metadata("guarded").name == "guarded"
    assert client.is_model_ready("kworld") and client.is_model_ready("guarded") and client.is_server_ready()
    assert not client.is_model_ready("tinycnn")  # the bundle's own name is not the upstream's model
    with pytest.raises(InferenceServerException, match="unknown model 'tinycnn'") as e:
        client.get_model_metadata("tinycnn")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    client.close()


def test_metadata_is_the_upstreams_plus_the_guards_outputs(make_server, kworld):
    front = make_server(upstream=f"127.0.0.1:{kworld.port}", output_prefix="SEMGUARD_")  # its model tinycnn
    with contextlib.closing(triton.InferenceServerClient(f"127.0.0.1:{kworld.port}")) as upstream, \
            contextlib.closing(triton.InferenceServerClient(f"127.0.0.1:{front.port}")) as client:
        theirs, ours = upstream.get_model_metadata("tinycnn"), client.get_model_metadata("tinycnn")
    assert ours.name == "tinycnn" and tensors(ours.inputs) == tensors(theirs.inputs)
    assert tensors(ours.outputs) == tensors(theirs.outputs) + [
        ("SEMGUARD_SCORE", "FP32", [-1]), ("SEMGUARD_FLAG", "BOOL", [-1]), ("SEMGUARD_SIGNATURE", "FP32", [-1, 3])]


def _infer(port: int, images: np.ndarray, model: str = "tinycnn", **kw):
    """A plain client of the model (input-0 FP32)."""
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = triton.InferInput("input-0", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        return client.infer(model, [inp], **kw)
    finally:
        client.close()


@pytest.mark.slow
def test_a_restart_with_a_clashing_output_makes_the_guard_not_ready(make_server, kserve, clean_images, caplog):
    kserve.start()
    front = make_server(upstream=f"127.0.0.1:{kserve.port}", output_prefix="SEMGUARD_",
                        upstream_poll_seconds=0.1)
    metrics = front.server.metrics
    _infer(front.port, clean_images)
    kserve.stop()
    with caplog.at_level(logging.ERROR):
        kserve.start(OUTPUTS + ",SEMGUARD_FLAG")  # the same port, a changed model
        _wait_for(lambda: "named like the guard's" in caplog.text)
        time.sleep(0.5)  # five more polls
        for _ in range(2):
            with pytest.raises(InferenceServerException) as e:
                _infer(front.port, clean_images)
            assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
            assert "SEMGUARD_FLAG named like the guard's" in e.value.message()
            assert "--output-prefix" in e.value.message()
    client = triton.InferenceServerClient(f"127.0.0.1:{front.port}")
    assert _health(front.port) == NOT_SERVING and not client.is_server_ready() and not client.is_model_ready("tinycnn")
    assert metrics.upstream_up._value.get() == 0 and metrics.upstream_clashes._value.get() == 1
    assert len([r for r in caplog.records if "named like the guard's" in r.getMessage()]) == 1
    assert "Traceback" not in caplog.text and not any(s.value for m in metrics.internal_errors.collect()
                                                      for s in m.samples)
    kserve.stop()
    kserve.start()  # fixed: ready again
    assert _wait_for(lambda: _health(front.port) == SERVING)
    assert client.is_model_ready("tinycnn")
    _infer(front.port, clean_images)
    client.close()


@pytest.mark.slow
def test_the_port_opens_at_once_and_a_clash_found_later_never_stops_the_guard(make_server, kserve, clean_images):
    kserve.port = free_port()  # nothing listens there yet
    start = time.monotonic()
    front = make_server(upstream=f"127.0.0.1:{kserve.port}", upstream_poll_seconds=0.1)
    # serving (not ready) at once: before 2.5 s, where waiting for the upstream took 10 s
    assert time.monotonic() - start < 2.5 and _health(front.port) == NOT_SERVING
    kserve.start("output-0,CLASS,LABEL,FLAG")  # FLAG: the guard's own name (no --output-prefix)
    assert _wait_for(lambda: front.server.metrics.upstream_clashes._value.get() == 1)
    with pytest.raises(InferenceServerException) as e:
        _infer(front.port, clean_images)
    assert e.value.status() == "StatusCode.UNAVAILABLE" and "FLAG named like the guard's" in e.value.message()
    assert _health(front.port) == NOT_SERVING
    kserve.stop()
    kserve.start()
    assert _wait_for(lambda: _health(front.port) == SERVING)
    assert _infer(front.port, clean_images).as_numpy("FLAG").tolist() == [False] * len(clean_images)


@pytest.mark.slow
def test_a_frozen_upstream_is_cut_at_the_default_upstream_timeout(make_server, kworld, clean_images):
    front = make_server(upstream=f"127.0.0.1:{kworld.port}")  # its model tinycnn
    with pytest.raises(InferenceServerException) as e:  # the client sets no deadline: --upstream-timeout's 5 s
        _infer(front.port, clean_images, parameters={"sleep_s": 8})
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED" and "upstream" in e.value.message()
