"""`semguard serve`: flags (each with a SEMGUARD_* environment fallback) -> ServiceConfig -> serve().

The environment is read here, at the edge, and nowhere else in the service.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import NoReturn

from semguard.config_flags import Flag, add_config_flags, flag_values, with_values
from semguard.service.config import BLOCK_ACTIONS, POLICIES, QUERY_DEFENCE_MODES, ServiceConfig

ENV_PREFIX = "SEMGUARD_"  # SEMGUARD_<FIELD upper-cased> backs each flag

# Types and defaults come from ServiceConfig; choices from the constants it validates with.
FLAGS: tuple[Flag, ...] = (
    Flag("--host", "host", "address to bind (0.0.0.0 to accept remote clients)"),
    Flag("--grpc-port", "grpc_port", "gRPC port (0 = any free port)"),
    Flag("--metrics-port", "metrics_port", "Prometheus /metrics HTTP port (0 = any free port)"),
    Flag("--max-message-bytes", "max_message_bytes", "largest gRPC message sent or received"),
    Flag("--max-batch-size", "max_batch_size", "images per guard forward pass (1 = no batching)"),
    Flag("--max-queue-delay-ms", "max_queue_delay_ms", "how long a request may wait for batch-mates"),
    Flag("--max-queue-images", "max_queue_images", "queued images beyond which requests get RESOURCE_EXHAUSTED"),
    Flag("--max-image-pixels", "max_image_pixels", "largest decoded PNG/JPEG (width x height)"),
    Flag("--max-request-pixels", "max_request_pixels", "most PNG/JPEG pixels one request may declare in all "
         "(read from the headers before decoding; over it: RESOURCE_EXHAUSTED)"),
    Flag("--policy", "policy", "annotate: answer with the verdict; block: refuse flagged images", POLICIES),
    Flag("--block-action", "block_action", "with --policy block: error fails the request, refuse blanks flagged "
         "images' outputs", BLOCK_ACTIONS),
    Flag("--model-name", "model_name", "OIP model name (default: the bundle's)"),
    Flag("--upstream", "upstream", "host:port of an OIP server (Triton, KServe) to forward clean requests to"),
    Flag("--upstream-model", "upstream_model", "model name on the upstream server; the guard serves under it "
         "(--model-name then adds an alias)"),
    Flag("--output-prefix", "output_prefix", "prefix of the guard's SCORE, FLAG, SIGNATURE outputs (e.g. SEMGUARD_), "
         "needed when the upstream has outputs of those names"),
    Flag("--upstream-poll-seconds", "upstream_poll_seconds", "how often the upstream's readiness is polled"),
    Flag("--upstream-timeout", "upstream_timeout", "seconds an upstream call may take when the client sets no "
         "deadline (a client's deadline is passed on)"),
    Flag("--upstream-tls", "upstream_tls", "TLS to the upstream (its certificate checked against --upstream-tls-ca, "
         "else the system roots)"),
    Flag("--upstream-tls-ca", "upstream_tls_ca", "PEM CA the upstream's certificate must chain to"),
    Flag("--upstream-tls-cert", "upstream_tls_cert", "PEM client certificate for an upstream that requires mTLS"),
    Flag("--upstream-tls-key", "upstream_tls_key", "PEM private key of --upstream-tls-cert"),
    Flag("--tls-cert", "tls_cert", "PEM certificate chain; with --tls-key enables TLS"),
    Flag("--tls-key", "tls_key", "PEM private key"),
    Flag("--tls-client-ca", "tls_client_ca", "PEM CA that client certificates must chain to (mTLS)"),
    Flag("--grace-seconds", "grace_seconds", "shutdown grace for in-flight requests"),
    Flag("--max-workers", "max_workers", "gRPC handler threads"),
    Flag("--torch-threads", "torch_threads", "guard intra-op threads (default: the CPUs the process may use: "
         "affinity, cgroup quota)"),
    Flag("--return-freed-memory", "return_freed_memory", "give freed memory back to the kernel at once (the C "
         "library's default); by default the server keeps it for reuse, so large activations are not faulted in "
         "afresh on every forward pass (its memory stays at its peak)"),
    Flag("--native-kernels", "native_kernels", "compute the guard's count sketches and channel means in one read of "
         "each activation and its 1 vs 2 margins in one pass, by C kernels built at start-up with the machine's C "
         "compiler ($CC, else cc); scores equal the default path's to float32 rounding"),
    Flag("--query-defence", "query.mode", "stateful query-attack defence: annotate answers with the query verdict, "
         "block refuses near-duplicate queries of suspected clients, ban refuses all their queries for a while",
         QUERY_DEFENCE_MODES),
    Flag("--query-client-key", "query_client_key", "gRPC metadata key naming the client (e.g. x-api-key; default: "
         "the mTLS certificate, else the peer address)"),
    Flag("--query-match-threshold", "query.match_threshold", "shared fingerprint hashes that make two queries match"),
    Flag("--query-suspect-matches", "query.suspect_matches", "matches among a client's recent queries that make it "
         "suspected"),
    Flag("--query-suspect-window", "query.suspect_window", "a client's recent queries counted for suspicion"),
    Flag("--query-history", "query.history", "queries remembered across all clients (oldest evicted)"),
    Flag("--query-ban-seconds", "query.ban_seconds", "how long --query-defence ban refuses a suspected client"),
)


DEFAULT_BUNDLE = "runs/quickstart/bundle"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the gRPC guard server (Open Inference Protocol + semguard.v1)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=os.environ.get("SEMGUARD_BUNDLE", DEFAULT_BUNDLE),
                   help="guard bundle directory (env SEMGUARD_BUNDLE; default: the embedded world's, "
                   "written by `semguard quickstart --out runs/quickstart`)")
    add_config_flags(p, ServiceConfig, FLAGS, env_prefix=ENV_PREFIX)
    p.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow a bundle whose model is your own code (--model-entry pkg.module:factory): "
                   "imports and runs that module; never implied")
    p.add_argument("--log-level", default=os.environ.get("SEMGUARD_LOG_LEVEL", "INFO"))
    p.set_defaults(func=run_serve)
    p.error = _one_line_error  # type: ignore[method-assign]
    return p


def _one_line_error(message: str) -> NoReturn:
    """argparse's error, without the ~20-line usage block: one line, exit code 2."""
    print(f"semguard serve: {message} (see semguard serve --help)", file=sys.stderr)
    raise SystemExit(2)


