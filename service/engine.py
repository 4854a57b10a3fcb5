"""GuardEngine: the Guard behind the dynamic batcher, with stage timings; shared by both servicers.

The Guard decides (detector/guard.py contract: `info`, `inspect(images) -> list[Verdict]`); the
engine only batches, times and counts. The whole `inspect` call is exported as stage "inspect".
Optional hook, read right after each `inspect` call (one worker thread, so no race): a
`stage_timings` attribute on the guard, either a mapping {"forward"|"signature"|"flagger": s} or
an object with `forward_s`, `signature_s`, `flagger_s` (detector.guard.StageTimings); when
present those stages are exported too.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import torch

from semguard.service.batcher import DynamicBatcher
from semguard.service.config import ServiceConfig
from semguard.service.errors import OverBudget, ServiceError
from semguard.service.metrics import ServiceMetrics
from semguard.service.query_defence import QueryDefence, QueryVerdict, client_identity, client_key

T = TypeVar("T")
log = logging.getLogger(__name__)
GUARD_STAGES = ("forward", "signature", "flagger")


class GuardLike(Protocol):
    """What the service needs of detector.guard.Guard (ARCHITECTURE.md, "The guard contract")."""

    @property
    def info(self) -> Any: ...

    def inspect(self, images: torch.Tensor) -> list[Any]: ...


def stage_seconds(timings: Any) -> dict[str, float]:
    """The optional hook (see module doc) as {stage: seconds}; {} when absent."""
    if timings is None:
        return {}
    if isinstance(timings, Mapping):
        return {s: float(timings[s]) for s in GUARD_STAGES if s in timings}
    return {s: float(getattr(timings, f"{s}_s")) for s in GUARD_STAGES if hasattr(timings, f"{s}_s")}


def time_remaining(context: grpc.ServicerContext | None) -> float | None:
    """Seconds left of the RPC's deadline; None without one (grpc reports "no deadline" as ~1e9 s)."""
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None or remaining > 1e6 else remaining


class GuardEngine:
    def __init__(self, guard: GuardLike, config: ServiceConfig, metrics: ServiceMetrics):
        self.guard, self.info, self.metrics = guard, guard.info, metrics
        self.input_shape = tuple(int(s) for s in self.info.input_shape)  # (C, H, W)
        self.batcher = DynamicBatcher(self._run, config.max_batch_size, config.max_queue_delay_ms / 1000.0,
                                      config.max_queue_images, observe=metrics.observe_batcher)
        self.query = QueryDefence(config.query) if config.query.mode != "off" else None
        self.query_client_key = config.query_client_key
        metrics.set_bundle({"model_name": self.info.model_name, "flagger_method": self.info.flagger_method,
                            "layers": len(self.info.layers), "classes": len(self.info.labels),
                            "input_shape": "x".join(map(str, self.input_shape))}, float(self.info.threshold))

    def decode(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a decode function, timing it as stage "decode"."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - start)

    def check_queries(self, images: np.ndarray, context: grpc.ServicerContext | None) -> list[QueryVerdict] | None:
        """The query defence's verdict per image of this client's request (None when it is off); a
        ServiceError PERMISSION_DENIED when it refuses the request (--query-defence block / ban)."""
        if self.query is None:
            return None
        start = time.perf_counter()
        client = client_identity(context.peer(), context.invocation_metadata() or (),
                                 context.peer_identities(), self.query_client_key) if context is not None else ""
        check = self.query.check(images, client)
        m = self.metrics
        m.query_seconds.observe(time.perf_counter() - start)
        m.query_matches.labels("own").inc(sum(v.matched for v in check.verdicts))
        m.query_matches.labels("cross_client").inc(check.cross_client)
        m.query_suspected.set(self.query.n_suspected)
        m.query_bans.inc(int(check.newly_banned))
        if check.newly_suspected or check.newly_banned:  # an API key is a secret: logged as its hash
            shown = client if not client.startswith("key:") else f"key#{client_key(client):016x}"
            log.warning("query defence: client %s %s (%d of its recent queries are near-duplicates)", shown,
                        "banned" if check.newly_banned else "suspected", check.verdicts[-1].client_matches)
        if check.refused:
            m.query_refused.inc()
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "refused by the query defence: this client's "
                               "recent queries are near-duplicates of each other, as a query attack's are")
        return check.verdicts

    def admit(self, n: int, what: str) -> None:
        """Refuse a request of `n` images before it is decoded when the queue has no room for it
        (OverBudget "images"; the batcher's own check at submit stays, for requests racing in)."""
        limit, waiting = self.batcher.max_queue_images, self.batcher.queued_images
        if n > limit:
            raise OverBudget("images", f"{what}: {n} images, more than the queue ever holds ({limit}, "
                                       "max_queue_images); split the request")
        if n > limit - waiting:
            raise OverBudget("images", f"{what}: {n} images, but the queue has room for {limit - waiting} "
                                       f"({waiting} of {limit} waiting, max_queue_images); retry later")

    def inspect(self, images: np.ndarray, context: grpc.ServicerContext | None = None) -> list[Any]:
        """Verdicts for images (B, C, H, W) float32, through the batcher, within the RPC's deadline."""
        remaining = time_remaining(context)
        deadline = None if remaining is None else time.monotonic() + remaining
        return self.batcher.infer(images, deadline)

    def _run(self, images: np.ndarray) -> list[Any]:
        start = time.perf_counter()
        verdicts = self.guard.inspect(torch.from_numpy(images))
        self.metrics.stage_seconds.labels("inspect").observe(time.perf_counter() - start)
        for stage, seconds in stage_seconds(getattr(self.guard, "stage_timings", None)).items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        if len(verdicts) != len(images):
            raise RuntimeError(f"guard returned {len(verdicts)} verdicts for {len(images)} images")
        self.metrics.observe_verdicts([float(v.score) for v in verdicts], [bool(v.flagged) for v in verdicts])
        return verdicts

    def close(self) -> None:
        self.batcher.close()
