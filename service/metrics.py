"""Prometheus metrics of one guard server, on a registry of its own (tests run several servers).

Names follow Prometheus conventions: `semguard_` prefix, base units (seconds), `_total` counters,
histograms rather than summaries so replicas aggregate, low-cardinality labels only.
"""
from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

STAGES = ("decode", "queue", "inspect", "forward", "signature", "flagger")
# Latency buckets from 0.5 ms (a tiny batch) to 10 s (a big batch on CPU behind a long queue).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Scores are flagger-defined: probabilities in [0, 1] (logistic) or unbounded distances (gaussian,
# which reach 1e4 and beyond far from the clean data), so fine steps to 1 and then decades.
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
                 1e3, 1e4, 1e5)


class ServiceMetrics:
    """All series the service exports; `start_http` serves them on their own port."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("semguard_requests", "gRPC requests by method and final status code",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("semguard_request_duration_seconds",
                                         "gRPC request latency as the server sees it", ["method"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("semguard_images", "Images inspected, by verdict (clean or flagged)",
                              ["verdict"], registry=r)
        self.blocked = Counter("semguard_blocked_images", "Flagged images refused by the block policy",
                               registry=r)
        self.stage_seconds = Histogram("semguard_stage_duration_seconds",
                                       "Latency per pipeline stage; decode and queue per request, the "
                                       "others per guard batch", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("semguard_batch_size", "Images per guard forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("semguard_queue_depth", "Images waiting in the dynamic batcher", registry=r)
        self.score = Histogram("semguard_score", "Adversarial score per image", buckets=SCORE_BUCKETS, registry=r)
        self.threshold = Gauge("semguard_flag_threshold", "Score above which an image is flagged", registry=r)
        self.bundle = Info("semguard_bundle", "The guard bundle this server serves", registry=r)
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

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = any free port); return the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
