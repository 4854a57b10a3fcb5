"""Fixtures for the service tests.

`guard` is a TEST DOUBLE of detector.guard.Guard: it implements exactly the contract in
ARCHITECTURE.md, "The guard contract" (info, inspect -> list[Verdict], an input error on bad input) with a real tiny torch
CNN (seeded random init) and a simple deterministic signature (per-layer mean activation). Its
score is the image's mean pixel value, so tests can make clean (dark) and flagged (bright) images
on purpose. To run these tests against a real bundle, change only the `guard` fixture to
`return Guard.load(bundle_dir)` and `flagged_images` to a set the bundle flags; the tests compare
server answers with `guard.inspect` on the same images, never with fixture internals.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from semguard.detector.errors import InputError
from semguard.detector.guard import GuardInfo, Verdict
from semguard.service.config import ServiceConfig
from semguard.service.server import CreatedServer, create_server


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a1 = torch.relu(self.conv1(x))       # (B, 4, H, W)
        a2 = torch.relu(self.conv2(a1))      # (B, 8, H/2, W/2)
        pool = a2.mean(dim=(2, 3))           # (B, 8)
        return self.fc(pool), {"conv1": a1, "conv2": a2, "pool": pool}


class FakeGuard:
    """Test double for detector.guard.Guard (see module doc). Not a detector."""

    def __init__(self, seed: int = 0, size: int = 16):
        torch.manual_seed(seed)
        self.model = TinyCNN().eval()
        self.info = GuardInfo(model_name="tinycnn", labels=[f"class{i}" for i in range(10)],
                              layers=["conv1", "conv2", "pool"], input_shape=(3, size, size),
                              threshold=0.5, flagger_method="mean-pixel-test-double")
        self.stage_timings: dict[str, float] = {}  # the optional per-stage hook the service reads
        self.calls: list[int] = []                 # batch sizes seen, for batching tests

    def inspect(self, images: torch.Tensor) -> list[Verdict]:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.float32:
            raise InputError("images must be a float32 torch.Tensor")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.info.input_shape:
            raise InputError(f"images must have shape (B, {', '.join(map(str, self.info.input_shape))}), "
                             f"got {tuple(images.shape)}")
        if len(images) == 0:
            raise InputError("images: empty batch")
        if not torch.isfinite(images).all():
            raise InputError("images contain NaN or inf")
        self.calls.append(len(images))
        t0 = time.perf_counter()
        with torch.no_grad():
            logits, acts = self.model(images)
        t1 = time.perf_counter()
        sig = torch.stack([a.flatten(1).mean(1) for a in acts.values()], dim=1).numpy()  # (B, L)
        t2 = time.perf_counter()
        scores = images.flatten(1).mean(1).numpy()  # (B,)
        self.stage_timings = {"forward": t1 - t0, "signature": t2 - t1, "flagger": time.perf_counter() - t2}
        probs = torch.softmax(logits, 1)
        top_p, top_i = probs.topk(5, dim=1)
        out = []
        for b in range(len(images)):
            pred = int(logits[b].argmax())
            out.append(Verdict(prediction=pred, label=self.info.labels[pred],
                               top5=[(int(i), float(p)) for i, p in zip(top_i[b], top_p[b])],
                               logits=logits[b].numpy().copy(), signature=sig[b].copy(),
                               score=float(scores[b]), flagged=bool(scores[b] > self.info.threshold),
                               disagreeing_layers=[n for n, s in zip(self.info.layers, sig[b]) if s > 0.2]))
        return out


@pytest.fixture(scope="session")
def guard() -> FakeGuard:
    return FakeGuard()


def _images(guard, seed: int, lo: float, hi: float, n: int) -> np.ndarray:
    c, h, w = guard.info.input_shape
    return np.random.default_rng(seed).uniform(lo, hi, size=(n, c, h, w)).astype(np.float32)


@pytest.fixture(scope="session")
def clean_images(guard) -> np.ndarray:
    """(4, C, H, W) float32 images the guard does not flag."""
    return _images(guard, 1, 0.0, 0.6, 4)


@pytest.fixture(scope="session")
def flagged_images(guard) -> np.ndarray:
    """(2, C, H, W) float32 images the guard flags."""
    return _images(guard, 2, 0.5, 1.0, 2)


# Fast defaults for tests: any free loopback port, short batching delay, metrics on.
TEST_CONFIG = ServiceConfig(host="127.0.0.1", grpc_port=0, metrics_port=0, max_queue_delay_ms=2.0,
                            max_message_bytes=4 * 1024 * 1024, grace_seconds=2.0, max_workers=16)


@pytest.fixture
def make_server(guard) -> Iterator[Callable[..., CreatedServer]]:
    """Start servers with TEST_CONFIG overridden by keyword; all are stopped at teardown."""
    started: list[CreatedServer] = []

    def make(guard_obj=None, **overrides) -> CreatedServer:
        created = create_server(replace(TEST_CONFIG, **overrides), guard_obj or guard)
        created.server.start()
        started.append(created)
        return created

    yield make
    for created in started:
        created.server.stop(grace=0).wait(10)


@pytest.fixture(scope="module")
def server(guard) -> Iterator[CreatedServer]:
    """One shared server for read-only tests in a module."""
    created = create_server(TEST_CONFIG, guard)
    created.server.start()
    yield created
    created.server.stop(grace=0).wait(10)


@pytest.fixture
def channel(server) -> Iterator[grpc.Channel]:
    with contextlib.closing(grpc.insecure_channel(f"127.0.0.1:{server.port}")) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch
