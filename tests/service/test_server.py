"""The real server on loopback, called by real peers: tritonclient.grpc, the generated guard stubs,
grpc_health and grpc_reflection clients."""
from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from semguard.service.generated import guard_pb2, guard_pb2_grpc
from tests.service.tls import write_certificates


def triton_infer(port: int, name: str, array: np.ndarray, datatype: str, outputs=None, model="tinycnn"):
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = triton.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        req = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
        return client.infer(model, [inp], outputs=req, request_id="r1")
    finally:
        client.close()


def png(image_chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image_chw.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def expected(guard, images: np.ndarray):
    return guard.inspect(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))


def test_tritonclient_fp32_gets_prediction_and_guard_outputs(server, guard, clean_images, flagged_images):
    images = np.concatenate([clean_images, flagged_images])
    result = triton_infer(server.port, "IMAGE", images, "FP32")
    want = expected(guard, images)
    np.testing.assert_array_equal(result.as_numpy("PREDICTION"), [v.prediction for v in want])
    np.testing.assert_allclose(result.as_numpy("LOGITS"), np.stack([v.logits for v in want]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES").sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("SCORE"), [v.score for v in want], rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("FLAG"), [v.flagged for v in want])
    assert result.as_numpy("FLAG").tolist() == [False] * len(clean_images) + [True] * len(flagged_images)
    np.testing.assert_allclose(result.as_numpy("SIGNATURE"), np.stack([v.signature for v in want]), rtol=1e-5)
    assert [b.decode() for b in result.as_numpy("LABEL")] == [v.label for v in want]
    assert result.get_response().id == "r1"


def test_tritonclient_uint8_nhwc_and_png_bytes(server, guard, clean_images):
    u8 = (clean_images * 255).round().astype(np.uint8)              # (B, C, H, W)
    want = expected(guard, u8.astype(np.float32) / 255)
    res = triton_infer(server.port, "IMAGE", np.ascontiguousarray(u8.transpose(0, 2, 3, 1)), "UINT8",
                       outputs=["SCORE", "PREDICTION"])
    assert [o.name for o in res.get_response().outputs] == ["SCORE", "PREDICTION"]  # requested order
    np.testing.assert_array_equal(res.as_numpy("PREDICTION"), [v.prediction for v in want])
    files = np.array([png(x) for x in u8.astype(np.float32) / 255], dtype=np.object_)
    res = triton_infer(server.port, "IMAGE", files, "BYTES")
    np.testing.assert_array_equal(res.as_numpy("PREDICTION"), [v.prediction for v in want])
    np.testing.assert_allclose(res.as_numpy("SCORE"), [v.score for v in want], rtol=1e-6)


def test_typed_contents_are_accepted(channel, guard, clean_images):
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    req = oip_pb.ModelInferRequest(model_name="tinycnn")
    t = req.inputs.add(name="IMAGE", datatype="FP32", shape=list(clean_images.shape))
    t.contents.fp32_contents.extend(clean_images.ravel().tolist())
    res = stub.ModelInfer(req, timeout=10)
    pred = np.frombuffer(res.raw_output_contents[[o.name for o in res.outputs].index("PREDICTION")], "<i8")
    np.testing.assert_array_equal(pred, [v.prediction for v in expected(guard, clean_images)])


def test_tritonclient_metadata_and_readiness(server, guard):
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tinycnn") and not client.is_model_ready("other")
        meta = client.get_model_metadata("tinycnn")
        assert meta.inputs[0].shape == [-1, *guard.info.input_shape]
        assert [o.name for o in meta.outputs] == ["LOGITS", "PROBABILITIES", "PREDICTION", "LABEL",
                                                  "SCORE", "FLAG", "SIGNATURE"]
        assert client.get_server_metadata().name == "semguard"
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_metadata("resnet")
        with pytest.raises(InferenceServerException, match="UNIMPLEMENTED|not implemented"):
            client.get_model_repository_index()
    finally:
        client.close()


def test_guard_stubs_inspect_stream_and_info(channel, guard, clean_images, flagged_images):
    stub = guard_pb2_grpc.GuardStub(channel)
    info = stub.GetInfo(guard_pb2.GetInfoRequest(), timeout=10)
    assert list(info.layers) == guard.info.layers and info.threshold == guard.info.threshold
    assert list(info.input_shape) == list(guard.info.input_shape)
    images = np.concatenate([clean_images, flagged_images])
    tensor = guard_pb2.Tensor(layout=guard_pb2.Tensor.FP32_NCHW, shape=images.shape, data=images.tobytes())
    res = stub.Inspect(guard_pb2.InspectRequest(request_id="x", tensor=tensor), timeout=10)
    want = expected(guard, images)
    assert res.request_id == "x" and len(res.verdicts) == len(images)
    for got, w in zip(res.verdicts, want):
        assert (got.prediction, got.label, got.flagged) == (w.prediction, w.label, w.flagged)
        assert [p.class_index for p in got.top5] == [c for c, _ in w.top5]
        assert [s.layer for s in got.signature] == guard.info.layers
        np.testing.assert_allclose([s.value for s in got.signature], w.signature, rtol=1e-6)
        assert got.threshold == guard.info.threshold and list(got.disagreeing_layers) == w.disagreeing_layers
    requests = [guard_pb2.InspectRequest(request_id=str(i), encoded=guard_pb2.EncodedImages(images=[png(x)]))
                for i, x in enumerate(images)]
    answers = list(stub.InspectStream(iter(requests), timeout=20))
    assert [a.request_id for a in answers] == [str(i) for i in range(len(images))]
    assert [a.verdicts[0].flagged for a in answers] == [w.flagged for w in want]


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "inference.GRPCInferenceService", "semguard.v1.Guard"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "semguard.v1.Guard", "grpc.health.v1.Health"} <= names
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="semguard.v1.Guard")]), timeout=5))
    assert reply.file_descriptor_response.file_descriptor_proto


