"""A minimal Open Inference Protocol server standing in for Triton/KServe behind the guard.

Its model metadata lists `outputs`; ModelInfer answers whatever `answer(request)` builds (typed or
raw contents, clashing names...), and records every request it was sent.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc


def raw_answer(outputs: dict[str, tuple[str, np.ndarray]]) -> Callable[[pb.ModelInferRequest], pb.ModelInferResponse]:
    """An answer of fixed raw outputs {name: (datatype, array)}."""
    def answer(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name)
        for name, (datatype, array) in outputs.items():
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response
    return answer


class FakeUpstream(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, outputs: list[str], answer: Callable[[pb.ModelInferRequest], pb.ModelInferResponse],
                 delay_s: float = 0.0):
        self.outputs, self.answer, self.delay_s = outputs, answer, delay_s
        self.requests: list[pb.ModelInferRequest] = []
        self.deadlines: list[float | None] = []  # seconds left at arrival; None = no deadline
        self.server: grpc.Server | None = None
        self.port = 0
        self._lock = threading.Lock()

    def start(self, port: int = 0, credentials: grpc.ServerCredentials | None = None) -> int:
        """Serve on 127.0.0.1 (port 0: any free one); with `credentials`, TLS only (mTLS if they require it)."""
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self, self.server)
        address = f"127.0.0.1:{port or self.port}"
        self.port = (self.server.add_insecure_port(address) if credentials is None
                     else self.server.add_secure_port(address, credentials))
        self.server.start()
        return self.port

    def stop(self) -> None:
        self.server.stop(0).wait(5)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelMetadata(self, request, context):
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="fake",
                                        outputs=[T(name=n, datatype="FP32", shape=[-1]) for n in self.outputs])

    def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        with self._lock:
            self.requests.append(request)
            self.deadlines.append(None if remaining is None or remaining > 1e6 else remaining)
        time.sleep(self.delay_s)
        return self.answer(request)
