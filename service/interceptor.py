"""One server interceptor for every RPC: safe request parsing, error -> status mapping, metrics.

Requests are deserialized here instead of by grpc, so a malformed message becomes
INVALID_ARGUMENT with a clear message (grpc's own path answers INTERNAL "Exception deserializing
request!"). Servicers raise ServiceError / InputError and never call context.abort themselves; any
other exception is answered INTERNAL and logged here, once, with its traceback (service.errors).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from semguard.service.errors import OverBudget, ServiceError, status_for
from semguard.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


def _parser(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request is not a valid protobuf message for {method}") from None
    return parse


class GuardInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def _fail(self, context: grpc.ServicerContext, exc: Exception, method: str) -> NoReturn:
        """Abort the RPC with the status `exc` maps to (keeping a code a handler already set)."""
        preset = context.code()
        if preset not in (None, grpc.StatusCode.OK):  # context.abort() or a generated UNIMPLEMENTED stub
            details = context.details() or b""
            code, message = preset, details.decode() if isinstance(details, bytes) else str(details)
        else:
            code, message, internal = status_for(exc)
            if isinstance(exc, OverBudget):
                self.metrics.budget_refusals.labels(exc.budget).inc()
            if internal:
                log.error("%s failed inside the server", method, exc_info=exc)
                self.metrics.internal_errors.labels(method, type(exc).__name__).inc()
        context.abort(code, message)  # raises
        raise AssertionError("context.abort returned")  # grpc's abort always raises

    def _record(self, method: str, context: grpc.ServicerContext, start: float) -> None:
        code = context.code() or grpc.StatusCode.OK
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.request_seconds.labels(method).observe(time.perf_counter() - start)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED for unknown methods
        method = handler_call_details.method.lstrip("/")
        parse = _parser(handler.request_deserializer, method)
        if handler.unary_unary:
            return handler._replace(request_deserializer=None,
                                    unary_unary=self._unary(handler.unary_unary, parse, method))
        if handler.unary_stream:
            return handler._replace(request_deserializer=None,
                                    unary_stream=self._streaming(handler.unary_stream, parse, method, False))
        if handler.stream_unary:
            return handler._replace(request_deserializer=None,
                                    stream_unary=self._unary(handler.stream_unary, parse, method, True))
        return handler._replace(request_deserializer=None,
                                stream_stream=self._streaming(handler.stream_stream, parse, method, True))

    def _unary(self, behaviour, parse, method, streaming_request=False):
        def wrapped(request, context):
            start = time.perf_counter()
            try:
                req = (parse(r) for r in request) if streaming_request else parse(request)
                return behaviour(req, context)
            except Exception as exc:
                self._fail(context, exc, method)
            finally:
                self._record(method, context, start)
        return wrapped

    def _streaming(self, behaviour, parse, method, streaming_request):
        def wrapped(request, context) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                req = (parse(r) for r in request) if streaming_request else parse(request)
                yield from behaviour(req, context)
            except Exception as exc:
                self._fail(context, exc, method)
            finally:
                self._record(method, context, start)
        return wrapped
