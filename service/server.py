"""Server bootstrap: create_server(config, guard) wires servicers, batcher, health, reflection, metrics.

    created = create_server(ServiceConfig(grpc_port=0, metrics_port=0), guard)
    created.server.start(); ...; created.server.stop(grace=5).wait()

`serve(config, bundle)` is what `semguard serve` runs: load the Guard, start, stop on SIGTERM/SIGINT.
Whatever stops a start (a busy port, an unreadable TLS file) is a StartupError naming the flag or
file, which the CLI prints as one line. Nothing about an upstream stops a start: the port opens at
once, and the guard reports not ready until the upstream is usable (service/upstream.py).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from semguard.allocator import keep_freed_memory
from semguard.service.config import ServiceConfig
from semguard.service.engine import GuardEngine, GuardLike
from semguard.service.errors import StartupError
from semguard.service.generated import guard_pb2, guard_pb2_grpc
from semguard.service.guard_api import GuardServicer
from semguard.service.interceptor import GuardInterceptor
from semguard.service.metrics import ServiceMetrics, score_buckets
from semguard.service.oip import InferenceServicer, guard_outputs
from semguard.service.upstream import Upstream

log = logging.getLogger(__name__)
OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
GUARD_SERVICE = guard_pb2.DESCRIPTOR.services_by_name["Guard"].full_name


def inference_threads(requested: int | None, cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The guard's intra-op threads: `requested` (--torch-threads), else the CPUs this process may use:
    its affinity mask (a container's CPU set), capped by a cgroup v2 CPU quota (a container's CPU limit),
    both of which torch's default (the machine's cores) ignores; None where neither is known."""
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            limit = max(1, math.ceil(int(quota) / int(period)))
            cpus = limit if cpus is None else min(cpus, limit)
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU controller here: the affinity mask alone
    return cpus


class GuardServer:
    """A grpc.Server plus what must start and stop with it (batcher, metrics endpoint, health)."""

    def __init__(self, grpc_server: grpc.Server, config: ServiceConfig, engine: GuardEngine,
                 metrics: ServiceMetrics, health_servicer: health.HealthServicer,
                 inference: InferenceServicer, upstream: Upstream | None):
        self.grpc_server, self.config, self.engine, self.metrics = grpc_server, config, engine, metrics
        self.health, self.inference, self.upstream = health_servicer, inference, upstream
        self.metrics_port: int | None = None

    def start(self) -> None:
        threads = inference_threads(self.config.torch_threads)
        if threads is not None:
            import torch
            torch.set_num_threads(threads)  # process-wide, hence at start, not in create
        if not self.config.return_freed_memory:
            kept = keep_freed_memory()  # process-wide too
            log.info("freed memory kept for reuse" if kept else "freed memory: the C library's default (no glibc mallopt)")
        self.grpc_server.start()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            try:
                self.metrics_port = self.metrics.start_http(host, self.config.metrics_port)
            except OSError as exc:
                self.stop(0).wait()  # the batcher's worker and the upstream channel too, not only the port
                raise StartupError(f"--metrics-port {self.config.metrics_port}: cannot serve metrics on "
                                   f"{host}: {exc.strerror or exc}") from None
        if self.upstream is None:
            self._set_serving(True)  # the guard is loaded: serve
        else:  # ...while the upstream is ready too; the first poll decides before start returns
            self.upstream.watch(self.config.upstream_poll_seconds, self._upstream_changed)

    def _upstream_changed(self, usable: bool) -> None:
        self.metrics.upstream_up.set(1 if usable else 0)
        self.inference.upstream_up = usable
        self._set_serving(usable)

    def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", OIP_SERVICE, GUARD_SERVICE):  # ignored by grpc once shutting down
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Refuse new RPCs, let in-flight ones finish within `grace` s, then release everything."""
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()  # NOT_SERVING: load balancers stop sending
        self.inference.serving = False
        stopped = self.grpc_server.stop(grace)
        done = threading.Event()

        def release() -> None:
            stopped.wait()
            self.engine.close()
            self.metrics.stop_http()
            if self.upstream is not None:
                self.upstream.close()
            done.set()
        threading.Thread(target=release, name="semguard-shutdown", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


class CreatedServer(NamedTuple):
    server: GuardServer
    port: int  # the bound gRPC port (useful with grpc_port=0)


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None


def _credentials(config: ServiceConfig) -> grpc.ServerCredentials:
    key, cert = _read("--tls-key", config.tls_key), _read("--tls-cert", config.tls_cert)
    ca = _read("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    except (TypeError, ValueError) as exc:
        raise StartupError(f"--tls-cert/--tls-key: not usable PEM: {exc}") from None


def upstream_credentials(config: ServiceConfig) -> grpc.ChannelCredentials | None:
    """The channel credentials --upstream-tls* ask for (None: plaintext); StartupError naming an unreadable file."""
    if not config.upstream_tls:
        return None
    ca = _read("--upstream-tls-ca", config.upstream_tls_ca) if config.upstream_tls_ca else None
    key = _read("--upstream-tls-key", config.upstream_tls_key) if config.upstream_tls_key else None
    cert = _read("--upstream-tls-cert", config.upstream_tls_cert) if config.upstream_tls_cert else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _connect_upstream(config: ServiceConfig, model_name: str, metrics: ServiceMetrics,
                      guard_outputs: frozenset[str]) -> Upstream:
    """The upstream's channel; nothing is asked of it yet (GuardServer.start polls it)."""
    return Upstream(config.upstream, config.upstream_model or model_name, config.max_message_bytes, guard_outputs,
                    config.upstream_timeout, on_call=metrics.observe_upstream,
                    on_clash=lambda _message: metrics.upstream_clashes.inc(),
                    credentials=upstream_credentials(config))


