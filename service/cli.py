"""`semguard serve`: flags (each with a SEMGUARD_* environment fallback) -> ServiceConfig -> serve().

The environment is read here, at the edge, and nowhere else in the service.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any

from semguard.service.config import BLOCK_ACTIONS, POLICIES, ServiceConfig

# (flag, ServiceConfig field, type, help); the environment variable is SEMGUARD_<FIELD upper-cased>.
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "address to bind (0.0.0.0 to accept remote clients)"),
    ("--grpc-port", "grpc_port", int, "gRPC port (0 = any free port)"),
    ("--metrics-port", "metrics_port", int, "Prometheus /metrics HTTP port (0 = any free port)"),
    ("--max-message-bytes", "max_message_bytes", int, "largest gRPC message sent or received"),
    ("--max-batch-size", "max_batch_size", int, "images per guard forward pass (1 = no batching)"),
    ("--max-queue-delay-ms", "max_queue_delay_ms", float, "how long a request may wait for batch-mates"),
    ("--max-queue-images", "max_queue_images", int, "queued images beyond which requests get RESOURCE_EXHAUSTED"),
    ("--max-image-pixels", "max_image_pixels", int, "largest decoded PNG/JPEG (width x height)"),
    ("--policy", "policy", str, f"one of {POLICIES}"),
    ("--block-action", "block_action", str, f"with --policy block: one of {BLOCK_ACTIONS}"),
    ("--model-name", "model_name", str, "OIP model name (default: the bundle's)"),
    ("--upstream", "upstream", str, "host:port of an OIP server (Triton, KServe) to forward clean requests to"),
    ("--upstream-model", "upstream_model", str, "model name on the upstream server"),
    ("--tls-cert", "tls_cert", str, "PEM certificate chain; with --tls-key enables TLS"),
    ("--tls-key", "tls_key", str, "PEM private key"),
    ("--tls-client-ca", "tls_client_ca", str, "PEM CA that client certificates must chain to (mTLS)"),
    ("--grace-seconds", "grace_seconds", float, "shutdown grace for in-flight requests"),
    ("--max-workers", "max_workers", int, "gRPC handler threads"),
    ("--torch-threads", "torch_threads", int, "guard intra-op threads (default: torch's, all cores)"),
]


DEFAULT_BUNDLE = "runs/quickstart/bundle"


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    defaults = ServiceConfig()
    p = subparsers.add_parser("serve", help="run the gRPC guard server (Open Inference Protocol + semguard.v1)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=os.environ.get("SEMGUARD_BUNDLE", DEFAULT_BUNDLE),
                   help="guard bundle directory (env SEMGUARD_BUNDLE; default: the embedded world's, "
                   "written by `semguard quickstart --out runs/quickstart`)")
    for flag, field, kind, text in FLAGS:
        env = f"SEMGUARD_{field.upper()}"
        default = getattr(defaults, field)
        p.add_argument(flag, dest=field, type=kind, default=None,
                       help=f"{text} (env {env}; default {default})")
    p.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    p.add_argument("--log-level", default=os.environ.get("SEMGUARD_LOG_LEVEL", "INFO"))
    p.set_defaults(func=run_serve)
    return p


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServiceConfig:
    """Flag if given, else SEMGUARD_<FIELD> from the environment, else the ServiceConfig default."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for _, field, kind, _ in FLAGS:
        value = getattr(args, field, None)
        if value is None and f"SEMGUARD_{field.upper()}" in environ:
            raw = environ[f"SEMGUARD_{field.upper()}"]
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"SEMGUARD_{field.upper()} must be a {kind.__name__}, got {raw!r}") from None
        if value is not None:
            values[field] = value
    if getattr(args, "no_metrics", False):
        values["metrics_port"] = None
    return dataclasses.replace(ServiceConfig(), **values)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isdir(args.bundle):
        hint = " (run `semguard quickstart --out runs/quickstart` first)" if args.bundle == DEFAULT_BUNDLE else ""
        raise SystemExit(f"semguard serve: bundle directory {args.bundle} does not exist{hint}")
    from semguard.service.server import serve  # grpc/torch imported only when serving
    return serve(config_from_args(args), args.bundle)
