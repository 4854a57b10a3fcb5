"""service/decode.py against loop-by-definition references on small seeded inputs."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from semguard.service import decode

SHAPE = (3, 4, 5)  # (C, H, W)


def test_bytes_tensor_roundtrip_matches_definition():
    rng = np.random.default_rng(0)
    items = [rng.bytes(int(n)) for n in rng.integers(0, 40, size=7)] + [b""]
    packed = decode.pack_bytes_tensor(items)
    reference = b"".join(len(b).to_bytes(4, "little") + b for b in items)
    assert packed == reference
    assert decode.split_bytes_tensor(packed) == items
    with pytest.raises(ValueError, match="length prefix cut"):
        decode.split_bytes_tensor(packed + b"\x01\x00")
    with pytest.raises(ValueError, match="declares 9 bytes"):
        decode.split_bytes_tensor(struct.pack("<I", 9) + b"abc")


def test_uint8_nhwc_matches_loop():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)  # (B, H, W, C)
    got = decode.uint8_nhwc(pixels.tobytes(), pixels.shape, SHAPE)
    want = np.zeros((2, 3, 4, 5), np.float32)
    for b in range(2):
        for c in range(3):
            for y in range(4):
                for x in range(5):
                    want[b, c, y, x] = pixels[b, y, x, c] / 255.0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(decode.uint8_nhwc(pixels.ravel().astype(np.int64), pixels.shape, SHAPE), want)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        decode.uint8_nhwc(np.full(pixels.size, 300), pixels.shape, SHAPE)


def test_fp32_nchw_checks():
    x = np.random.default_rng(2).random((2, *SHAPE), dtype=np.float32)
    np.testing.assert_array_equal(decode.fp32_nchw(x.tobytes(), x.shape, SHAPE), x)
    np.testing.assert_array_equal(decode.fp32_nchw(x.ravel(), x.shape, SHAPE), x)
    with pytest.raises(ValueError, match="empty batch"):
        decode.fp32_nchw(b"", (0, *SHAPE), SHAPE)
    with pytest.raises(ValueError, match="expected 480"):
        decode.fp32_nchw(x.tobytes()[:-4], x.shape, SHAPE)
    with pytest.raises(ValueError, match="typed contents have 3 elements"):
        decode.fp32_nchw(np.zeros(3), x.shape, SHAPE)
    with pytest.raises(ValueError, match="NaN"):
        decode.fp32_nchw(np.where(x > 0.5, np.nan, x).astype(np.float32).tobytes(), x.shape, SHAPE)


def test_encoded_images_resize_and_layout():
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    got = decode.encoded_images([buf.getvalue()], SHAPE, max_pixels=100)
    np.testing.assert_allclose(got[0], hwc.transpose(2, 0, 1) / 255.0, rtol=1e-6)  # same size: lossless
    big = io.BytesIO()
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(big, format="JPEG")
    assert decode.encoded_images([big.getvalue()], SHAPE, max_pixels=100).shape == (1, *SHAPE)  # resized
    with pytest.raises(ValueError, match="8x10|10x8"):
        decode.encoded_images([big.getvalue()], SHAPE, max_pixels=79)
