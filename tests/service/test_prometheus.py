"""A real Prometheus server scrapes the guard's metrics port; the series are read back via its HTTP API."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import tritonclient.grpc as triton

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.load(resp)["data"]["result"]


@pytest.fixture
def prometheus_binary() -> str:
    if PROMETHEUS is None:
        if os.environ.get("CI"):
            pytest.fail("the `prometheus` binary is required in CI (Debian package `prometheus`)")
        pytest.skip("`prometheus` binary not installed (apt-get install prometheus)")
    return PROMETHEUS


def test_prometheus_scrapes_semguard_series(prometheus_binary, make_server, clean_images, flagged_images, tmp_path):
    created = make_server()
    client = triton.InferenceServerClient(f"127.0.0.1:{created.port}")
    for batch in (clean_images, flagged_images):
        inp = triton.InferInput("IMAGE", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        client.infer("tinycnn", [inp])
    client.close()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: semguard\n    static_configs: [{{targets: ['127.0.0.1:{created.server.metrics_port}']}}]\n")
    web_port, log = free_port(), (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        series, flagged, give_up = [], [], time.monotonic() + 30
        while time.monotonic() < give_up and not (series and flagged):
            time.sleep(0.5)
            try:
                series = query(web_port, "semguard_requests_total")
                flagged = query(web_port, 'semguard_images_total{verdict="flagged"}')
            except OSError:
                continue  # not listening yet
        assert series, f"no semguard_requests_total series after 30 s; log: {(tmp_path / 'prometheus.log').read_text()[-2000:]}"
        infer = [s for s in series if s["metric"]["method"].endswith("/ModelInfer")]
        assert infer and infer[0]["metric"]["code"] == "OK" and float(infer[0]["value"][1]) == 2
        assert float(flagged[0]["value"][1]) == len(flagged_images)
        assert query(web_port, "semguard_bundle_info")[0]["metric"]["model_name"] == "tinycnn"
        assert query(web_port, 'semguard_stage_duration_seconds_count{stage="forward"}')
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
