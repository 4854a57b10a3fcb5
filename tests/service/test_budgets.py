"""Request budgets before work: a request's image count against the queue's room and its PNG/JPEG
headers' declared pixels against --max-request-pixels are checked before any image is decoded;
over budget is RESOURCE_EXHAUSTED with the numbers, counted in semguard_budget_refusals_total."""
from __future__ import annotations

import contextlib
import io
import threading

import grpc
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from semguard.detector.errors import InputError
from semguard.service import decode
from semguard.service.decode import pack_bytes_tensor
from semguard.service.errors import OverBudget
from semguard.service.generated import guard_pb2, guard_pb2_grpc

SIDE = 4096  # each heavy PNG decodes to 4096 x 4096 = 16.8 Mpx (the per-image limit) from ~16 kB
HEAVY_COPIES = 64  # 64 x 16.8 Mpx = 1.07 Gpx, four times the default per-request budget


@pytest.fixture(scope="module")
def heavy_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (SIDE, SIDE)).save(buf, format="PNG", optimize=False)
    assert len(buf.getvalue()) < 100_000  # small on the wire, 16.8 Mpx once decoded
    return buf.getvalue()


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """(width, height) of every image fully decoded (in this process: the servers run in it)."""
    seen: list[tuple[int, int]] = []
    real = decode.decode_pixels

    def counting(img, input_shape, what):
        seen.append(img.size)
        return real(img, input_shape, what)

    monkeypatch.setattr(decode, "decode_pixels", counting)
    return seen


def infer_request(files: list[bytes]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tinycnn")
    req.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(files)])
    req.raw_input_contents.append(pack_bytes_tensor(files))
    return req


def send(channel: grpc.Channel, api: str, files: list[bytes]):
    if api == "oip":
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(files), timeout=60)
    stub = guard_pb2_grpc.GuardStub(channel)
    return stub.Inspect(guard_pb2.InspectRequest(encoded=guard_pb2.EncodedImages(images=files)), timeout=60)


def refusals(created, budget: str) -> float:
    return created.server.metrics.registry.get_sample_value("semguard_budget_refusals_total", {"budget": budget})


@pytest.mark.parametrize("api", ["oip", "guard"])
def test_decompression_heavy_request_is_refused_before_decoding(make_server, api, heavy_png, decoded):
    created = make_server(max_message_bytes=16 << 20)
    with contextlib.closing(grpc.insecure_channel(f"127.0.0.1:{created.port}",
                                                  [("grpc.max_send_message_length", 16 << 20)])) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            send(channel, api, [heavy_png] * HEAVY_COPIES)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        total = HEAVY_COPIES * SIDE * SIDE
        assert f"{HEAVY_COPIES} images declare {total} pixels" in refused.value.details()
        assert f"budget of {16 * 4096 * 4096} (max_request_pixels)" in refused.value.details()
        assert decoded == []  # not one heavy image was decoded
        assert refusals(created, "pixels") == 1 and refusals(created, "images") == 0
        # normal traffic is served by the same server, and only its images are decoded
        assert len(send(channel, api, [small_png()] * 3).raw_output_contents if api == "oip"
                   else send(channel, api, [small_png()] * 3).verdicts) > 0
        assert decoded == [(16, 16)] * 3


def test_normal_traffic_keeps_being_served_while_heavy_requests_are_refused(make_server, heavy_png, decoded):
    created = make_server(max_message_bytes=16 << 20)
    codes: list[grpc.StatusCode] = []
    answered: list[int] = []

    def heavy(channel):
        for _ in range(3):
            try:
                send(channel, "oip", [heavy_png] * HEAVY_COPIES)
            except grpc.RpcError as error:
                codes.append(error.code())

    def normal(channel):
        for _ in range(5):
            answered.append(len(send(channel, "guard", [small_png()] * 2).verdicts))

    with contextlib.closing(grpc.insecure_channel(f"127.0.0.1:{created.port}",
                                                  [("grpc.max_send_message_length", 16 << 20)])) as channel:
        threads = [threading.Thread(target=f, args=(channel,)) for f in (heavy, heavy, normal)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 6 and answered == [2] * 5
    assert refusals(created, "pixels") == 6
    assert sorted(set(decoded)) == [(16, 16)] and len(decoded) == 10  # only the normal requests' images


@pytest.mark.parametrize("api", ["oip", "guard"])
def test_more_images_than_the_queue_holds_are_refused_before_decoding(make_server, api, decoded):
    created = make_server(max_queue_images=8)
    with contextlib.closing(grpc.insecure_channel(f"127.0.0.1:{created.port}")) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            send(channel, api, [small_png()] * 9)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "9 images, more than the queue ever holds (8, max_queue_images)" in refused.value.details()
        assert decoded == [] and refusals(created, "images") == 1
        send(channel, api, [small_png()] * 8)  # at the limit: served
        assert len(decoded) == 8


def test_jpeg_headers_are_budgeted_too(decoded):
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(buf, format="JPEG")
    with pytest.raises(OverBudget, match=r"3 images declare 6000000 pixels in all, more than the per-request "
                                         r"budget of 5000000"):
        decode.encoded_images([buf.getvalue()] * 3, (3, 16, 16), 4096 * 4096, "x", max_request_pixels=5_000_000)
    assert decoded == []
    assert decode.encoded_images([buf.getvalue()] * 2, (3, 16, 16), 4096 * 4096, "x",
                                 max_request_pixels=4_000_000).shape == (2, 3, 16, 16)
    with pytest.raises(InputError, match="not a decodable PNG or JPEG"):  # the header pass still checks each file
        decode.encoded_images([buf.getvalue(), b"junk"], (3, 16, 16), 4096 * 4096, "x", max_request_pixels=10**9)
