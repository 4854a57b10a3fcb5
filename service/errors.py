"""Exceptions -> gRPC status codes, in one place. No traceback ever reaches a client."""
from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from semguard.service.batcher import BatcherClosed, DeadlineExceeded, QueueFull

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with its status code chosen where it is raised (e.g. NOT_FOUND for an unknown model)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to (code, client-facing message)."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, (ValueError, DecodeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, BatcherClosed):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error in the guard server (details in the server log)"
