"""Open Inference Protocol v2 servicer (`inference.GRPCInferenceService`), as tritonclient speaks it.

Messages and the servicer base are tritonclient's own (see proto/README.md), so RPCs of Triton's
superset that are not overridden here answer UNIMPLEMENTED. Every output is returned in
`raw_output_contents`, one entry per output in the order of `outputs`, because that is the only
place tritonclient reads them.

Input: exactly one tensor, any name; its datatype picks the layout:
  FP32 [B, C, H, W] in [0, 1] | UINT8 [B, H, W, C] | BYTES [B] (or [B, 1]) of PNG/JPEG files.
Outputs: LOGITS FP32 [B, K], PROBABILITIES FP32 [B, K], PREDICTION INT64 [B], LABEL BYTES [B],
  SCORE FP32 [B], FLAG BOOL [B], SIGNATURE FP32 [B, L], and with --query-defence on QUERY_FLAG
  BOOL [B] (the image is a near-duplicate of this client's recent queries and the client is
  suspected of a query attack); the guard's outputs renamed with `output_prefix`
  (SEMGUARD_ -> SEMGUARD_SCORE...), so that an upstream's cannot shadow them.
With an upstream (--upstream) the guard is the upstream's model as its clients know it: served
under that model's name (and --model-name as an alias), any version forwarded as asked; metadata
and answers are the upstream's, with the guard's outputs added. The request is forwarded
while the guard inspects, except under --policy block, where the verdict decides whether it is
forwarded at all (see `ModelInfer`). Ready only while the upstream is usable (service/upstream.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from semguard.detector.errors import InputError
from semguard.service import decode
from semguard.service.config import ServiceConfig
from semguard.service.engine import GuardEngine, time_remaining
from semguard.service.errors import ServiceError
from semguard.service.upstream import Upstream

VERSION = "1"
GUARD_OUTPUTS = ("SCORE", "FLAG", "SIGNATURE")  # what the guard adds to an upstream's answer
QUERY_OUTPUTS = ("QUERY_FLAG",)  # ...and with --query-defence on
DATATYPES = {"LOGITS": "FP32", "PROBABILITIES": "FP32", "PREDICTION": "INT64", "LABEL": "BYTES",
             "SCORE": "FP32", "FLAG": "BOOL", "SIGNATURE": "FP32", "QUERY_FLAG": "BOOL"}
NUMPY = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}


def guard_outputs(config: ServiceConfig) -> tuple[str, ...]:
    """The guard's own outputs under this config (unprefixed)."""
    return GUARD_OUTPUTS + (QUERY_OUTPUTS if config.query.mode != "off" else ())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, K), shifted by the row max for stability."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def verdict_outputs(verdicts: Sequence[Any], refused: np.ndarray) -> dict[str, np.ndarray | list[bytes]]:
    """Verdicts -> output arrays; `refused` (B,) bool images get blank classifier outputs."""
    logits = np.stack([np.asarray(v.logits, dtype=np.float32) for v in verdicts])  # (B, K)
    probs = softmax(logits.astype(np.float64)).astype(np.float32)
    pred = np.array([v.prediction for v in verdicts], dtype=np.int64)
    labels = [v.label.encode() for v in verdicts]
    if refused.any():
        logits[refused], probs[refused], pred[refused] = 0.0, 0.0, -1
        labels = [b"" if r else lab for lab, r in zip(labels, refused)]
    return {"LOGITS": logits, "PROBABILITIES": probs, "PREDICTION": pred, "LABEL": labels,
            "SCORE": np.array([v.score for v in verdicts], dtype=np.float32),
            "FLAG": np.array([v.flagged for v in verdicts], dtype=bool),
            "SIGNATURE": np.stack([np.asarray(v.signature, dtype=np.float32) for v in verdicts])}


def declared_images(request: pb.ModelInferRequest) -> int:
    """The image count a request declares (its tensor's batch dimension), read before anything is decoded."""
    shape = request.inputs[0].shape if len(request.inputs) == 1 else ()
    return max(int(shape[0]), 0) if len(shape) else 0


