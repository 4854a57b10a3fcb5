"""semguard_score buckets fit the score the bundle's flagger produces: from the calibration's score
quantiles with the threshold as an edge, or a per-method default for flagger.json files without them."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from semguard.files import sha256_file
from semguard.detector.guard import Guard
from semguard.service.metrics import DEFAULT_SCORE_BUCKETS, GENERIC_SCORE_BUCKETS, ServiceMetrics, score_buckets
from tests.tiny_cnn import write_tiny_ensemble_bundle

N_CLASSES = 6


@pytest.fixture(scope="module")
def ensemble_bundle(tmp_path_factory):
    """A tiny bundle with the shipped flagger (ensemble), and clean and attack-like images."""
    out = tmp_path_factory.mktemp("ensemble")
    images, attack = write_tiny_ensemble_bundle(out, N_CLASSES)
    return out, images, attack


def histogram_edges(metrics: ServiceMetrics) -> list[float]:
    [family] = [m for m in metrics.registry.collect() if m.name == "semguard_score"]
    return [float(s.labels["le"]) for s in family.samples if s.name == "semguard_score_bucket"][:-1]  # no +Inf


def test_ensemble_buckets_span_the_calibration_scores(ensemble_bundle, make_server):
    bundle_dir, images, attack = ensemble_bundle
    guard = Guard.load(bundle_dir)
    quantiles = guard.bundle.flagger.score_quantiles
    assert guard.info.flagger_method == "ensemble" and set(quantiles) == {"levels", "clean", "attack"}
    edges = histogram_edges(make_server(guard).server.metrics)
    assert edges == sorted(set(edges)) and guard.info.threshold in edges
    assert edges[0] <= quantiles["clean"][0] * 1.001 and edges[-1] > quantiles["attack"][-1]
    clean, adversarial = guard.inspect_arrays(images).score, guard.inspect_arrays(attack).score
    buckets = np.searchsorted(edges, np.r_[clean, adversarial])
    assert len(np.unique(np.searchsorted(edges, clean))) >= 4  # clean scores are resolved, not lumped together
    assert (buckets < len(edges)).all()  # nothing past the last edge, in +Inf


def test_flagger_json_without_quantiles_loads_with_default_buckets(ensemble_bundle, tmp_path, make_server):
    bundle_dir = shutil.copytree(ensemble_bundle[0], tmp_path / "old")
    flagger = json.loads((bundle_dir / "flagger.json").read_text())
    del flagger["score_quantiles"]  # as written before they were kept
    (bundle_dir / "flagger.json").write_text(json.dumps(flagger))
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["sha256"]["flagger.json"] = sha256_file(bundle_dir / "flagger.json")
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    guard = Guard.load(bundle_dir)
    assert guard.bundle.flagger.score_quantiles == {} and guard.info.calibration_scores == ()
    edges = histogram_edges(make_server(guard).server.metrics)
    assert edges == sorted([*DEFAULT_SCORE_BUCKETS["ensemble"], guard.info.threshold])


def test_score_buckets_from_quantiles():
    scores = (-3.0, -1.0, 0.5, 2.0, 2.0, 8.0)
    edges = score_buckets("logistic", 1.2345678, scores)
    assert edges == (-3.0, -1.0, 0.5, 1.2345678, 2.0, 8.0, 19.0, 118.0, 1110.0)  # tail: max + (1, 10, 100) spans
    assert score_buckets("ensemble", 3.0, (2.0, 2.0)) == (2.0, 3.0, 4.0, 22.0, 202.0)  # no spread: spans of |max|


@pytest.mark.parametrize("method", ["gaussian", "logistic", "ensemble", "a-test-double"])
def test_default_buckets_per_method(method):
    edges = score_buckets(method, 0.7)
    assert edges == tuple(sorted({*DEFAULT_SCORE_BUCKETS.get(method, GENERIC_SCORE_BUCKETS), 0.7}))
    assert score_buckets(method, float("nan")) == tuple(sorted(DEFAULT_SCORE_BUCKETS.get(method, GENERIC_SCORE_BUCKETS)))
