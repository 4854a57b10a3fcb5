"""Forward a ModelInfer request to an existing Open Inference Protocol server (Triton, KServe...).

Uses tritonclient's own stub and messages, so the request goes out byte-for-byte as the client
sent it (only the model name and the guard's own requested outputs change).
"""
from __future__ import annotations

from collections.abc import Container

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from semguard.service.errors import ServiceError


class Upstream:
    def __init__(self, target: str, model_name: str | None, max_message_bytes: int):
        self.target, self.model_name = target, model_name
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def infer(self, request: pb.ModelInferRequest, guard_outputs: Container[str],
              timeout: float | None) -> pb.ModelInferResponse:
        """The upstream's answer, outputs raw; the guard's own output names are not asked of it."""
        forward = pb.ModelInferRequest()
        forward.CopyFrom(request)
        if self.model_name:
            forward.model_name, forward.model_version = self.model_name, ""
        del forward.outputs[:]
        forward.outputs.extend(o for o in request.outputs if o.name not in guard_outputs)
        try:
            response = self._stub.ModelInfer(forward, timeout=timeout)
        except grpc.RpcError as exc:
            raise ServiceError(exc.code(), f"upstream {self.target}: {exc.details()}") from None
        if response.outputs and len(response.raw_output_contents) != len(response.outputs):
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               f"upstream {self.target} answered with typed contents; semguard needs raw outputs")
        return response

    def close(self) -> None:
        self._channel.close()
