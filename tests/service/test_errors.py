"""Whose fault a failure is: a client's bad input is INVALID_ARGUMENT and no error in the server log;
anything the server gets wrong (a ValueError inside the guard included) is INTERNAL with a generic
message, logged with its traceback, and counted in semguard_internal_errors_total."""
from __future__ import annotations

import contextlib
import logging
import re

import grpc
import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from semguard.detector.bundle import BundleError
from semguard.detector.errors import InputError
from semguard.service.errors import INTERNAL_MESSAGE
from semguard.service.generated import guard_pb2, guard_pb2_grpc
from semguard.service.server import GUARD_SERVICE
from tests.service.conftest import FakeGuard
from tests.service.test_bad_input import BAD_MODEL_INFER, INVALID

INSPECT = f"{GUARD_SERVICE}/Inspect"


class FailingGuard(FakeGuard):
    """Validates like the double, then fails inside the way a real guard can."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def inspect(self, images: torch.Tensor) -> list:
        super().inspect(images)
        self._profile_layers()

    def _profile_layers(self) -> None:
        raise self.error


def inspect_request(images: np.ndarray) -> guard_pb2.InspectRequest:
    tensor = guard_pb2.Tensor(layout=guard_pb2.Tensor.FP32_NCHW, shape=list(images.shape), data=images.tobytes())
    return guard_pb2.InspectRequest(tensor=tensor)


@contextlib.contextmanager
def guard_stub(port: int):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield guard_pb2_grpc.GuardStub(channel)


def errors_logged(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def internal_errors(created, exception: str, method: str = INSPECT) -> float:
    value = created.server.metrics.registry.get_sample_value(
        "semguard_internal_errors_total", {"method": method, "exception": exception})
    return value or 0.0


@pytest.mark.parametrize("name,req,code,message", [c for c in BAD_MODEL_INFER if c[2] == INVALID],
                         ids=[c[0] for c in BAD_MODEL_INFER if c[2] == INVALID])
def test_bad_input_is_not_an_error_of_the_server(server, channel, caplog, name, req, code, message):
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.RpcError) as err:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert err.value.code() == INVALID and re.search(message, err.value.details())
    assert errors_logged(caplog) == []
    assert not any(s.value for m in server.server.metrics.registry.collect() if m.name == "semguard_internal_errors"
                   for s in m.samples)


def test_input_error_of_the_guard_is_invalid_argument(make_server, caplog, clean_images):
    created = make_server(FailingGuard(InputError("images must lie in [0, 1], got range [0, 1.2]")))
    caplog.set_level(logging.INFO)
    with guard_stub(created.port) as stub, pytest.raises(grpc.RpcError) as err:
        stub.Inspect(inspect_request(clean_images), timeout=10)
    assert err.value.code() == INVALID
    assert err.value.details() == "images must lie in [0, 1], got range [0, 1.2]"
    assert errors_logged(caplog) == [] and internal_errors(created, "InputError") == 0


@pytest.mark.parametrize("error", [
    ValueError("acts['pool'] must be (B, 12) after identity, got (4, 11)"),  # a consistency check inside
    BundleError("flagger uses Mahalanobis scores but the bundle has no mahalanobis file"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
], ids=lambda e: type(e).__name__)
def test_internal_failure_is_internal_logged_and_counted(make_server, caplog, clean_images, error):
    created = make_server(FailingGuard(error))
    caplog.set_level(logging.INFO)
    with guard_stub(created.port) as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.Inspect(inspect_request(clean_images), timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == INTERNAL_MESSAGE  # neither the exception's text nor a traceback
        with pytest.raises(grpc.RpcError):
            stub.Inspect(inspect_request(clean_images), timeout=10)
    [first, second] = errors_logged(caplog)
    assert first.exc_info is not None and first.exc_info[1] is error and INSPECT in first.getMessage()
    logged = caplog.text
    assert "Traceback" in logged and "_profile_layers" in logged and str(error) in logged
    assert internal_errors(created, type(error).__name__) == 2
    assert created.server.metrics.registry.get_sample_value(
        "semguard_requests_total", {"method": INSPECT, "code": "INTERNAL"}) == 2
