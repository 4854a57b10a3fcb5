"""deploy/prometheus/rules.yml: promtool accepts it, its unit tests pass, every alert is tested both
ways (fires on a synthetic series, silent on a normal one) and documented in the README."""
from __future__ import annotations

import subprocess
import sys

import yaml

from tests.deploy.layout import DEPLOY, ROOT, require_binary

PROMETHEUS = DEPLOY / "prometheus"


def alerts() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules():
    result = subprocess.run([require_binary("promtool"), "check", "rules", str(PROMETHEUS / "rules.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    result = subprocess.run([require_binary("promtool"), "test", "rules", "rules_test.yml"], cwd=PROMETHEUS,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case():
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for name in alerts():
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a case where it fires and one where it stays silent"


def test_every_alert_is_explained_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Deploy"):]
    for name in alerts():
        assert f"`{name}`" in section, f"README.md 'Deploy' does not explain {name}"


def test_prometheusrule_carries_the_same_rules():
    script = PROMETHEUS / "to_prometheusrule.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    resource = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    assert resource["spec"]["groups"] == yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