def test_block_policy_error_and_refuse(make_server, guard, clean_images, flagged_images):
    blocking = make_server(policy="block", block_action="error")
    triton_infer(blocking.port, "IMAGE", clean_images, "FP32")  # clean passes
    with pytest.raises(InferenceServerException, match="blocked by policy"):
        triton_infer(blocking.port, "IMAGE", np.concatenate([clean_images[:1], flagged_images]), "FP32")
    refusing = make_server(policy="block", block_action="refuse")
    res = triton_infer(refusing.port, "IMAGE", np.concatenate([clean_images[:1], flagged_images]), "FP32")
    pred = res.as_numpy("PREDICTION")
    assert pred[0] == expected(guard, clean_images[:1])[0].prediction and (pred[1:] == -1).all()
    assert res.as_numpy("FLAG").tolist() == [False] + [True] * len(flagged_images)


def test_upstream_forwarding_appends_guard_outputs(make_server, guard, clean_images, flagged_images):
    # The upstream is itself an OIP server (a second semguard serving model "classifier"): its own
    # SCORE, FLAG, SIGNATURE would shadow the guard's, hence the prefix (test_upstream.py: without it).
    upstream = make_server(model_name="classifier", metrics_port=None)
    front = make_server(upstream=f"127.0.0.1:{upstream.port}", upstream_model="classifier",
                        policy="block", block_action="error", output_prefix="SEMGUARD_")
    # served under the upstream's name, as its clients know it
    res = triton_infer(front.port, "IMAGE", clean_images, "FP32", outputs=["PREDICTION", "SEMGUARD_SCORE"],
                       model="classifier")
    assert [o.name for o in res.get_response().outputs] == ["PREDICTION", "SEMGUARD_SCORE"]
    np.testing.assert_array_equal(res.as_numpy("PREDICTION"), [v.prediction for v in expected(guard, clean_images)])
    res = triton_infer(front.port, "IMAGE", clean_images, "FP32", model="classifier")  # all upstream's + guard's
    names = [o.name for o in res.get_response().outputs]
    assert names[-3:] == ["SEMGUARD_SCORE", "SEMGUARD_FLAG", "SEMGUARD_SIGNATURE"] and "LOGITS" in names
    assert len(set(names)) == len(names) and "FLAG" in names
    with pytest.raises(InferenceServerException, match="blocked by policy"):
        triton_infer(front.port, "IMAGE", flagged_images, "FP32", model="classifier")


