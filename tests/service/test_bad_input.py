"""Every kind of bad request gets a clear status and message, and the server keeps serving."""
from __future__ import annotations

import io
import re
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from semguard.service.decode import pack_bytes_tensor
from semguard.service.generated import guard_pb2, guard_pb2_grpc

INVALID, NOT_FOUND, TOO_BIG = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                               grpc.StatusCode.RESOURCE_EXHAUSTED)


def request(datatype="FP32", shape=(1, 3, 16, 16), raw: bytes | None = None, model="tinycnn", **kw):
    req = pb.ModelInferRequest(model_name=model, **kw)
    req.inputs.add(name="IMAGE", datatype=datatype, shape=list(shape))
    if raw is None:
        raw = np.full(shape, 0.2, dtype=np.float32).tobytes()
    req.raw_input_contents.append(raw)
    return req


def png_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height pixels (IHDR rewritten, CRC fixed)."""
    data = bytearray(png_bytes((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def two_inputs():
    req = request()
    req.inputs.add(name="EXTRA", datatype="FP32", shape=[1])
    req.raw_input_contents.append(b"\0\0\0\0")
    return req


def raw_and_typed():
    req = request()
    req.inputs[0].contents.fp32_contents.extend([0.0])
    return req


def unknown_output():
    req = request()
    req.outputs.add(name="NOPE")
    return req


BAD_MODEL_INFER = [
    ("wrong datatype", request(datatype="INT32"), INVALID, "datatype must be one of FP32"),
    ("wrong rank", request(shape=(3, 16, 16), raw=bytes(3 * 16 * 16 * 4)), INVALID, "shape must be"),
    ("wrong image size", request(shape=(1, 3, 8, 8)), INVALID, r"shape must be \[batch, 3, 16, 16\]"),
    ("negative dim", request(shape=(-1, 3, 16, 16), raw=b""), INVALID, "shape must be"),
    ("truncated raw", request(raw=bytes(100)), INVALID, "raw contents have 100 bytes, expected 3072"),
    ("empty batch", request(shape=(0, 3, 16, 16), raw=b""), INVALID, "empty batch"),
    ("NaN", request(raw=np.full((1, 3, 16, 16), np.nan, np.float32).tobytes()), INVALID, "NaN"),
    ("out of range", request(raw=np.full((1, 3, 16, 16), 7.0, np.float32).tobytes()), INVALID, r"\[0, 1\]"),
    ("uint8 wrong layout", request(datatype="UINT8", shape=(1, 3, 16, 16), raw=bytes(768)), INVALID,
     r"shape must be \[batch, 16, 16, 3\]"),
    ("two inputs", two_inputs(), INVALID, "expected exactly 1 input"),
    ("raw and typed", raw_and_typed(), INVALID, "not both"),
    ("unknown output", unknown_output(), INVALID, "unknown output"),
    ("truncated BYTES", request("BYTES", (1,), raw=struct.pack("<I", 1000) + b"abc"), INVALID,
     "truncated BYTES tensor"),
    ("BYTES count", request("BYTES", (2,), raw=pack_bytes_tensor([png_bytes()])), INVALID, "declares 2 images"),
    ("corrupt image", request("BYTES", (1,), raw=pack_bytes_tensor([b"\x89PNG\r\n\x1a\nnot really"])), INVALID,
     "not a decodable PNG or JPEG"),
    ("truncated image", request("BYTES", (1,), raw=pack_bytes_tensor([png_bytes((64, 64))[:60]])), INVALID,
     "corrupt or truncated|not a decodable"),
    ("gif is refused", request("BYTES", (1,), raw=pack_bytes_tensor([b"GIF89a" + bytes(20)])), INVALID,
     "not a decodable PNG or JPEG"),
    ("decompression bomb", request("BYTES", (1,), raw=pack_bytes_tensor([png_bomb(100_000, 100_000)])), INVALID,
     "more pixels than the limit"),
    ("huge image", request("BYTES", (1,), raw=pack_bytes_tensor([png_bomb(5000, 5000)])), INVALID,
     "5000x5000 pixels, more pixels than the limit"),
    ("unknown model", request(model="resnet"), NOT_FOUND, "unknown model 'resnet'"),
    ("unknown version", request(model_version="7"), NOT_FOUND, "unknown version '7'"),
]


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[
        ("grpc.max_send_message_length", 64 << 20)])  # so the oversized request reaches the server
    yield pb_grpc.GRPCInferenceServiceStub(channel), guard_pb2_grpc.GuardStub(channel), channel
    channel.close()


@pytest.mark.parametrize("name,req,code,message", BAD_MODEL_INFER, ids=[c[0] for c in BAD_MODEL_INFER])
def test_model_infer_bad_input(stubs, name, req, code, message):
    with pytest.raises(grpc.RpcError) as err:
        stubs[0].ModelInfer(req, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert re.search(message, err.value.details()), err.value.details()
    assert "Traceback" not in err.value.details()


def test_malformed_protobuf_bytes(stubs):
    raw_call = stubs[2].unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as err:
        raw_call(b"\x2a\xff\xff\xff\xff\x0f\x01", timeout=10)  # field 5, length far past the end
    assert err.value.code() == INVALID and "not a valid protobuf message" in err.value.details()


def test_oversized_message(stubs, server):
    big = np.zeros((1500, 3, 16, 16), np.float32)  # ~4.6 MB > 4 MiB limit of TEST_CONFIG
    with pytest.raises(grpc.RpcError) as err:
        stubs[0].ModelInfer(request(shape=big.shape, raw=big.tobytes()), timeout=10)
    assert err.value.code() == TOO_BIG and "larger than max" in err.value.details()


GUARD_BAD = [
    ("no images", guard_pb2.InspectRequest(), "set `encoded`"),
    ("no layout", guard_pb2.InspectRequest(tensor=guard_pb2.Tensor(shape=[1, 3, 16, 16])), "layout must be"),
    ("empty encoded", guard_pb2.InspectRequest(encoded=guard_pb2.EncodedImages()), "empty batch"),
    ("short tensor", guard_pb2.InspectRequest(tensor=guard_pb2.Tensor(
        layout=guard_pb2.Tensor.FP32_NCHW, shape=[1, 3, 16, 16], data=b"\0" * 12)), "expected 3072"),
]


@pytest.mark.parametrize("name,req,message", GUARD_BAD, ids=[c[0] for c in GUARD_BAD])
def test_guard_api_bad_input(stubs, name, req, message):
    with pytest.raises(grpc.RpcError) as err:
        stubs[1].Inspect(req, timeout=10)
    assert err.value.code() == INVALID and message in err.value.details()


def test_server_still_serves_and_counted_codes(stubs, server):
    """After all the bad requests above (file order) and one more here, a valid request succeeds."""
    for _, req, code, _ in BAD_MODEL_INFER:
        with pytest.raises(grpc.RpcError):
            stubs[0].ModelInfer(req, timeout=10)
    res = stubs[0].ModelInfer(request(), timeout=10)
    assert [o.name for o in res.outputs][:2] == ["LOGITS", "PROBABILITIES"]
    count = server.server.metrics.registry.get_sample_value(
        "semguard_requests_total", {"method": "inference.GRPCInferenceService/ModelInfer", "code": "INVALID_ARGUMENT"})
    assert count is not None and count >= 10
