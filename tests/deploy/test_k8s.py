"""deploy/k8s and deploy/kserve: built-in kinds validate (strict) against the Kubernetes schemas
kubernetes-validate ships, for K8S_VERSION; the CRDs (PodMonitor, PrometheusRule, InferenceService)
against the schemas below, written from the fields their CRDs document as required or typed:
no CRD schema ships with kubernetes-validate, and none may be downloaded here."""
from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.layout import DEPLOY, load_all

K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests target (grpc probes GA 1.27, preStop sleep 1.30)

_NAMED = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}


def _crd(api_version: str, kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _NAMED,
                           "spec": spec}}


# monitoring.coreos.com/v1 (prometheus-operator API reference): PodMonitor spec.selector is required;
# podMetricsEndpoints[].port names a container port. PrometheusRule groups need name and rules; a rule
# needs expr and exactly one of record/alert.
_RULE = {"type": "object", "required": ["expr"], "additionalProperties": False,
         "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
         "properties": {"record": {"type": "string"}, "alert": {"type": "string"}, "expr": {"type": "string"},
                        "for": _DURATION, "keep_firing_for": _DURATION, "labels": _STRINGS, "annotations": _STRINGS}}
CRD_SCHEMAS = {
    "PodMonitor": _crd("monitoring.coreos.com/v1", "PodMonitor", {
        "type": "object", "required": ["selector", "podMetricsEndpoints"],
        "properties": {"jobLabel": {"type": "string"}, "selector": {"type": "object"},
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                           "type": "object", "additionalProperties": False, "required": ["port"],
                           "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                          "interval": _DURATION, "scheme": {"enum": ["http", "https"]}}}}}}),
    "PrometheusRule": _crd("monitoring.coreos.com/v1", "PrometheusRule", {
        "type": "object", "required": ["groups"],
        "properties": {"groups": {"type": "array", "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "interval": _DURATION,
                           "rules": {"type": "array", "items": _RULE}}}}}}),
    # serving.kserve.io/v1beta1: spec.predictor is required; a custom predictor's containers are core
    # Containers (validated below against the Kubernetes schema), a model predictor needs modelFormat.name.
    "InferenceService": _crd("serving.kserve.io/v1beta1", "InferenceService", {
        "type": "object", "required": ["predictor"],
        "properties": {"predictor": {"type": "object", "anyOf": [
            {"required": ["containers"], "properties": {"containers": {"type": "array", "minItems": 1}}},
            {"required": ["model"], "properties": {"model": {
                "type": "object", "required": ["modelFormat"],
                "properties": {"modelFormat": _NAMED, "storageUri": {"type": "string"},
                               "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]}}}}}]}}}),
}

RESOURCES = [(path.relative_to(DEPLOY).as_posix(), i, doc)
             for path in sorted((DEPLOY / "k8s").glob("*.yaml")) + sorted((DEPLOY / "kserve").glob("*.yaml"))
             if path.name != "kustomization.yaml" for i, doc in enumerate(load_all(path))]


def validate(doc: dict) -> None:
    if doc["kind"] in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path,index,doc", RESOURCES, ids=[f"{p}#{i}" for p, i, _ in RESOURCES])
def test_resource_validates(path, index, doc):
    validate(doc)


@pytest.mark.parametrize("path,index,doc", [r for r in RESOURCES if r[2]["kind"] == "InferenceService"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_kserve_containers_are_kubernetes_containers(path, index, doc):
    """The custom predictor's containers are core/v1 Containers: validate them inside a Pod."""
    containers = doc["spec"]["predictor"].get("containers", [])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": containers}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    for c in containers:
        assert [p["containerPort"] for p in c["ports"] if p["name"] == "h2c"] == [8001]  # KServe's gRPC port name
        assert c["args"][:3] == ["serve", "--bundle", "/mnt/models"]  # where STORAGE_URI lands


def test_validation_rejects_a_typo():
    """The checks above can fail: strict schemas reject unknown fields, the CRD ones missing required ones."""
    (deployment,) = load_all(DEPLOY / "k8s" / "deployment.yaml")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8001}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    (monitor,) = load_all(DEPLOY / "k8s" / "podmonitor.yaml")
    del monitor["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_kustomization_lists_every_manifest():
    (kustomization,) = load_all(DEPLOY / "k8s" / "kustomization.yaml")
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_probes_ports_and_scraping_line_up():
    (deployment,) = load_all(DEPLOY / "k8s" / "deployment.yaml")
    (service,) = load_all(DEPLOY / "k8s" / "service.yaml")
    (monitor,) = load_all(DEPLOY / "k8s" / "podmonitor.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 8001}, probe
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["appProtocol"] == "kubernetes.io/h2c" and by_name["grpc"]["targetPort"] == "grpc"
    assert by_name["metrics"]["targetPort"] == "metrics"
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels[monitor["spec"]["jobLabel"]] == "semguard"  # job="semguard", as the alerts expect
    assert service["spec"]["selector"].items() <= labels.items()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/bundle"]["readOnly"] is True
