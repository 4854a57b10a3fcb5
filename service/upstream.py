"""Forward requests to an existing Open Inference Protocol server (Triton, KServe...) and follow it.

Uses tritonclient's own stub and messages, so the request goes out byte-for-byte as the client
sent it (only the model name of an alias and the guard's own requested outputs change). Answers
come back raw whatever encoding the upstream chose: typed `contents` are converted exactly
(`raw_outputs`).

An upstream output named like one of the guard's would shadow the verdict in clients that look
outputs up by name (tritonclient's `as_numpy` returns the first). The model's outputs are read
from its metadata on every poll that finds the upstream ready (so after each reconnect and each
change of the model), and from every answer and forwarded metadata; a clash makes the upstream
unusable (the guard not ready, requests UNAVAILABLE) until the model's outputs change. Nothing
found about the upstream ever stops the guard: it is reported, once, and the guard waits.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

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


def clash_message(upstream_outputs: Iterable[str], guard_outputs: Collection[str], where: str) -> str | None:
    """Why the upstream's outputs cannot be served beside the guard's, or None when no name clashes."""
    clash = sorted(set(upstream_outputs) & set(guard_outputs))
    if not clash:
        return None
    return (f"{where} has output(s) {', '.join(clash)} named like the guard's; rename the guard's with "
            f"--output-prefix (e.g. --output-prefix SEMGUARD_)")


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
    """One upstream model, `model_name` at `target`; clients may know it under other names (aliases).

    `poll` (the watcher's job) decides whether it is usable: ServerReady true, the model's metadata
    readable, no output named like one of `guard_outputs`. on_change(usable) is called on each change,
    on_clash(message) once per clash found, on_call(seconds, code) after each forwarded ModelInfer.
    credentials: TLS (with a client certificate: mTLS) to the upstream; None = plaintext.
    """

    def __init__(self, target: str, model_name: str, max_message_bytes: int, guard_outputs: Collection[str],
                 timeout: float, on_call: Callable[[float, str], None] | None = None,
                 on_clash: Callable[[str], None] | None = None, credentials: grpc.ChannelCredentials | None = None):
        self.target, self.model_name, self.on_call = target, model_name, on_call
        self.guard_outputs, self.timeout, self.on_clash = frozenset(guard_outputs), timeout, on_clash
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   # reconnect backoff grows to 120 s by default: a restarted upstream would stay
                   # "not ready" for minutes
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        self._channel = (grpc.insecure_channel(target, options=options) if credentials is None
                         else grpc.secure_channel(target, credentials, options=options))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._lock = threading.Lock()
        self._up = False                      # ServerReady true and the model's metadata read
        self._metadata_outputs: frozenset[str] = frozenset()  # the model's outputs, as its metadata last said
        self._outputs: frozenset[str] = frozenset()  # those and any seen in answers since
        self._clash: str | None = None        # outputs named like the guard's (kept while the upstream is away)
        self._missing: str | None = None      # it answers, but has no metadata for the model
        self._reported_clash: str | None = None
        self._reported_missing: str | None = None
        self._on_change: Callable[[bool], None] = lambda usable: None
        self._usable: bool | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def deadline(self, client_remaining: float | None) -> float:
        """Seconds the upstream gets: the client's deadline when it set one, else --upstream-timeout."""
        return self.timeout if client_remaining is None else client_remaining

    def poll(self, timeout: float) -> bool:
        """Look at the upstream once (ServerReady, then the model's metadata); True if it is usable."""
        try:
            ready = self._stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout).ready
            meta = self._stub.ModelMetadata(pb.ModelMetadataRequest(name=self.model_name),
                                            timeout=timeout) if ready else None
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return self._update(up=False)
            # it answers, but not about this model (not loaded yet, or a wrong --upstream-model)
            return self._update(up=False, missing=f"upstream {self.target} gives no metadata for model "
                                f"{self.model_name!r} (--upstream-model): {exc.code().name} {exc.details()}")
        if meta is None:
            return self._update(up=False)
        return self._update(up=True, metadata_outputs=frozenset(o.name for o in meta.outputs))

    def saw_outputs(self, names: Iterable[str]) -> None:
        """Outputs found in an answer or forwarded metadata: ServiceError UNAVAILABLE if one clashes."""
        names = frozenset(names)
        if names & self.guard_outputs:
            self._update(up=True, answer_outputs=names)  # it answered: it is up
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, self.problem or "upstream output clash")

    def _update(self, up: bool, metadata_outputs: frozenset[str] | None = None,
                answer_outputs: frozenset[str] = frozenset(), missing: str | None = None) -> bool:
        """Record what a poll or an answer found; report changes (log once, count, on_change)."""
        with self._lock:
            if up:
                if metadata_outputs is not None and (not self._up or metadata_outputs != self._metadata_outputs):
                    # a (re)connect or a changed model: its metadata is the truth again
                    self._metadata_outputs = self._outputs = metadata_outputs
                self._outputs |= answer_outputs
                self._clash = clash_message(self._outputs, self.guard_outputs,
                                            f"upstream model {self.model_name!r} at {self.target}")
            # while it is away a clash stays known (nothing fixed it): said once, not again on its return
            self._up, self._missing = up, missing
            new_clash = self._clash is not None and self._clash != self._reported_clash
            new_missing = missing is not None and missing != self._reported_missing
            self._reported_clash = self._clash
            if missing is not None or up:  # a model that went missing again is said again
                self._reported_missing = missing
            usable = up and self._clash is None
            changed, self._usable = usable != self._usable, usable
            if changed:  # under the lock: a poll and an answer must not report out of order
                self._on_change(usable)
        if new_clash:
            log.error("%s; the guard is NOT ready and answers UNAVAILABLE until that changes", self._clash)
            if self.on_clash is not None:
                self.on_clash(self._clash)
        if new_missing:
            log.error("%s; the guard is NOT ready until it has that model", missing)
        if changed and not (new_clash or new_missing):
            log.log(logging.INFO if usable else logging.WARNING, "upstream %s is %s", self.target,
                    "ready" if usable else "NOT ready: the guard reports not ready")
        return usable

    @property
    def problem(self) -> str | None:
        """Why the upstream cannot be used although it may answer: an output clash, no such model."""
        return self._clash or self._missing

    def check_usable(self) -> None:
        """ServiceError UNAVAILABLE while a problem is known: such requests are never forwarded."""
        problem = self.problem
        if problem is not None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, problem)

    def _call(self, method: Callable[..., Any], request: Any, client_remaining: float | None) -> Any:
        try:
            return method(request, timeout=self.deadline(client_remaining))
        except grpc.RpcError as exc:
            raise ServiceError(exc.code(), f"upstream {self.target}: {exc.details()}") from None

    def metadata(self, version: str, client_remaining: float | None) -> pb.ModelMetadataResponse:
        """The model's metadata as the upstream gives it now (checked for clashes)."""
        meta = self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=self.model_name, version=version),
                          client_remaining)
        self.saw_outputs(o.name for o in meta.outputs)
        return meta

    def model_ready(self, version: str, client_remaining: float | None) -> bool:
        try:
            return self._call(self._stub.ModelReady, pb.ModelReadyRequest(name=self.model_name, version=version),
                              client_remaining).ready
        except ServiceError:
            return False

    def infer_future(self, request: pb.ModelInferRequest,
                     client_remaining: float | None) -> Callable[[], pb.ModelInferResponse]:
        """Send now (as the model's own name, the version as asked, without the guard's outputs); the
        returned function waits for the upstream's answer (raw, checked for clashes)."""
        forward = pb.ModelInferRequest()
        forward.CopyFrom(request)
        forward.model_name = self.model_name
        del forward.outputs[:]
        forward.outputs.extend(o for o in request.outputs if o.name not in self.guard_outputs)
        start = time.perf_counter()
        call = self._stub.ModelInfer.future(forward, timeout=self.deadline(client_remaining))

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
            self.saw_outputs(o.name for o in response.outputs)
            return raw_outputs(response, f"upstream {self.target}")
        result.cancel = call.cancel  # type: ignore[attr-defined]
        return result

    def _observe(self, start: float, code: str) -> None:
        if self.on_call is not None:
            self.on_call(time.perf_counter() - start, code)

    def watch(self, interval: float, on_change: Callable[[bool], None]) -> None:
        """Poll every `interval` s: on_change(usable) after the first poll (here, synchronously; it
        lasts at most the poll timeout), then on each change."""
        self._on_change = on_change
        timeout = min(max(interval, 0.1), self.timeout)
        self.poll(timeout)

        def loop() -> None:
            while not self._watch_stop.wait(interval):
                self.poll(timeout)
        self._watcher = threading.Thread(target=loop, name="semguard-upstream-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(2 * self.timeout + 1)  # a poll may be waiting for its two calls
        self._channel.close()
