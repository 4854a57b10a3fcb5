"""Every series the README documents is exported, with Prometheus naming, per server registry."""
from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from semguard.service.metrics import ServiceMetrics

DOCUMENTED = ["semguard_requests_total", "semguard_request_duration_seconds_bucket", "semguard_images_total",
              "semguard_blocked_images_total", "semguard_stage_duration_seconds_bucket",
              "semguard_batch_size_bucket", "semguard_queue_depth", "semguard_score_bucket",
              "semguard_flag_threshold", "semguard_bundle_info"]


def test_the_readme_documents_every_series_and_only_those():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = {re.sub(r"_(total|info)$", "", name) for name in re.findall(r"^\| `(semguard_[a-z_]+)`", readme, re.M)}
    exported = {family.name for family in ServiceMetrics().registry.collect()}
    assert documented == exported


def test_documented_series_exist_and_registries_are_separate():
    a, b = ServiceMetrics(), ServiceMetrics()  # two servers in one process must not clash
    a.requests.labels("m", "OK").inc()
    a.request_seconds.labels("m").observe(0.01)
    a.observe_batcher("batch_size", 3)
    a.observe_batcher("queue_depth", 2)
    a.observe_verdicts([0.2, 0.9], [False, True])
    a.blocked.inc()
    a.set_bundle({"model_name": "m"}, 0.5)
    text = generate_latest(a.registry).decode()
    for name in DOCUMENTED:
        assert f"\n{name}" in text, name
    assert 'semguard_images_total{verdict="flagged"} 1.0' in text
    assert b.registry.get_sample_value("semguard_images_total", {"verdict": "flagged"}) == 0.0
