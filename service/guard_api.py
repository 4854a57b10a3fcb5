"""semguard.v1.Guard servicer: InspectRequest -> images -> Guard verdicts -> InspectResponse."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from semguard.detector.errors import InputError
from semguard.service import decode
from semguard.service.config import ServiceConfig
from semguard.service.engine import GuardEngine
from semguard.service.generated import guard_pb2 as pb
from semguard.service.generated import guard_pb2_grpc as pb_grpc
from semguard.service.query_defence import QueryVerdict


def declared_images(request: pb.InspectRequest) -> int:
    """The image count a request declares, read before anything is decoded."""
    kind = request.WhichOneof("images")
    if kind == "encoded":
        return len(request.encoded.images)
    return max(int(request.tensor.shape[0]), 0) if kind == "tensor" and len(request.tensor.shape) else 0


def request_images(request: pb.InspectRequest, input_shape: Sequence[int], max_pixels: int,
                   max_request_pixels: int | None = None) -> np.ndarray:
    """InspectRequest -> images (B, C, H, W) float32 in [0, 1]; InputError on anything malformed,
    OverBudget when its PNG/JPEG headers declare more than `max_request_pixels` in all."""
    kind = request.WhichOneof("images")
    if kind == "encoded":
        return decode.encoded_images(list(request.encoded.images), input_shape, max_pixels, "encoded.images",
                                     max_request_pixels)
    if kind == "tensor":
        t = request.tensor
        if t.layout == pb.Tensor.FP32_NCHW:
            return decode.fp32_nchw(t.data, list(t.shape), input_shape, "tensor")
        if t.layout == pb.Tensor.UINT8_NHWC:
            return decode.uint8_nhwc(t.data, list(t.shape), input_shape, "tensor")
        raise InputError(f"tensor.layout must be FP32_NCHW or UINT8_NHWC, got "
                         f"{pb.Tensor.Layout.Name(t.layout) if t.layout in pb.Tensor.Layout.values() else t.layout}")
    raise InputError("InspectRequest: set `encoded` (PNG/JPEG files) or `tensor` (raw pixels)")


def verdict_message(v: Any, labels: Sequence[str], layers: Sequence[str], threshold: float,
                    query: QueryVerdict | None = None) -> pb.Verdict:
    return pb.Verdict(
        query=None if query is None else pb.QueryVerdict(matched=query.matched, overlap=query.overlap,
                                                         client_matches=query.client_matches,
                                                         suspected=query.suspected, flagged=query.flagged),
        prediction=int(v.prediction), label=v.label,
        top5=[pb.ClassProbability(class_index=int(c), label=labels[int(c)], probability=float(p)) for c, p in v.top5],
        signature=[pb.LayerValue(layer=name, value=float(x)) for name, x in zip(layers, np.asarray(v.signature))],
        score=float(v.score), threshold=float(threshold), flagged=bool(v.flagged),
        disagreeing_layers=list(v.disagreeing_layers))


class GuardServicer(pb_grpc.GuardServicer):
    def __init__(self, engine: GuardEngine, config: ServiceConfig):
        self.engine, self.config = engine, config

    def Inspect(self, request, context):
        info = self.engine.info
        self.engine.admit(declared_images(request), "Inspect")
        images = self.engine.decode(request_images, request, self.engine.input_shape, self.config.max_image_pixels,
                                    self.config.max_request_pixels)
        query = self.engine.check_queries(images, context)
        verdicts = self.engine.inspect(images, context)
        return pb.InspectResponse(request_id=request.request_id, verdicts=[
            verdict_message(v, info.labels, info.layers, info.threshold, q)
            for v, q in zip(verdicts, query or [None] * len(verdicts))])

    def InspectStream(self, request_iterator, context) -> Iterator[pb.InspectResponse]:
        for request in request_iterator:
            yield self.Inspect(request, context)

    def GetInfo(self, request, context):
        info = self.engine.info
        return pb.GuardInfo(model_name=info.model_name, labels=list(info.labels), layers=list(info.layers),
                            input_shape=list(self.engine.input_shape), threshold=float(info.threshold),
                            flagger_method=info.flagger_method, max_batch_size=self.config.max_batch_size,
                            policy=self.config.policy, query_defence=self.config.query.mode)
