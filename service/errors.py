"""Exceptions -> gRPC status codes, in one place. No traceback ever reaches a client.

A client's fault has its own status and message: bad input (`InputError`, raised by the
guard's and the service's validation; a malformed protobuf) is INVALID_ARGUMENT. Any other
exception, ValueError included (a BundleError or a shape mismatch inside the guard), is the
server's fault: INTERNAL with a generic message; the interceptor logs it with its traceback
and counts it (`semguard_internal_errors_total`).
"""
from __future__ import annotations

from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from semguard.detector.errors import InputError
from semguard.service.batcher import BatcherClosed, DeadlineExceeded, QueueFull

INTERNAL_MESSAGE = "internal error in the guard server (details in the server log)"


class ServiceError(Exception):
    """An error with its status code chosen where it is raised (e.g. NOT_FOUND for an unknown model)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class OverBudget(Exception):
    """A request over one of the per-request budgets (`budget`: "images" or "pixels"), refused before the
    work it would cost: RESOURCE_EXHAUSTED, counted in semguard_budget_refusals_total{budget}."""

    def __init__(self, budget: str, message: str):
        super().__init__(message)
        self.budget = budget


class StartupError(Exception):
    """`semguard serve` cannot start: one line for stderr, and the exit code (2 usage, 1 runtime)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Status(NamedTuple):
    code: grpc.StatusCode
    message: str  # what the client is told
    internal: bool  # the server's fault: logged with its traceback and counted; its text stays in the log


def status_for(exc: BaseException) -> Status:
    """Map an exception to its status and client-facing message."""
    if isinstance(exc, ServiceError):
        return Status(exc.code, exc.message, False)
    if isinstance(exc, (InputError, DecodeError)):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(exc), False)
    if isinstance(exc, (QueueFull, OverBudget)):
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), False)
    if isinstance(exc, DeadlineExceeded):
        return Status(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), False)
    if isinstance(exc, BatcherClosed):
        return Status(grpc.StatusCode.UNAVAILABLE, str(exc), False)
    return Status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, True)