def create_server(config: ServiceConfig, guard: GuardLike) -> CreatedServer:
    """Build (not start) the guard server on config.host:config.grpc_port (0 = any free port)."""
    info = guard.info
    # guards whose info predates calibration_scores (GuardLike test doubles) get the method's default buckets
    metrics = ServiceMetrics(score_bucket_edges=score_buckets(info.flagger_method, float(info.threshold),
                                                              getattr(info, "calibration_scores", ())))
    credentials = _credentials(config) if config.tls_cert else None  # before anything needs stopping
    model_name = config.model_name or info.model_name
    ours = frozenset(config.output_prefix + n for n in guard_outputs(config))
    upstream = _connect_upstream(config, model_name, metrics, ours) if config.upstream else None
    engine = GuardEngine(guard, config, metrics)
    options = [("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]  # port 0 must mean a port no other server holds
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="semguard-rpc"),
                         interceptors=[GuardInterceptor(metrics)], options=options)
    inference = InferenceServicer(engine, config, upstream)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    guard_pb2_grpc.add_GuardServicer_to_server(GuardServicer(engine, config), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", OIP_SERVICE, GUARD_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [OIP_SERVICE, GUARD_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.grpc_port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc >= 1.5x raises instead of returning 0
        port = 0
    if port == 0:
        engine.close()
        if upstream is not None:
            upstream.close()
        raise StartupError(f"--grpc-port {config.grpc_port}: cannot bind {address} (in use, or not an address "
                           f"of this host: see --host)")
    return CreatedServer(GuardServer(server, config, engine, metrics, health_servicer, inference, upstream), port)


def _check_port_free(host: str, port: int, flag: str) -> None:
    """StartupError if host:port is taken (grpc's own bind failure also logs a multi-line C-core error)."""
    if port == 0:
        return
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  reuse_port=False):
            pass
    except OSError as exc:
        raise StartupError(f"{flag} {port}: cannot bind {host}:{port}: {exc.strerror or exc}") from None


def load_guard(bundle: str | Path, trust_model_code: bool = False, native_kernels: bool = False) -> GuardLike:
    """The real Guard, imported lazily so `semguard --help` does not pay for torch and the detector.
    A bundle that cannot be loaded (unreadable, incomplete, inconsistent) is a StartupError naming the file;
    so is one whose model is user code (an entry point) unless `trust_model_code`, and a native kernel
    that cannot be built (`native_kernels`: no C compiler)."""
    from semguard.detector.bundle import BundleError, read_bundle
    from semguard.detector.guard import Guard
    from semguard.detector.native import NativeUnavailable
    from semguard.models.factory import UntrustedModelCode
    try:
        return Guard(read_bundle(bundle, trust_model_code=trust_model_code), native_kernels=native_kernels)
    except (BundleError, UntrustedModelCode) as exc:
        raise StartupError(f"--bundle {bundle}: {exc}", exit_code=2) from None
    except NativeUnavailable as exc:
        raise StartupError(f"--native-kernels: {exc}", exit_code=2) from None


def serve(config: ServiceConfig, bundle: str | Path, trust_model_code: bool = False) -> int:
    """Load the bundle, serve until SIGTERM/SIGINT, then shut down gracefully (trust_model_code: load_guard)."""
    _check_port_free(config.host, config.grpc_port, "--grpc-port")  # before the bundle: fail fast
    if config.tls_cert:
        _credentials(config)
    guard = load_guard(bundle, trust_model_code, config.native_kernels)
    created = create_server(config, guard)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the log line that tells callers the port
        signal.signal(sig, lambda *_: stop.set())
    created.server.start()
    log.info("semguard serving %s on %s:%d (metrics port %s)", " and ".join(created.server.inference.names),
             config.host, created.port, created.server.metrics_port)
    # Python runs signal handlers in the main thread between bytecodes: a SIGTERM the kernel hands to
    # one of grpc's threads does not wake a main thread blocked in an untimed wait (seen under load:
    # a server that never stopped), so wake up every second.
    while not stop.wait(1.0):
        pass
    log.info("shutting down: up to %.1f s for in-flight requests", config.grace_seconds)
    created.server.stop().wait()
    log.info("stopped")
    return 0
