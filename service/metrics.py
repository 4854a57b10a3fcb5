"""Prometheus metrics of one guard server, on a registry of its own (tests run several servers).

Names follow Prometheus conventions: `semguard_` prefix, base units (seconds), `_total` counters,
histograms rather than summaries so replicas aggregate, low-cardinality labels only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

STAGES = ("decode", "queue", "inspect", "forward", "signature", "flagger")
# Latency buckets from 0.5 ms (a tiny batch) to 10 s (a big batch on CPU behind a long queue).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Score buckets for a bundle without calibration score quantiles (older flagger.json, test doubles),
# per flagger method, roughly log-spaced over the range its score takes; see `score_buckets`.
DEFAULT_SCORE_BUCKETS = {
    # squared Mahalanobis distance of F standardised features: clean near F, far images 1e4 and beyond
    "gaussian": (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 1e5),
    # logit of "attack": clean images negative, attacks positive, unbounded both ways
    "logistic": (-50.0, -20.0, -10.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0),
    # clean-tail surprise -log P_clean(logit >= s): clean images 0 to ~5, attacks ~20 to 50
    "ensemble": (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0),
}
# any other score (a test double's probability): fine steps to 1, then decades
GENERIC_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
                         1e3, 1e4, 1e5)
TAIL_SPANS = (1.0, 10.0, 100.0)  # edges above the largest calibration score, in calibration score spans


def score_buckets(method: str, threshold: float, calibration_scores: Sequence[float] = ()) -> tuple[float, ...]:
    """Edges of the `semguard_score` histogram for a flagger; the threshold is always one of them.

    calibration_scores: score quantiles of the calibration's clean (and attack) images, as
    `GuardInfo.calibration_scores` holds them. With them, the edges are those quantiles (3
    significant digits), the exact threshold, and above the largest score `TAIL_SPANS` times the
    span of the calibration scores, so images far outside still land in separate buckets.
    Without them: `DEFAULT_SCORE_BUCKETS[method]` (`GENERIC_SCORE_BUCKETS` for other methods)
    plus the threshold.
    """
    scores = np.asarray(calibration_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size:
        top, span = float(scores.max()), float(np.ptp(scores)) or max(abs(float(scores.max())), 1.0)
        edges = {float(f"{v:.3g}") for v in scores} | {float(f"{top + k * span:.3g}") for k in TAIL_SPANS}
    else:
        edges = set(DEFAULT_SCORE_BUCKETS.get(method, GENERIC_SCORE_BUCKETS))
    if np.isfinite(threshold):
        edges.add(float(threshold))
    return tuple(sorted(edges))


class ServiceMetrics:
    """All series the service exports; `start_http` serves them on their own port."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 score_bucket_edges: Sequence[float] = GENERIC_SCORE_BUCKETS):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("semguard_requests", "gRPC requests by method and final status code",
                                ["method", "code"], registry=r)
        self.internal_errors = Counter("semguard_internal_errors",
                                       "Requests failed by the server itself (answered INTERNAL, logged with "
                                       "the traceback), by method and exception type", ["method", "exception"],
                                       registry=r)
        self.request_seconds = Histogram("semguard_request_duration_seconds",
                                         "gRPC request latency as the server sees it", ["method"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("semguard_images", "Images inspected, by verdict (clean or flagged)",
                              ["verdict"], registry=r)
        self.budget_refusals = Counter("semguard_budget_refusals", "Requests refused before any decode for going "
                                       "over a budget: images (the queue's room) or pixels (max_request_pixels)",
                                       ["budget"], registry=r)
        self.blocked = Counter("semguard_blocked_images", "Flagged images refused by the block policy",
                               registry=r)
        self.stage_seconds = Histogram("semguard_stage_duration_seconds",
                                       "Latency per pipeline stage; decode and queue per request, the "
                                       "others per guard batch", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("semguard_batch_size", "Images per guard forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("semguard_queue_depth", "Images waiting in the dynamic batcher", registry=r)
        self.score = Histogram("semguard_score", "Adversarial score per image, on the flagger's own scale; buckets: "
                               "the calibration's score quantiles, the flag threshold and a tail above them "
                               "(or a per-method default range for older bundles)",
                               buckets=score_bucket_edges, registry=r)
        self.threshold = Gauge("semguard_flag_threshold", "Score above which an image is flagged", registry=r)
        self.bundle = Info("semguard_bundle", "The guard bundle this server serves", registry=r)
        # with --upstream only (series stay empty without one)
        self.upstream_up = Gauge("semguard_upstream_up", "1 while the upstream OIP server answers ServerReady "
                                 "true and its model's metadata without an output named like the guard's "
                                 "(polled); the guard is ready only then", registry=r)
        self.upstream_clashes = Counter("semguard_upstream_output_clashes", "Times the upstream model was found "
                                        "with an output named like the guard's (on a poll after a (re)connect or "
                                        "a change, or in an answer); the guard is not ready until it changes",
                                        registry=r)
        self.upstream_seconds = Histogram("semguard_upstream_request_duration_seconds",
                                          "Forwarded ModelInfer latency, send to answer", buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.upstream_requests = Counter("semguard_upstream_requests", "Forwarded ModelInfer calls by the "
                                         "upstream's status code (errors: code != OK)", ["code"], registry=r)
        # with --query-defence only (service/query_defence.py)
        self.query_matches = Counter("semguard_query_attack_matches", "Queries matching an earlier near-duplicate "
                                     "query: of the same client (own) or of another (cross_client: answers never "
                                     "show these)", ["scope"], registry=r)
        self.query_suspected = Gauge("semguard_query_attack_suspected_clients", "Clients whose recent queries "
                                     "match each other like a query attack's (suspected or banned)", registry=r)
        self.query_refused = Counter("semguard_query_attack_refused", "Requests refused by --query-defence "
                                     "block or ban", registry=r)
        self.query_bans = Counter("semguard_query_attack_bans", "Clients banned by --query-defence ban", registry=r)
        self.query_seconds = Histogram("semguard_query_attack_check_duration_seconds", "Time of the query "
                                       "defence per request (fingerprint, match, record)", buckets=LATENCY_BUCKETS,
                                       registry=r)
        for scope in ("own", "cross_client"):
            self.query_matches.labels(scope)
        for budget in ("images", "pixels"):
            self.budget_refusals.labels(budget)
        for verdict in ("clean", "flagged"):
            self.images.labels(verdict)  # export zeros so rate() works from the first scrape
        for stage in ("decode", "queue", "inspect"):
            self.stage_seconds.labels(stage)
        self._http = None

    def set_bundle(self, info: Mapping[str, str], threshold: float) -> None:
        self.bundle.info({k: str(v) for k, v in info.items()})
        self.threshold.set(threshold)

    def observe_batcher(self, event: str, value: float) -> None:
        """Callback for DynamicBatcher(observe=...)."""
        if event == "queue_depth":
            self.queue_depth.set(value)
        elif event == "queue_seconds":
            self.stage_seconds.labels("queue").observe(value)
        elif event == "batch_size":
            self.batch_size.observe(value)

    def observe_verdicts(self, scores: list[float], flags: list[bool]) -> None:
        for s, f in zip(scores, flags):
            self.score.observe(s)
            self.images.labels("flagged" if f else "clean").inc()

    def observe_upstream(self, seconds: float, code: str) -> None:
        """Callback for Upstream(on_call=...)."""
        self.upstream_seconds.observe(seconds)
        self.upstream_requests.labels(code).inc()

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = any free port); return the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
