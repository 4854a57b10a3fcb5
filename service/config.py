"""ServiceConfig: every knob of the guard server, with the reason for each default.

Filled from the CLI or the environment at the edge only (semguard/commands/serve.py); the server code takes
a ServiceConfig and never reads os.environ itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("annotate", "block")
BLOCK_ACTIONS = ("error", "refuse")
MiB = 1024 * 1024
QUERY_DEFENCE_MODES = ("off", "annotate", "block", "ban")


@dataclass(frozen=True)
class QueryDefenceConfig:
    """The stateful query defence (service/query_defence.py); window and step are Blacklight's for 32x32 images."""

    mode: str = "off"             # off | annotate (verdict in answers) | block (refuse matches of suspected
                                  # clients) | ban (refuse every query of a suspected client for ban_seconds)
    window: int = 20              # values per hashed window; Blacklight's for 32x32 images
    quant_step: int = 50          # quantisation step on the 0-255 scale (Blacklight): removes small perturbations
    n_hashes: int = 12            # hashes remembered per query (Blacklight: 50; 12 keeps 10 M queries in 1 GiB)
    probe_hashes: int = 48        # hashes of a new query looked up among the remembered ones (>= n_hashes)
    match_threshold: int = 6      # a remembered query's hashes found among the probe that make a match
    suspect_matches: int = 3      # matches within a client's last suspect_window queries that make it suspected:
                                  # one near-duplicate (a re-encoded upload) is not an attack, an attack makes hundreds
    suspect_window: int = 100
    history: int = 100_000        # queries remembered (all clients); the oldest are evicted
    max_clients: int = 100_000    # client states kept (least recently seen evicted)
    ban_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.mode not in QUERY_DEFENCE_MODES:
            raise ValueError(f"query.mode must be one of {QUERY_DEFENCE_MODES}, got {self.mode!r}")
        for name in ("window", "quant_step", "n_hashes", "probe_hashes", "match_threshold", "suspect_matches",
                     "suspect_window", "history", "max_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"query.{name} must be >= 1, got {getattr(self, name)}")
        if self.match_threshold > self.n_hashes:
            raise ValueError(f"query.match_threshold ({self.match_threshold}) must be <= the fingerprint's "
                             f"{self.n_hashes} hashes")
        if self.probe_hashes < self.n_hashes:
            raise ValueError(f"query.probe_hashes ({self.probe_hashes}) must be >= query.n_hashes ({self.n_hashes})")
        if self.suspect_matches > self.suspect_window:
            raise ValueError(f"query.suspect_matches ({self.suspect_matches}) must be <= query.suspect_window "
                             f"({self.suspect_window})")
        if self.ban_seconds <= 0:
            raise ValueError(f"query.ban_seconds must be > 0, got {self.ban_seconds}")


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"             # loopback unless asked: a guard is not public by accident
    grpc_port: int = 8001               # Triton's gRPC port, so clients' defaults just work
    metrics_port: int | None = 8002     # Prometheus /metrics on its own HTTP port; None = off
    metrics_host: str | None = None     # None = same as host
    max_message_bytes: int = 64 * MiB   # gRPC default is 4 MiB; 32 x 3 x 299 x 299 fp32 is ~34 MB
    max_batch_size: int = 32            # images per guard forward pass (Triton's max_batch_size)
    max_queue_delay_ms: float = 5.0     # how long the first request waits for company (Triton's max_queue_delay),
                                        # only under load: one that finds the batcher idle is run at once
    max_queue_images: int = 1024        # beyond this, shed load with RESOURCE_EXHAUSTED instead of growing latency
    max_image_pixels: int = 4096 * 4096  # decoded size limit for PNG/JPEG: a decompression-bomb guard
    max_request_pixels: int = 16 * 4096 * 4096  # declared PNG/JPEG pixels of one request, from the headers before
                                        # any decode: 16 images at the per-image limit (~seconds of CPU);
                                        # a 64 MiB message of 16 kB PNGs would otherwise decode 4000 x 16 Mpx
    policy: str = "annotate"            # "annotate": always answer with the verdict; "block": refuse flagged images
    block_action: str = "error"         # block: "error" fails the request, "refuse" blanks flagged images' outputs
    model_name: str | None = None       # OIP model name; None = the bundle's model_name
    upstream: str | None = None         # host:port of an OIP server to forward clean requests to
    upstream_model: str | None = None   # the upstream's model name, which the guard serves under; None = model_name
                                        # (or the bundle's); with both, model_name is an alias of it
    output_prefix: str = ""             # prefix of the guard's SCORE/FLAG/SIGNATURE outputs, so they cannot clash
                                        # with (and be shadowed by) an upstream's outputs of the same name
    upstream_poll_seconds: float = 1.0  # upstream ServerReady poll period: how fast readiness follows it
    upstream_timeout: float = 5.0       # s an upstream call may take when the client set no deadline (a client's
                                        # deadline is passed on instead): a frozen upstream must not hold requests
    upstream_tls: bool = False          # TLS to the upstream (plaintext otherwise: loopback or a pod's own network)
    upstream_tls_ca: str | None = None  # PEM CA the upstream's certificate must chain to; None = the system roots
    upstream_tls_cert: str | None = None  # PEM client certificate chain for an upstream that requires mTLS
    upstream_tls_key: str | None = None   # its private key
    tls_cert: str | None = None         # PEM server certificate chain; with tls_key turns TLS on
    tls_key: str | None = None          # PEM private key
    tls_client_ca: str | None = None    # PEM CA: when set, clients must present a certificate it signed (mTLS)
    grace_seconds: float = 10.0         # shutdown: how long in-flight requests may finish
    max_workers: int = 32               # gRPC handler threads; each waits on the batcher, so > concurrent clients
    torch_threads: int | None = None    # guard intra-op threads (process-wide); None = the CPUs the process may
                                        # use (affinity, cgroup quota: server.inference_threads). Set it
                                        # below the core count when clients or other jobs share the cores:
                                        # oversubscribed OpenMP threads stall batched forwards badly
    return_freed_memory: bool = False   # the C library's default: freed activations go back to the kernel at once and
                                        # fault in again on the next pass; off, the server keeps them for reuse
                                        # (semguard.allocator: resnet50 batch 32 forward 4.06 -> 2.64 s here)
    native_kernels: bool = False        # sketches and channel means in one read of each activation, margins in one pass,
                                        # by C kernels built at start-up (detector/native.py; needs a C compiler):
                                        # resnet50 fast batch 32 1.34x -> 1.13x its forward; scores to float32 rounding
    query: QueryDefenceConfig = field(default_factory=QueryDefenceConfig)  # stateful query-attack defence
    query_client_key: str | None = None  # gRPC metadata key naming the client (an API key header, lower case);
                                         # without it (or when absent) the mTLS certificate, else the peer address

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.block_action not in BLOCK_ACTIONS:
            raise ValueError(f"block_action must be one of {BLOCK_ACTIONS}, got {self.block_action!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {self.torch_threads}")
        for name in ("max_batch_size", "max_message_bytes", "max_queue_images", "max_image_pixels",
                     "max_request_pixels", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("upstream_poll_seconds", "upstream_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.upstream_model and not self.upstream:
            raise ValueError("upstream_model needs upstream (host:port)")
        if self.max_queue_delay_ms < 0 or self.grace_seconds < 0:
            raise ValueError("max_queue_delay_ms and grace_seconds must be >= 0")
        if self.upstream and self.policy == "block" and self.block_action == "refuse":
            raise ValueError("block_action='refuse' blanks the local classifier's outputs; with an upstream "
                             "classifier use block_action='error'")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if (self.upstream_tls_cert is None) != (self.upstream_tls_key is None):
            raise ValueError("upstream_tls_cert and upstream_tls_key must be given together")
        if not self.upstream_tls and (self.upstream_tls_ca or self.upstream_tls_cert):
            raise ValueError("upstream_tls_ca / upstream_tls_cert / upstream_tls_key need upstream_tls")
        if self.upstream_tls and not self.upstream:
            raise ValueError("upstream_tls needs upstream (host:port)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
