"""Forward a ModelInfer request to an existing Open Inference Protocol server (Triton, KServe...).

Uses tritonclient's own stub and messages, so the request goes out byte-for-byte as the client
sent it (only the model name and the guard's own requested outputs change). Answers come back
raw whatever encoding the upstream chose: typed `contents` are converted exactly (`raw_outputs`).
An upstream output named like one of the guard's would shadow the verdict in clients that look
outputs up by name (tritonclient's `as_numpy` returns the first), so it is refused, at start-up
(`check_no_clash` on the model metadata) and on every answer.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Container, Iterable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from semguard.service import decode
from semguard.service.errors import ServiceError

log = logging.getLogger(__name__)

# OIP datatype -> (typed contents field, little-endian numpy dtype of its raw bytes). KServe v2 and
# Triton have no typed field for FP16 (nor BF16): such outputs can only travel raw.
TYPED_FIELDS = {
    "BOOL": ("bool_contents", "?"),
    "INT8": ("int_contents", "<i1"), "INT16": ("int_contents", "<i2"), "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "UINT8": ("uint_contents", "<u1"), "UINT16": ("uint_contents", "<u2"), "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8"),
    "BYTES": ("bytes_contents", None),
}


class UpstreamClash(RuntimeError):
    """The upstream has outputs named like the guard's: an INTERNAL error, never a shadowed verdict."""


def check_no_clash(upstream_outputs: Iterable[str], guard_outputs: Collection[str], where: str) -> None:
    clash = sorted(set(upstream_outputs) & set(guard_outputs))
    if clash:
        raise UpstreamClash(f"{where} has output(s) {', '.join(clash)} named like the guard's; "
                            f"rename the guard's with --output-prefix (e.g. --output-prefix SEMGUARD_)")


def typed_to_raw(output: pb.ModelInferResponse.InferOutputTensor) -> bytes:
    """One output's typed `contents` -> its raw bytes in Triton's layout; ValueError if it cannot be exact."""
    if output.datatype not in TYPED_FIELDS:
        raise ValueError(f"output {output.name!r}: datatype {output.datatype} has no typed contents field in "
                         f"the Open Inference Protocol; it must be sent in raw_output_contents")
    field, dtype = TYPED_FIELDS[output.datatype]
    values = getattr(output.contents, field)
    count = int(np.prod(output.shape, dtype=np.int64))  # prod(()) = 1: a scalar
    if len(values) != count:
        raise ValueError(f"output {output.name!r}: shape {list(output.shape)} holds {count} elements, "
                         f"{field} has {len(values)}")
    if dtype is None:
        return decode.pack_bytes_tensor(list(values))
    if dtype == "?" or dtype[1] == "f" or dtype in ("<i8", "<u8"):  # the field's own type: exact as is
        return np.asarray(values, dtype=dtype).tobytes()
    wide = np.asarray(values, dtype=np.int64)  # int32/uint32 fields carry the 8- and 16-bit types too
    info = np.iinfo(np.dtype(dtype))
    if wide.size and (wide.min() < info.min or wide.max() > info.max):
        raise ValueError(f"output {output.name!r}: {field} value outside the range of {output.datatype}")
    return wide.astype(dtype).tobytes()


def raw_outputs(response: pb.ModelInferResponse, where: str) -> pb.ModelInferResponse:
    """The response with every output in raw_output_contents (converted in place when typed)."""
    if response.raw_output_contents:
        if len(response.raw_output_contents) != len(response.outputs):
            raise ServiceError(grpc.StatusCode.INTERNAL, f"{where} answered {len(response.raw_output_contents)} "
                               f"raw_output_contents for {len(response.outputs)} outputs")
        return response
    try:
        raws = [typed_to_raw(o) for o in response.outputs]
    except ValueError as exc:
        raise ServiceError(grpc.StatusCode.INTERNAL, f"{where}: {exc}") from None
    for out in response.outputs:
        out.ClearField("contents")
    response.raw_output_contents.extend(raws)
    return response