def decode_infer_inputs(request: pb.ModelInferRequest, input_shape: Sequence[int], max_pixels: int,
                        max_request_pixels: int | None = None) -> np.ndarray:
    """ModelInferRequest -> images (B, C, H, W) float32 in [0, 1]; InputError on anything malformed,
    OverBudget when its PNG/JPEG headers declare more than `max_request_pixels` in all."""
    if len(request.inputs) != 1:
        raise InputError(f"ModelInfer: expected exactly 1 input tensor (the images), got {len(request.inputs)}")
    tensor, raw = request.inputs[0], request.raw_input_contents
    what = f"input '{tensor.name}'"
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"ModelInfer: {len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if raw and tensor.HasField("contents"):
        raise InputError(f"{what}: give raw_input_contents or typed contents, not both")
    shape = list(tensor.shape)
    if tensor.datatype == "FP32":
        return decode.fp32_nchw(raw[0] if raw else np.asarray(tensor.contents.fp32_contents, np.float32),
                                shape, input_shape, what)
    if tensor.datatype == "UINT8":
        return decode.uint8_nhwc(raw[0] if raw else np.asarray(tensor.contents.uint_contents, np.int64),
                                 shape, input_shape, what)
    if tensor.datatype == "BYTES":
        items = decode.split_bytes_tensor(raw[0], what) if raw else list(tensor.contents.bytes_contents)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or any(s < 0 for s in shape):
            raise InputError(f"{what}: BYTES shape must be [batch] or [batch, 1], got {shape}")
        if shape[0] != len(items):
            raise InputError(f"{what}: shape {shape} declares {shape[0]} images, contents hold {len(items)}")
        return decode.encoded_images(items, input_shape, max_pixels, what, max_request_pixels)
    raise InputError(f"{what}: datatype must be one of FP32 (NCHW), UINT8 (NHWC), BYTES (PNG/JPEG), "
                     f"got {tensor.datatype!r}")


