"""Request payloads -> image arrays (B, C, H, W) float32 in [0, 1], the Guard's input.

Pure functions, no gRPC: every problem is an InputError (a ValueError) whose message names the
field and what was expected; the servicers turn it into INVALID_ARGUMENT.
"""
from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image

from semguard.detector.errors import InputError
from semguard.service.errors import OverBudget

ENCODED_FORMATS = ("PNG", "JPEG")


def check_batch(shape: Sequence[int], expected: Sequence[int], what: str) -> int:
    """Check `shape` == (B, *expected) with B >= 1; return B."""
    shape = [int(s) for s in shape]
    if len(shape) != len(expected) + 1 or any(s < 0 for s in shape):
        raise InputError(f"{what}: shape must be [batch, {', '.join(map(str, expected))}], got {shape}")
    if shape[0] == 0:
        raise InputError(f"{what}: empty batch (shape {shape}); send at least one image")
    if list(shape[1:]) != list(expected):
        raise InputError(f"{what}: shape must be [batch, {', '.join(map(str, expected))}], got {shape}")
    return shape[0]


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    """Reject NaN/inf and values outside [0, 1] in float images (B, C, H, W)."""
    if not np.isfinite(images).all():
        raise InputError(f"{what}: contains NaN or infinite values; pixels must be finite in [0, 1]")
    if images.min() < 0.0 or images.max() > 1.0:
        raise InputError(f"{what}: pixel values must lie in [0, 1], got range "
                         f"[{images.min():.4g}, {images.max():.4g}]")
    return images


def _from_buffer(payload: bytes | np.ndarray, dtype: np.dtype, shape: list[int], what: str) -> np.ndarray:
    count = math.prod(shape)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        expected = count * np.dtype(dtype).itemsize
        if len(payload) != expected:
            raise InputError(f"{what}: raw contents have {len(payload)} bytes, expected {expected} "
                             f"for shape {shape} of {np.dtype(dtype).name}")
        return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    arr = np.asarray(payload)
    if arr.size != count:
        raise InputError(f"{what}: typed contents have {arr.size} elements, expected {count} for shape {shape}")
    return arr.reshape(shape)


def fp32_nchw(payload: bytes | np.ndarray, shape: Sequence[int], input_shape: Sequence[int],
              what: str = "input") -> np.ndarray:
    """float32 (B, C, H, W) in [0, 1] from raw little-endian bytes or typed values."""
    check_batch(shape, input_shape, what)
    arr = _from_buffer(payload, np.float32, [int(s) for s in shape], what).astype(np.float32)
    return check_images(arr, what)


def uint8_nhwc(payload: bytes | np.ndarray, shape: Sequence[int], input_shape: Sequence[int],
               what: str = "input") -> np.ndarray:
    """uint8 (B, H, W, C) pixels -> float32 (B, C, H, W) / 255."""
    c, h, w = input_shape
    check_batch(shape, (h, w, c), what)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        payload = np.asarray(payload)
        if payload.size and (payload.min() < 0 or payload.max() > 255):
            raise InputError(f"{what}: UINT8 values must lie in [0, 255]")
        payload = payload.astype(np.uint8)
    arr = _from_buffer(payload, np.uint8, [int(s) for s in shape], what)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # (B, C, H, W)


def split_bytes_tensor(raw: bytes, what: str = "input") -> list[bytes]:
    """Triton's raw BYTES layout: per element a 4-byte little-endian length, then the bytes."""
    items, pos, view = [], 0, memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InputError(f"{what}: truncated BYTES tensor: length prefix cut at byte {pos} of {len(raw)}")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise InputError(f"{what}: truncated BYTES tensor: element {len(items)} declares {n} bytes, "
                             f"only {len(raw) - pos - 4} remain")
        items.append(bytes(view[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return items


def pack_bytes_tensor(items: Sequence[bytes]) -> bytes:
    """Inverse of split_bytes_tensor."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def open_image(data: bytes, max_pixels: int, what: str) -> Image.Image:
    """A PNG/JPEG file opened lazily: PIL has read its header (format, width, height), no pixel yet.
    InputError when it is no such file or claims more than `max_pixels`."""
    try:
        img = Image.open(io.BytesIO(data), formats=ENCODED_FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL's own, far higher limit, checked in open()
        raise InputError(f"{what}: image has more pixels than the limit of {max_pixels} "
                         f"(max_image_pixels): {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{what}: not a decodable PNG or JPEG image ({exc})") from None
    # Checked before pixels are decoded: a 50 kB PNG can claim 100k x 100k pixels.
    if img.width * img.height > max_pixels:
        raise InputError(f"{what}: image is {img.width}x{img.height} pixels, more pixels than the limit "
                         f"of {max_pixels} (max_image_pixels)")
    return img


def decode_pixels(img: Image.Image, input_shape: Sequence[int], what: str) -> np.ndarray:
    """The full decode of an opened image -> float32 (C, H, W) in [0, 1], resized (bilinear) to the model input."""
    c, h, w = input_shape
    try:
        img = img.convert("RGB" if c == 3 else "L")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{what}: corrupt or truncated image ({exc})") from None
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr.reshape(h, w, c).transpose(2, 0, 1)  # (C, H, W)


def decode_image(data: bytes, input_shape: Sequence[int], max_pixels: int, what: str) -> np.ndarray:
    """One PNG/JPEG file -> float32 (C, H, W) in [0, 1], resized (bilinear) to the model input."""
    return decode_pixels(open_image(data, max_pixels, what), input_shape, what)


def encoded_images(items: Sequence[bytes], input_shape: Sequence[int], max_pixels: int,
                   what: str = "input", max_request_pixels: int | None = None) -> np.ndarray:
    """PNG/JPEG files -> float32 (B, C, H, W). Every header is read first: the declared pixels of the
    whole request are held against `max_request_pixels` (OverBudget) before any image is decoded."""
    if len(items) == 0:
        raise InputError(f"{what}: empty batch; send at least one image")
    opened = [open_image(b, max_pixels, f"{what}[{i}]") for i, b in enumerate(items)]
    total = sum(img.width * img.height for img in opened)
    if max_request_pixels is not None and total > max_request_pixels:
        raise OverBudget("pixels", f"{what}: {len(opened)} images declare {total} pixels in all, more than the "
                                   f"per-request budget of {max_request_pixels} (max_request_pixels); "
                                   "send fewer or smaller images per request")
    return np.stack([decode_pixels(img, input_shape, f"{what}[{i}]") for i, img in enumerate(opened)])
