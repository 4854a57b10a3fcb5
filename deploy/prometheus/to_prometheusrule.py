"""Write deploy/k8s/prometheusrule.yaml: rules.yml's groups as a Prometheus operator PrometheusRule.

    python deploy/prometheus/to_prometheusrule.py           # rewrite the file
    python deploy/prometheus/to_prometheusrule.py --check   # exit 1 if it is stale (tests/deploy does this too)

One source (rules.yml, which promtool checks and unit-tests), two carriers: the file a plain
Prometheus loads and the custom resource the operator loads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
TARGET = HERE.parent / "k8s" / "prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/rules.yml by deploy/prometheus/to_prometheusrule.py: do not edit.\n"


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as `|` blocks, as in rules.yml, not one quoted line."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render(rules_text: str) -> str:
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        # the label a Prometheus' ruleSelector picks (kube-prometheus-stack: release=<its release name>)
        "metadata": {"name": "semguard", "labels": {"app.kubernetes.io/name": "semguard", "release": "prometheus"}},
        "spec": {"groups": yaml.safe_load(rules_text)["groups"]},
    }
    return HEADER + yaml.dump(resource, Dumper=_BlockDumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when the file differs")
    args = p.parse_args(argv)
    text = render(RULES.read_text())
    if args.check:
        stale = not TARGET.exists() or TARGET.read_text() != text
        print(f"{TARGET}: {'stale, run ' + Path(__file__).name if stale else 'up to date'}")
        return int(stale)
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