class Upstream:
    def __init__(self, target: str, model_name: str | None, max_message_bytes: int,
                 on_call: Callable[[float, str], None] | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        """on_call(seconds, status code name): called after each forwarded ModelInfer (metrics).
        credentials: TLS (with a client certificate: mTLS) to the upstream; None = plaintext."""
        self.target, self.model_name, self.on_call = target, model_name, on_call
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   # reconnect backoff grows to 120 s by default: a restarted upstream would stay
                   # "not ready" for minutes
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        self._channel = (grpc.insecure_channel(target, options=options) if credentials is None
                         else grpc.secure_channel(target, credentials, options=options))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.outputs_checked = False  # set once the model's outputs were read and found not to clash

    def output_names(self, model_name: str, timeout: float) -> list[str]:
        """The upstream model's output names from its metadata (waits up to `timeout` s for the server)."""
        request = pb.ModelMetadataRequest(name=self.model_name or model_name)
        meta = self._stub.ModelMetadata(request, timeout=timeout, wait_for_ready=True)
        return [o.name for o in meta.outputs]

    def check_outputs(self, model_name: str, guard_outputs: Collection[str], timeout: float) -> None:
        """UpstreamClash if the model's outputs are named like the guard's; grpc.RpcError if unreadable."""
        names = self.output_names(model_name, timeout)
        check_no_clash(names, guard_outputs, f"upstream model {self.model_name or model_name!r} at {self.target}")
        self.outputs_checked = True

    def ready(self, timeout: float) -> bool:
        try:
            return self._stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout).ready
        except grpc.RpcError:
            return False

    def infer_future(self, request: pb.ModelInferRequest, guard_outputs: Container[str],
                     timeout: float | None) -> Callable[[], pb.ModelInferResponse]:
        """Send now; the returned function waits for the upstream's answer (raw, checked for clashes)."""
        forward = pb.ModelInferRequest()
        forward.CopyFrom(request)
        if self.model_name:
            forward.model_name, forward.model_version = self.model_name, ""
        del forward.outputs[:]
        forward.outputs.extend(o for o in request.outputs if o.name not in guard_outputs)
        start = time.perf_counter()
        call = self._stub.ModelInfer.future(forward, timeout=timeout)

        def result() -> pb.ModelInferResponse:
            try:
                response = call.result()
            except grpc.RpcError as exc:
                self._observe(start, exc.code().name)
                raise ServiceError(exc.code(), f"upstream {self.target}: {exc.details()}") from None
            except grpc.FutureCancelledError:
                self._observe(start, "CANCELLED")
                raise
            self._observe(start, "OK")
            check_no_clash((o.name for o in response.outputs), guard_outputs, f"upstream {self.target} answer")
            return raw_outputs(response, f"upstream {self.target}")
        result.cancel = call.cancel  # type: ignore[attr-defined]
        return result

    def _observe(self, start: float, code: str) -> None:
        if self.on_call is not None:
            self.on_call(time.perf_counter() - start, code)

    def infer(self, request: pb.ModelInferRequest, guard_outputs: Container[str],
              timeout: float | None) -> pb.ModelInferResponse:
        """The upstream's answer, outputs raw; the guard's own output names are not asked of it."""
        return self.infer_future(request, guard_outputs, timeout)()

    def watch(self, interval: float, on_change: Callable[[bool], None]) -> None:
        """Poll ServerReady every `interval` s: on_change(up) now (synchronously), then on each change."""
        up = self.ready(timeout=max(interval, 0.1))
        on_change(up)

        def loop() -> None:
            nonlocal up
            while not self._watch_stop.wait(interval):
                now = self.ready(timeout=max(interval, 0.1))
                if now != up:
                    up = now
                    log.log(logging.INFO if up else logging.WARNING, "upstream %s is %s", self.target,
                            "ready again" if up else "NOT ready: the guard reports not ready")
                    on_change(up)
                elif up and not self.outputs_checked:  # ready, but its outputs could not be checked yet
                    on_change(up)
        self._watcher = threading.Thread(target=loop, name="semguard-upstream-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(15)  # a poll may be inside check_outputs (up to UPSTREAM_START_TIMEOUT, 10 s)
        self._channel.close()
