"""Upstream mode against a hand-written OIP upstream (tests/service/fake_upstream.py): output-name
clashes, typed answers, readiness that follows the upstream, deadlines, and the overlapped passes.
tests/service/test_upstream_kserve.py puts the guard in front of a real third-party server."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import logging
import re
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from semguard.service.upstream import TYPED_FIELDS
from tests.service.fake_upstream import FakeUpstream, raw_answer
from tests.service.test_server import expected, triton_infer


@pytest.fixture
def upstreams():
    started: list[FakeUpstream] = []

    def make(outputs, answer, delay_s=0.0) -> FakeUpstream:
        up = FakeUpstream(outputs, answer, delay_s)
        up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


def score_flag_upstream(upstreams, n: int, **kw) -> FakeUpstream:
    """An upstream whose own outputs are SCORE and FLAG (all flagged, score 0.25)."""
    return upstreams(["SCORE", "FLAG"], raw_answer({"SCORE": ("FP32", np.full(n, 0.25, "<f4")),
                                                    "FLAG": ("BOOL", np.ones(n, bool))}), **kw)


def clashes(front) -> float:
    return front.server.metrics.upstream_clashes._value.get()


def test_a_clash_at_start_up_is_not_ready_and_unavailable_never_an_exit(make_server, upstreams, clean_images,
                                                                         caplog):
    up = score_flag_upstream(upstreams, 4)
    with caplog.at_level(logging.ERROR):
        front = make_server(upstream=f"127.0.0.1:{up.port}", upstream_poll_seconds=0.1)
        time.sleep(0.5)  # five polls
        for _ in range(2):
            with pytest.raises(InferenceServerException) as e:
                triton_infer(front.port, "IMAGE", clean_images, "FP32")
            assert e.value.status() == "StatusCode.UNAVAILABLE"
            assert re.search(r"output\(s\) FLAG, SCORE named like the guard's.*--output-prefix", e.value.message())
    assert _health(front.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert front.server.metrics.upstream_up._value.get() == 0 and up.requests == []  # never forwarded
    assert len([r for r in caplog.records if "named like the guard's" in r.getMessage()]) == 1 and clashes(front) == 1


def test_prefix_keeps_guard_and_upstream_outputs_apart(make_server, upstreams, guard, clean_images):
    up = score_flag_upstream(upstreams, len(clean_images))
    front = make_server(upstream=f"127.0.0.1:{up.port}", output_prefix="SEMGUARD_")
    res = triton_infer(front.port, "IMAGE", clean_images, "FP32")
    assert [o.name for o in res.get_response().outputs] == ["SCORE", "FLAG", "SEMGUARD_SCORE", "SEMGUARD_FLAG",
                                                            "SEMGUARD_SIGNATURE"]
    assert res.as_numpy("FLAG").all() and not res.as_numpy("SEMGUARD_FLAG").any()  # the upstream's; the guard's
    np.testing.assert_array_equal(res.as_numpy("SCORE"), 0.25)
    np.testing.assert_allclose(res.as_numpy("SEMGUARD_SCORE"), [v.score for v in expected(guard, clean_images)],
                               rtol=1e-6)
    assert list(up.requests[-1].outputs) == []  # nothing of the guard's was asked of the upstream
    res = triton_infer(front.port, "IMAGE", clean_images, "FP32", outputs=["FLAG", "SEMGUARD_FLAG"])
    assert [o.name for o in up.requests[-1].outputs] == ["FLAG"]
    assert [o.name for o in res.get_response().outputs][-1:] == ["SEMGUARD_FLAG"]  # (the fake answers all)
    meta = triton.InferenceServerClient(f"127.0.0.1:{front.port}").get_model_metadata("tinycnn")
    assert [o.name for o in meta.outputs][-3:] == ["SEMGUARD_SCORE", "SEMGUARD_FLAG", "SEMGUARD_SIGNATURE"]


def test_a_clash_in_an_answer_is_unavailable_never_internal(make_server, upstreams, clean_images, caplog):
    # metadata says PROB, but the answer (the upstream changed since its metadata was read) has SEMGUARD_FLAG too
    up = upstreams(["PROB"], raw_answer({"PROB": ("FP32", np.zeros(4, "<f4")),
                                         "SEMGUARD_FLAG": ("BOOL", np.zeros(4, bool))}))
    front = make_server(upstream=f"127.0.0.1:{up.port}", output_prefix="SEMGUARD_", upstream_poll_seconds=0.1)
    assert _health(front.port) == health_pb2.HealthCheckResponse.SERVING
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            with pytest.raises(InferenceServerException) as e:
                triton_infer(front.port, "IMAGE", clean_images, "FP32")
            assert e.value.status() == "StatusCode.UNAVAILABLE"
            assert "SEMGUARD_FLAG named like the guard's" in e.value.message() and "--output-prefix" in e.value.message()
        time.sleep(0.5)  # polls: the metadata did not change, so the clash found in the answer stands
    assert len(up.requests) == 1  # the second was refused, not forwarded
    assert _health(front.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert len([r for r in caplog.records if "named like the guard's" in r.getMessage()]) == 1 and clashes(front) == 1
    assert "Traceback" not in caplog.text and not any(
        s.value for m in front.server.metrics.internal_errors.collect() for s in m.samples)
    up.outputs = ["PROB", "OTHER"]  # a changed model: checked again from its metadata
    up.answer = raw_answer({"PROB": ("FP32", np.zeros(4, "<f4"))})
    assert _wait_for(lambda: _health(front.port) == health_pb2.HealthCheckResponse.SERVING)
    triton_infer(front.port, "IMAGE", clean_images, "FP32")


# one case per OIP datatype with a typed field: extremes and awkward values, compared bit for bit
TYPED_CASES = {
    "BOOL": np.array([True, False, True]),
    "INT8": np.array([-128, 0, 127], "<i1"), "INT16": np.array([-32768, 1, 32767], "<i2"),
    "INT32": np.array([-2**31, 1, 2**31 - 1], "<i4"), "INT64": np.array([-2**63, 1, 2**63 - 1], "<i8"),
    "UINT8": np.array([0, 1, 255], "<u1"), "UINT16": np.array([0, 1, 65535], "<u2"),
    "UINT32": np.array([0, 1, 2**32 - 1], "<u4"), "UINT64": np.array([0, 1, 2**64 - 1], "<u8"),
    "FP32": np.array([1 / 3, -0.0, np.finfo(np.float32).tiny / 2, np.inf, np.nan], "<f4"),
    "FP64": np.array([1 / 3, -0.0, 5e-324, -np.inf, 1e308], "<f8"),
    "BYTES": np.array([b"", b"a\x00b", bytes(range(256))], dtype=np.object_),
}


def typed_answer(datatype: str, values: np.ndarray):
    def answer(request):
        response = pb.ModelInferResponse(model_name=request.model_name)
        out = response.outputs.add(name="OUT", datatype=datatype, shape=[2, len(values)])
        getattr(out.contents, TYPED_FIELDS[datatype][0]).extend(list(values) * 2)
        return response
    return answer


@pytest.mark.parametrize("datatype", sorted(TYPED_CASES))
def test_typed_answers_come_back_raw_and_exact(make_server, upstreams, clean_images, datatype):
    values = TYPED_CASES[datatype]
    up = upstreams(["OUT"], typed_answer(datatype, values))
    front = make_server(upstream=f"127.0.0.1:{up.port}")
    res = triton_infer(front.port, "IMAGE", clean_images, "FP32")
    got, want = res.as_numpy("OUT"), np.stack([values, values])
    assert res.get_response().outputs[0].datatype == datatype and got.shape == want.shape
    if datatype == "BYTES":
        assert got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype.newbyteorder("=") and got.tobytes() == want.tobytes()  # NaN and -0.0 too
    assert res.as_numpy("FLAG").tolist() == [False] * len(clean_images)


def test_fp16_travels_raw_only(make_server, upstreams, clean_images):
    # KServe v2 / Triton have no typed field for FP16: raw passes through, "typed" (no contents) is refused
    half = np.array([0.1, 65504, -0.0], "<f2")
    up = upstreams(["H"], raw_answer({"H": ("FP16", half)}))
    front = make_server(upstream=f"127.0.0.1:{up.port}")
    assert triton_infer(front.port, "IMAGE", clean_images, "FP32").as_numpy("H").tobytes() == half.tobytes()
    up.answer = lambda request: pb.ModelInferResponse(outputs=[pb.ModelInferResponse.InferOutputTensor(
        name="H", datatype="FP16", shape=[3])])
    with pytest.raises(InferenceServerException, match="FP16 has no typed contents field"):
        triton_infer(front.port, "IMAGE", clean_images, "FP32")


def _health(port: int) -> int:
    with contextlib.closing(grpc.insecure_channel(f"127.0.0.1:{port}")) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def _wait_for(predicate, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_readiness_follows_the_upstream(make_server, upstreams, clean_images):
    up = upstreams(["OUT"], raw_answer({"OUT": ("FP32", np.zeros(4, "<f4"))}))
    front = make_server(upstream=f"127.0.0.1:{up.port}", upstream_poll_seconds=0.1)
    client = triton.InferenceServerClient(f"127.0.0.1:{front.port}")
    with contextlib.closing(grpc.insecure_channel(f"127.0.0.1:{front.port}")) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        status = lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status  # noqa: E731
        up_gauge = front.server.metrics.upstream_up._value.get
        assert client.is_server_ready() and status() == health_pb2.HealthCheckResponse.SERVING and up_gauge() == 1
        triton_infer(front.port, "IMAGE", clean_images, "FP32")
        up.stop()
        assert _wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not client.is_server_ready() and not client.is_model_ready("tinycnn") and up_gauge() == 0
        with pytest.raises(InferenceServerException, match="upstream"):
            triton_infer(front.port, "IMAGE", clean_images, "FP32")
        up.start(up.port)  # the same port again
        assert _wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
        assert client.is_server_ready() and up_gauge() == 1
        triton_infer(front.port, "IMAGE", clean_images, "FP32")
    client.close()
    codes = {s.labels["code"]: s.value for m in front.server.metrics.registry.collect()
             if m.name == "semguard_upstream_requests" for s in m.samples if s.name.endswith("_total")}
    assert codes["OK"] == 2 and codes["UNAVAILABLE"] == 1
    assert front.server.metrics.upstream_seconds._sum.get() > 0


def test_the_upstream_gets_the_clients_deadline_or_upstream_timeout(make_server, upstreams, clean_images):
    up = upstreams(["OUT"], raw_answer({"OUT": ("FP32", np.zeros(4, "<f4"))}))
    front = make_server(upstream=f"127.0.0.1:{up.port}", upstream_timeout=2.0)
    triton_infer(front.port, "IMAGE", clean_images, "FP32")  # no deadline of its own
    client = triton.InferenceServerClient(f"127.0.0.1:{front.port}")
    inp = triton.InferInput("IMAGE", list(clean_images.shape), "FP32")
    inp.set_data_from_numpy(clean_images)
    client.infer("tinycnn", [inp], client_timeout=30)
    client.close()
    assert up.deadlines[0] is not None and 0 < up.deadlines[0] <= 2.5  # --upstream-timeout (grpc rounds up)
    assert up.deadlines[1] is not None and 10 < up.deadlines[1] <= 31  # the client's, passed on


class SlowGuard:
    """The test guard, 0.3 s slower per batch."""

    def __init__(self, guard):
        self.guard, self.info = guard, guard.info

    def inspect(self, images):
        time.sleep(0.3)
        return self.guard.inspect(images)


def test_annotate_overlaps_the_passes_block_forwards_only_clean(make_server, upstreams, guard, clean_images,
                                                                flagged_images):
    up = upstreams(["OUT"], raw_answer({"OUT": ("FP32", np.zeros(2, "<f4"))}), delay_s=0.3)
    annotate = make_server(SlowGuard(guard), upstream=f"127.0.0.1:{up.port}")
    triton_infer(annotate.port, "IMAGE", clean_images[:2], "FP32")  # warm
    start = time.perf_counter()
    triton_infer(annotate.port, "IMAGE", clean_images[:2], "FP32")
    assert time.perf_counter() - start < 0.55  # about max(0.3, 0.3), not 0.3 + 0.3
    block = make_server(SlowGuard(guard), upstream=f"127.0.0.1:{up.port}",
                        policy="block", block_action="error")
    sent = len(up.requests)
    with pytest.raises(InferenceServerException, match="blocked by policy"):
        triton_infer(block.port, "IMAGE", flagged_images, "FP32")
    assert len(up.requests) == sent  # the upstream never saw the flagged images
    triton_infer(block.port, "IMAGE", clean_images[:2], "FP32")
    assert len(up.requests) == sent + 1


# KServe's Python client carries its own generated copy of the inference.* messages, which cannot
# share a process with tritonclient's (duplicate symbols), and pins pydantic and psutil: it runs in
# a subprocess, from the environment scripts/test.sh makes for it (SEMGUARD_KSERVE_PYTHON).
KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main():
    images = np.load(sys.argv[2])
    request = InferInput("IMAGE", list(images.shape), "FP32")
    request.set_data_from_numpy(images)
    client = InferenceGRPCClient(f"127.0.0.1:{sys.argv[1]}", timeout=30)
    reply = await client.infer(InferRequest(model_name="tinycnn", infer_inputs=[request]))
    print(json.dumps({out.name: out.as_numpy().tolist() for out in reply.outputs}))

asyncio.run(main())
"""


