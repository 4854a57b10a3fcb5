"""The one-pass C kernel (detector/native.py) against eager torch in float64 on small random inputs.

Skipped where the machine has no C compiler, unless SEMGUARD_REQUIRE_NATIVE=1 (.ci/run sets it), which
turns the skip into a failure so that a broken build cannot hide behind it."""
import os

import numpy as np
import pytest
import torch

from semguard.detector import native
from semguard.detector.reference import Reduction, count_sketch, sketch_signs


def kernels_or_skip() -> native.NativeKernels:
    try:
        return native.load_kernels()
    except native.NativeUnavailable as e:
        if os.environ.get("SEMGUARD_REQUIRE_NATIVE") == "1":
            raise
        pytest.skip(f"native kernel unavailable here: {e}")


def reference(x: torch.Tensor, signs: torch.Tensor | None, dim: int, channels: int):
    """The definitions, in float64: fold(signs * x), row means, channel means."""
    x64 = x.double()
    fold = None
    if signs is not None:
        fold = torch.zeros(len(x), dim, dtype=torch.float64)
        fold.index_add_(1, torch.arange(x.shape[1]) % dim, x64 * signs.double())
    means = x64.mean(1)
    pooled = x64.reshape(len(x), channels, -1).mean(-1) if channels else None
    return fold, means, pooled


CASES = [  # (batch, channels, hw, dim): k a multiple of dim, k % dim != 0, dim > k, no sketch, no channels
    (3, 4, 25, 10), (2, 6, 49, 31), (1, 3, 7, 64), (5, 8, 16, 0), (4, 0, 97, 13), (2, 16, 9, 4093),
]


@pytest.mark.parametrize("batch,channels,hw,dim", CASES)
def test_one_pass_matches_the_definitions(batch, channels, hw, dim):
    kernels = kernels_or_skip()
    k = (channels or 1) * hw
    gen = torch.Generator().manual_seed(batch * 1000 + k)
    x = torch.relu(torch.randn(batch, k, generator=gen)) + 3.0  # a common offset, as ReLU maps have
    signs = sketch_signs(k, dim, 7, torch.float32)[0] if dim else None
    fold, means, pooled = kernels.sketch_and_channel_means(x, signs, dim, channels)
    want_fold, want_means, want_pooled = reference(x, signs, dim, channels)
    np.testing.assert_allclose(means.numpy(), want_means.numpy(), rtol=1e-14)
    if channels:
        assert pooled.dtype == torch.float64
        np.testing.assert_allclose(pooled.numpy(), want_pooled.numpy(), rtol=1e-14)
    else:
        assert pooled is None
    if dim:  # float32 sums of signed terms: rounding of the order of float32's epsilon times the terms' sum
        scale = float(x.abs().sum(1).max())
        np.testing.assert_allclose(fold.double().numpy(), want_fold.numpy(), rtol=0, atol=4e-7 * scale)
        sketch = fold - means.float()[:, None] * sketch_signs(k, dim, 7, torch.float32)[1]
        np.testing.assert_allclose(sketch.numpy(), count_sketch(x, dim, 7).numpy(), rtol=0, atol=4e-7 * scale)
    else:
        assert fold is None


def test_channel_means_equal_the_eager_float64_path():
    """The Mahalanobis member's channel means: float64 sums of the same float32 values, equal to 1e-15."""
    kernels = kernels_or_skip()
    x = torch.rand(7, 32 * 196, generator=torch.Generator().manual_seed(1))
    _, _, pooled = kernels.sketch_and_channel_means(x, None, 0, 32)
    np.testing.assert_allclose(pooled.numpy(), Reduction("channel_pool", channels=32).apply(x.double()).numpy(), rtol=1e-15)


def test_bad_inputs_are_named():
    kernels = kernels_or_skip()
    with pytest.raises(ValueError, match="float32 CPU"):
        kernels.sketch_and_channel_means(torch.zeros(2, 8, dtype=torch.float64), None, 0, 2)
    with pytest.raises(ValueError, match="do not split into 3 channels"):
        kernels.sketch_and_channel_means(torch.zeros(2, 8), None, 0, 3)
    with pytest.raises(ValueError, match=r"signs must be \(8,\)"):
        kernels.sketch_and_channel_means(torch.zeros(2, 8), torch.ones(7), 4, 0)


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CC", "semguard-no-such-cc")
    native.load_kernels.cache_clear()
    try:
        with pytest.raises(native.NativeUnavailable, match="semguard-no-such-cc"):
            native.load_kernels()
    finally:
        native.load_kernels.cache_clear()


def test_a_failed_build_is_named(monkeypatch, tmp_path):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: error: out of luck' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    native.load_kernels.cache_clear()
    try:
        with pytest.raises(native.NativeUnavailable, match="out of luck"):
            native.load_kernels()
    finally:
        native.load_kernels.cache_clear()