def test_tls_and_mtls(make_server, tmp_path, clean_images):
    paths = write_certificates(tmp_path)
    tls = make_server(tls_cert=str(paths.server_cert), tls_key=str(paths.server_key))
    client = triton.InferenceServerClient(f"localhost:{tls.port}", ssl=True,
                                          root_certificates=str(paths.ca_cert))
    assert client.is_server_ready()
    client.close()
    mtls = make_server(tls_cert=str(paths.server_cert), tls_key=str(paths.server_key),
                       tls_client_ca=str(paths.ca_cert))
    anonymous = triton.InferenceServerClient(f"localhost:{mtls.port}", ssl=True, root_certificates=str(paths.ca_cert))
    with pytest.raises(InferenceServerException):
        anonymous.is_server_ready(client_timeout=5)
    anonymous.close()
    client = triton.InferenceServerClient(f"localhost:{mtls.port}", ssl=True, root_certificates=str(paths.ca_cert),
                                          private_key=str(paths.client_key), certificate_chain=str(paths.client_cert))
    inp = triton.InferInput("IMAGE", list(clean_images.shape), "FP32")
    inp.set_data_from_numpy(clean_images)
    assert client.infer("tinycnn", [inp]).as_numpy("FLAG").shape == (len(clean_images),)
    client.close()


def test_graceful_shutdown_finishes_in_flight_requests(make_server, guard, clean_images):
    """Requests already running when stop(grace) is called all complete; new ones are refused."""
    entered, release = threading.Event(), threading.Event()

    class SlowGuard:
        info = guard.info

        def inspect(self, images):
            entered.set()
            release.wait(10)
            return guard.inspect(images)

    created = make_server(SlowGuard(), max_queue_delay_ms=50.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{created.port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    results, errors = [], []

    def call():
        try:
            results.append(triton_infer(created.port, "IMAGE", clean_images[:1], "FP32").as_numpy("FLAG"))
        except Exception as exc:  # recorded, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    assert entered.wait(10)
    time.sleep(0.2)  # let every client's request reach the server's queue
    done = created.server.stop(grace=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    channel.close()
    with pytest.raises(InferenceServerException):
        triton_infer(created.port, "IMAGE", clean_images[:1], "FP32")  # refused: shutting down
    release.set()
    for t in threads:
        t.join(20)
    assert done.wait(20)
    assert errors == [] and len(results) == 6


def test_deadline_exceeded_while_queued(make_server, guard, clean_images):
    """A request whose deadline passes in the queue gets DEADLINE_EXCEEDED and costs no forward pass."""
    release, entered = threading.Event(), threading.Event()
    calls = []

    class StuckGuard:
        info = guard.info

        def inspect(self, images):
            calls.append(len(images))
            entered.set()
            release.wait(10)
            return guard.inspect(images)

    created = make_server(StuckGuard(), max_batch_size=1)
    first = threading.Thread(target=triton_infer, args=(created.port, "IMAGE", clean_images[:1], "FP32"))
    first.start()
    assert entered.wait(10)  # the worker is busy with the first request
    client = triton.InferenceServerClient(f"127.0.0.1:{created.port}")
    inp = triton.InferInput("IMAGE", [1, *guard.info.input_shape], "FP32")
    inp.set_data_from_numpy(clean_images[:1])
    try:
        with pytest.raises(InferenceServerException, match="Deadline Exceeded|DEADLINE_EXCEEDED"):
            client.infer("tinycnn", [inp], client_timeout=0.5)
    finally:
        release.set()
        first.join(10)
        client.close()
    assert calls == [1]  # the expired request was dropped, never computed


def test_a_busy_metrics_port_at_start_releases_the_server_the_worker_and_the_port(guard):
    import socket

    from semguard.service.config import ServiceConfig
    from semguard.service.errors import StartupError
    from semguard.service.server import create_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServiceConfig(host="127.0.0.1", grpc_port=0, metrics_port=taken.getsockname()[1])
        created = create_server(config, guard)
        with pytest.raises(StartupError, match="--metrics-port"):
            created.server.start()
    assert not created.server.engine.batcher._worker.is_alive()
    with socket.socket() as again:  # the gRPC port is free again
        again.bind(("127.0.0.1", created.port))
