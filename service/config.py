"""ServiceConfig: every knob of the guard server, with the reason for each default.

Filled from the CLI or the environment at the edge only (service/cli.py); the server code takes
a ServiceConfig and never reads os.environ itself.
"""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("annotate", "block")
BLOCK_ACTIONS = ("error", "refuse")
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"             # loopback unless asked: a guard is not public by accident
    grpc_port: int = 8001               # Triton's gRPC port, so clients' defaults just work
    metrics_port: int | None = 8002     # Prometheus /metrics on its own HTTP port; None = off
    metrics_host: str | None = None     # None = same as host
    max_message_bytes: int = 64 * MiB   # gRPC default is 4 MiB; 32 x 3 x 299 x 299 fp32 is ~34 MB
    max_batch_size: int = 32            # images per guard forward pass (Triton's max_batch_size)
    max_queue_delay_ms: float = 5.0     # how long the first request waits for company (Triton's max_queue_delay)
    max_queue_images: int = 1024        # beyond this, shed load with RESOURCE_EXHAUSTED instead of growing latency
    max_image_pixels: int = 4096 * 4096  # decoded size limit for PNG/JPEG: a decompression-bomb guard
    policy: str = "annotate"            # "annotate": always answer with the verdict; "block": refuse flagged images
    block_action: str = "error"         # block: "error" fails the request, "refuse" blanks flagged images' outputs
    model_name: str | None = None       # OIP model name; None = the bundle's model_name
    upstream: str | None = None         # host:port of an OIP server to forward clean requests to
    upstream_model: str | None = None   # its model name; None = same as ours
    output_prefix: str = ""             # prefix of the guard's SCORE/FLAG/SIGNATURE outputs, so they cannot clash
                                        # with (and be shadowed by) an upstream's outputs of the same name
    upstream_poll_seconds: float = 1.0  # upstream ServerReady poll period: how fast readiness follows it
    tls_cert: str | None = None         # PEM server certificate chain; with tls_key turns TLS on
    tls_key: str | None = None          # PEM private key
    tls_client_ca: str | None = None    # PEM CA: when set, clients must present a certificate it signed (mTLS)
    grace_seconds: float = 10.0         # shutdown: how long in-flight requests may finish
    max_workers: int = 32               # gRPC handler threads; each waits on the batcher, so > concurrent clients
    torch_threads: int | None = None    # guard intra-op threads (process-wide); None = the CPUs the process may
                                        # use (affinity, cgroup quota: server.inference_threads). Set it
                                        # below the core count when clients or other jobs share the cores:
                                        # oversubscribed OpenMP threads stall batched forwards badly

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.block_action not in BLOCK_ACTIONS:
            raise ValueError(f"block_action must be one of {BLOCK_ACTIONS}, got {self.block_action!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {self.torch_threads}")
        for name in ("max_batch_size", "max_message_bytes", "max_queue_images", "max_image_pixels", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.upstream_poll_seconds <= 0:
            raise ValueError(f"upstream_poll_seconds must be > 0, got {self.upstream_poll_seconds}")
        if self.upstream_model and not self.upstream:
            raise ValueError("upstream_model needs upstream (host:port)")
        if self.max_queue_delay_ms < 0 or self.grace_seconds < 0:
            raise ValueError("max_queue_delay_ms and grace_seconds must be >= 0")
        if self.upstream and self.policy == "block" and self.block_action == "refuse":
            raise ValueError("block_action='refuse' blanks the local classifier's outputs; with an upstream "
                             "classifier use block_action='error'")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
