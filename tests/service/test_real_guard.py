"""Smoke test with the real detector.guard.Guard: calibrate a tiny bundle, `Guard.load` it, serve it,
and check tritonclient and the guard API agree with `guard.inspect` (the other service tests use
the test double in conftest.py)."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from semguard.models.factory import ModelSpec
from semguard.detector.calibrate import CalibrationConfig
from semguard.detector.guard import Guard, calibrate_guard
from semguard.service.generated import guard_pb2, guard_pb2_grpc
from tests.tiny_cnn import LAYERS, tiny_task

N_CLASSES = 6




@pytest.fixture(scope="module")
def real_guard(tmp_path_factory) -> tuple[Guard, torch.Tensor]:
    model, images, labels, words, _ = tiny_task(N_CLASSES, 120)
    out = tmp_path_factory.mktemp("bundle")
    calibrate_guard(model, ModelSpec("tiny_cnn_test", {"width": 6, "num_classes": N_CLASSES}), LAYERS, [f"c{i}" for i in range(N_CLASSES)],
                    words, images, labels, out, model_name="smallcnn",
                    config=CalibrationConfig(k=100, per_concept=3, target_fpr=0.1, batch_size=32))
    return Guard.load(out), images[:5]


def test_real_guard_served(real_guard, make_server):
    guard, images = real_guard
    created = make_server(guard)
    want = guard.inspect(images)
    client = triton.InferenceServerClient(f"127.0.0.1:{created.port}")
    inp = triton.InferInput("IMAGE", list(images.shape), "FP32")
    inp.set_data_from_numpy(images.numpy())
    res = client.infer(guard.info.model_name, [inp])
    client.close()
    np.testing.assert_array_equal(res.as_numpy("PREDICTION"), [v.prediction for v in want])
    np.testing.assert_allclose(res.as_numpy("SCORE"), [v.score for v in want], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.as_numpy("FLAG"), [v.flagged for v in want])
    np.testing.assert_allclose(res.as_numpy("SIGNATURE"), np.stack([v.signature for v in want]), rtol=1e-5)
    with grpc.insecure_channel(f"127.0.0.1:{created.port}") as channel:
        info = guard_pb2_grpc.GuardStub(channel).GetInfo(guard_pb2.GetInfoRequest(), timeout=10)
    assert list(info.layers) == guard.info.layers and info.model_name == "smallcnn"
    assert created.server.metrics.registry.get_sample_value(
        "semguard_stage_duration_seconds_count", {"stage": "inspect"}) >= 1