def add_output(response: pb.ModelInferResponse, name: str, value: np.ndarray | list[bytes],
               as_name: str | None = None) -> None:
    """Append output `name` (renamed `as_name`), raw, in tritonclient's layout."""
    datatype = DATATYPES[name]
    out = response.outputs.add(name=as_name or name, datatype=datatype)
    if datatype == "BYTES":
        out.shape.extend([len(value)])
        response.raw_output_contents.append(decode.pack_bytes_tensor(value))
    else:
        out.shape.extend(value.shape)
        response.raw_output_contents.append(np.ascontiguousarray(value, dtype=NUMPY[datatype]).tobytes())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: GuardEngine, config: ServiceConfig, upstream: Upstream | None = None):
        self.engine, self.config, self.upstream = engine, config, upstream
        self.model_name = config.model_name or engine.info.model_name
        # the names clients may ask for: the guard's model, or the upstream's and --model-name as an alias
        aliases = [config.model_name] if config.model_name else []
        self.names = tuple(dict.fromkeys([upstream.model_name, *aliases])) if upstream else (self.model_name,)
        # output name as the client sees it -> the guard's own name
        ours = guard_outputs(config)
        self.public = {n: config.output_prefix + n if n in ours else n for n in DATATYPES
                       if n in ours or n not in QUERY_OUTPUTS}
        self.guard_outputs = frozenset(self.public[n] for n in ours)
        self.serving = True  # cleared by the server at shutdown
        self.upstream_up = upstream is None  # set by the server's upstream watcher

    @property
    def ready(self) -> bool:
        return self.serving and self.upstream_up

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request, context):
        # A readiness probe for another name is an answer ("not ready"), not an error.
        if request.name not in self.names or not self.ready:
            return pb.ModelReadyResponse(ready=False)
        if self.upstream is None:
            return pb.ModelReadyResponse(ready=request.version in ("", VERSION))
        return pb.ModelReadyResponse(ready=self.upstream.model_ready(request.version, time_remaining(context)))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="semguard", version=_version(), extensions=[])

    def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        if self.upstream is not None:
            self.upstream.check_usable()
            meta = self.upstream.metadata(request.version, time_remaining(context))
            meta.name = request.name
            meta.outputs.extend(self._tensors(guard_outputs(self.config)))
            return meta
        c, h, w = self.engine.input_shape
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model_name, versions=[VERSION], platform="semguard",
            inputs=[T(name="IMAGE", datatype="FP32", shape=[-1, c, h, w])],
            outputs=self._tensors([n for n in DATATYPES if n in self.public]))

    def _tensors(self, names: Sequence[str]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        """Metadata of the guard's outputs `names` (own names), as clients see them."""
        k, n_layers = len(self.engine.info.labels), len(self.engine.info.layers)
        shapes = {"LOGITS": [-1, k], "PROBABILITIES": [-1, k], "SIGNATURE": [-1, n_layers]}
        return [pb.ModelMetadataResponse.TensorMetadata(name=self.public[n], datatype=DATATYPES[n],
                                                        shape=shapes.get(n, [-1])) for n in names]

    def ModelInfer(self, request, context):
        self._check_model(request.model_name, request.model_version)
        if self.upstream is not None:
            self.upstream.check_usable()  # a known clash is refused, never forwarded
        wanted = self._requested(request)
        self.engine.admit(declared_images(request), "ModelInfer")
        images = self.engine.decode(decode_infer_inputs, request, self.engine.input_shape,
                                    self.config.max_image_pixels, self.config.max_request_pixels)
        query = self.engine.check_queries(images, context)  # before the upstream sees a refused query
        # Overlap the upstream's pass with the guard's, except under --policy block: there the
        # verdict decides whether the upstream may see the request at all. Forwarding speculatively
        # and dropping the answer would hand flagged (adversarial) images to the upstream model,
        # which is what block exists to prevent (probing, model extraction, side effects, cost), so
        # block pays inspect + upstream latency in series; annotate pays about the longer of the two.
        pending = None
        if self.upstream is not None and self.config.policy != "block":
            pending = self.upstream.infer_future(request, time_remaining(context))
        try:
            verdicts = self.engine.inspect(images, context)
            refused = self._apply_policy(verdicts)
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise
        outputs = verdict_outputs(verdicts, refused)
        outputs["QUERY_FLAG"] = np.array([bool(q.flagged) for q in query] if query else [False] * len(verdicts))
        if self.upstream is not None:
            if pending is None:
                pending = self.upstream.infer_future(request, time_remaining(context))
            response = pending()  # the version as the upstream answered
        else:
            response = pb.ModelInferResponse(model_version=VERSION)
        response.model_name, response.id = request.model_name, request.id  # the name asked: an alias stays one
        for name in wanted:
            add_output(response, name, outputs[name], self.public[name])
        return response

    def _requested(self, request: pb.ModelInferRequest) -> list[str]:
        """The guard's own (unprefixed) names of the outputs it must add, in the order asked."""
        names = [o.name for o in request.outputs]
        private = {public: name for name, public in self.public.items()}
        if self.upstream is not None:  # the rest is the upstream's to answer
            return [private[n] for n in names if n in self.guard_outputs] if names else guard_outputs(self.config)
        unknown = [n for n in names if n not in private]
        if unknown:
            raise InputError(f"unknown output(s) {unknown}; this model has {list(private)}")
        return [private[n] for n in names] if names else list(self.public)

    def _apply_policy(self, verdicts: Sequence[Any]) -> np.ndarray:
        """Returns (B,) bool: images whose classifier outputs are refused; raises for block+error."""
        flagged = np.array([bool(v.flagged) for v in verdicts])
        if self.config.policy != "block" or not flagged.any():
            return np.zeros(len(verdicts), dtype=bool)
        self.engine.metrics.blocked.inc(int(flagged.sum()))
        if self.config.block_action == "error":
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"blocked by policy: image(s) {np.flatnonzero(flagged).tolist()} flagged as "
                               f"adversarial (score above threshold {self.engine.info.threshold:g})")
        return flagged

    def _check_model(self, name: str, version: str) -> None:
        """NOT_FOUND for another model, or another version of the guard's own (an upstream's are its to judge)."""
        if name not in self.names:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves "
                               f"{' and '.join(map(repr, self.names))}")
        if self.upstream is None and version not in ("", VERSION):
            raise ServiceError(grpc.StatusCode.NOT_FOUND,
                               f"unknown version {version!r} of model {name!r}; available: [{VERSION!r}]")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("semguard")
    except PackageNotFoundError:
        return "0+unknown"