def test_kserve_client_reads_the_guards_flag_beside_the_upstreams(make_server, upstreams, guard, clean_images,
                                                                  tmp_path):
    python = os.environ.get("SEMGUARD_KSERVE_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("SEMGUARD_KSERVE_PYTHON is unset: run the tests through scripts/test.sh")
        pytest.skip("KServe's client is installed by scripts/test.sh (SEMGUARD_KSERVE_PYTHON)")
    up = score_flag_upstream(upstreams, len(clean_images))
    front = make_server(upstream=f"127.0.0.1:{up.port}", output_prefix="SEMGUARD_")
    np.save(tmp_path / "images.npy", clean_images)
    done = subprocess.run([python, "-c", KSERVE_CLIENT, str(front.port), str(tmp_path / "images.npy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout.strip().splitlines()[-1])
    assert outputs["FLAG"] == [True] * len(clean_images)  # the upstream's own FLAG
    assert outputs["SEMGUARD_FLAG"] == [v.flagged for v in expected(guard, clean_images)]
    np.testing.assert_allclose(outputs["SEMGUARD_SCORE"], [v.score for v in expected(guard, clean_images)], rtol=1e-6)


def test_an_upstream_that_starts_later_is_checked_when_it_answers(make_server, upstreams, clean_images, caplog):
    up = upstreams(["OUT"], raw_answer({"OUT": ("FP32", np.zeros(4, "<f4"))}))
    up.stop()  # the guard starts first, as it may beside Triton in one pod
    front = make_server(upstream=f"127.0.0.1:{up.port}", upstream_poll_seconds=0.1)
    assert _health(front.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    up.start(up.port)
    assert _wait_for(lambda: _health(front.port) == health_pb2.HealthCheckResponse.SERVING)
    triton_infer(front.port, "IMAGE", clean_images, "FP32")

    clashing = upstreams(["SCORE"], raw_answer({"SCORE": ("FP32", np.zeros(4, "<f4"))}))
    clashing.stop()
    front = make_server(upstream=f"127.0.0.1:{clashing.port}", upstream_poll_seconds=0.1)
    with caplog.at_level(logging.ERROR):
        clashing.start(clashing.port)
        assert _wait_for(lambda: clashes(front) == 1)  # once the channel's reconnect backoff let it through
        time.sleep(0.5)  # five more polls
    assert _health(front.port) == health_pb2.HealthCheckResponse.NOT_SERVING  # a shadowed verdict is never served
    errors = [r for r in caplog.records if "SCORE named like the guard's" in r.getMessage()]
    assert len(errors) == 1 and "--output-prefix" in errors[0].getMessage()
