"""`semguard health`: ask a server's gRPC health service (grpc.health.v1) whether it is SERVING.

The container's HEALTHCHECK and any shell probe run this: exit 0 when SERVING, 1 otherwise, one
line of output either way. It imports grpc and grpc_health only (no torch, no detector), so a
probe costs a fraction of a second rather than the seconds a torch import takes; `semguard.cli`
dispatches to it before importing any other command.
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:8001"
DEFAULT_TIMEOUT = 3.0  # s; below Docker's and Kubernetes' usual probe timeouts, well above a healthy answer


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """(serving, one-line description) for `service` ("" = the whole server) at host:port."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                               wait_for_ready=False)
        except grpc.RpcError as exc:
            first_line = (exc.details() or "").splitlines()[:1]  # UNAVAILABLE details can span lines
            return False, ": ".join([exc.code().name, *first_line])
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("health", help="exit 0 if a guard server's gRPC health service says SERVING",
                              description=__doc__.splitlines()[0])
    add_health_flags(p)
    p.set_defaults(func=run_health)
    return p


def add_health_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"host:port of the gRPC server (default {DEFAULT_ADDRESS})")
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server, \"\"; "
                   "e.g. inference.GRPCInferenceService)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the answer")


def run_health(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        print(f"semguard health: --timeout {args.timeout}: must be > 0 seconds", file=sys.stderr)
        return 2
    serving, status = check(args.address, args.service, args.timeout)
    name = f" {args.service}" if args.service else ""
    print(f"{args.address}{name}: {status}")
    return 0 if serving else 1


def main(argv: list[str] | None = None) -> int:
    """`semguard health ...` without the full command line's imports."""
    p = argparse.ArgumentParser(prog="semguard health", description=__doc__.splitlines()[0])
    add_health_flags(p)
    return run_health(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
