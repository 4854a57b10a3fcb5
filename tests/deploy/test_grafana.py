"""deploy/grafana/semguard.json is a dashboard model; every PromQL expression in it and in the rules
parses (promtool), and names only series a running `semguard serve` exports."""
from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import grpc
import tritonclient.grpc as triton
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.layout import DEPLOY, require_binary

DASHBOARD = json.loads((DEPLOY / "grafana" / "semguard.json").read_text())
RULES = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
# Grafana's variables, as a query sees them once substituted
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*"}
METRIC = re.compile(r"(?<![\w:$])(semguard_\w+)(?![\w:])")  # not recording rules' job:semguard_...:rate5m


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
    for old, new in GRAFANA_VARIABLES.items():
        exprs = [e.replace(old, new) for e in exprs]
    return exprs


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in RULES for rule in group["rules"]]


def test_dashboard_model():
    d = DASHBOARD
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36 and d["title"] and d["uid"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert set(g) == {"x", "y", "w", "h"} and g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    types = {p["type"] for p in d["panels"]}
    assert {"timeseries", "heatmap", "stat", "table"} <= types
    heatmap = next(p for p in d["panels"] if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap" and "semguard_score_bucket" in heatmap["targets"][0]["expr"]


def test_every_expression_parses(tmp_path):
    """promtool parses each expression as a recording rule (it rejects PromQL that does not parse)."""
    exprs = dashboard_exprs() + rule_exprs()
    rules = {"groups": [{"name": "parse", "rules": [{"record": f"semguard:parse_check_{i}", "expr": e}
                                                    for i, e in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([require_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and f"{len(exprs)} rules found" in result.stdout, result.stdout + result.stderr


def scrape(make_server, clean_images, flagged_images) -> str:
    """/metrics of a real server after one clean and one flagged request (so histograms have samples)."""
    created = make_server()
    client = triton.InferenceServerClient(f"127.0.0.1:{created.port}")
    try:
        for batch in (clean_images, flagged_images):
            inp = triton.InferInput("IMAGE", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            client.infer("tinycnn", [inp])
    finally:
        client.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{created.server.metrics_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_metric_names_are_exported(make_server, clean_images, flagged_images):
    samples = [s for f in text_string_to_metric_families(scrape(make_server, clean_images, flagged_images))
               for s in f.samples]
    exported = {s.name for s in samples}
    used = {m for e in dashboard_exprs() + rule_exprs() for m in METRIC.findall(e)}
    assert used and used <= exported, f"not exported by semguard serve: {sorted(used - exported)}"
    # the label values the rules match on are the ones the server writes
    methods = {s.labels["method"] for s in samples if s.name == "semguard_requests_total"}
    assert any(re.fullmatch(r".*/(ModelInfer|Inspect)", m) for m in methods), methods
    codes = {s.labels["code"] for s in samples if s.name == "semguard_requests_total"}
    assert codes <= {c.name for c in grpc.StatusCode}, codes
    assert {s.labels["verdict"] for s in samples if s.name == "semguard_images_total"} == {"clean", "flagged"}