def _flags_named(message: str) -> str:
    """' (--flag, ...)' for the config fields a ServiceConfig error names, so the line says what to change."""
    flags = [f.name for f in FLAGS if re.search(rf"\b{f.field}\b", message)]
    return f" ({', '.join(flags)})" if flags else ""


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Flag if given, else SEMGUARD_<FIELD> from the environment, else the ServiceConfig default."""
    environ = os.environ if environ is None else environ
    values = flag_values(args, ServiceConfig, FLAGS, environ, env_prefix=ENV_PREFIX)
    if getattr(args, "no_metrics", False):
        values["metrics_port"] = None
    return with_values(ServiceConfig(), values)


def run_serve(args: argparse.Namespace) -> int:
    """Serve; a configuration error is one stderr line and exit code 2, a failed start one line and 1."""
    def fail(message: str, code: int) -> int:
        print(f"semguard serve: {message}", file=sys.stderr)
        return code

    try:
        config = config_from_args(args)
    except ValueError as exc:
        return fail(f"{exc}{_flags_named(str(exc))}", 2)
    if not os.path.isdir(args.bundle):
        hint = " (run `semguard quickstart --out runs/quickstart` first)" if args.bundle == DEFAULT_BUNDLE else ""
        return fail(f"--bundle {args.bundle}: not a directory{hint}", 2)
    try:
        level = logging.getLevelName(args.log_level.upper())
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    except (ValueError, TypeError):
        return fail(f"--log-level {args.log_level}: not a logging level (DEBUG, INFO, WARNING, ERROR)", 2)
    from semguard.service.errors import StartupError
    from semguard.service.server import serve  # grpc/torch imported only when serving
    try:
        return serve(config, args.bundle, trust_model_code=args.trust_model_code)
    except StartupError as exc:
        return fail(str(exc), exc.exit_code)
