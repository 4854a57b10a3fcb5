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


@pytest.fixture
def uncached():
    """load_kernels builds afresh in the test (its once-per-process cache cleared before and after)."""
    native.load_kernels.cache_clear()
    yield native.load_kernels
    native.load_kernels.cache_clear()


def test_a_missing_compiler_is_named(monkeypatch, uncached):
    monkeypatch.setenv("CC", "semguard-no-such-cc")
    with pytest.raises(native.NativeUnavailable, match="semguard-no-such-cc"):
        uncached()


def test_a_compiler_with_arguments_and_a_failed_load_are_named(monkeypatch, tmp_path, uncached):
    """CC may carry arguments ("ccache gcc"); a library the loader refuses (here: not a shared object) is
    NativeUnavailable, not an OSError escaping `semguard serve`."""
    cc = tmp_path / "fakecc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --wrapped ] || exit 3\nwhile [ \"$1\" != -o ]; do shift; done\n"
                  "echo 'not a library' > \"$2\"\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", f"{cc} --wrapped")
    with pytest.raises(native.NativeUnavailable, match="could not be built and loaded"):
        uncached()


def test_a_failed_build_is_named(monkeypatch, tmp_path, uncached):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: error: out of luck' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(native.NativeUnavailable, match="out of luck"):
        uncached()


@pytest.mark.parametrize("layers,batch,k,classes,m", [(3, 5, 9, 12, 4), (2, 1, 30, 30, 29), (4, 7, 5, 6, 2), (5, 32, 40, 300, 299)])
def test_margins_are_the_eager_margins(layers, batch, k, classes, m):
    """One pass over the (L, B, M) margins with the float64 operations of signature.one_vs_two_margins in
    the same order: equal to the last bit but where torch's vectorised sqrt is not correctly rounded
    (seen: 1 ulp on 1 of 56 margins); with labels that are references and labels that are not
    (position K), and a constant profile row (zero variance: its margins exactly 0)."""
    from semguard.detector.reference import label_terms
    from semguard.detector.signature import one_vs_two_margins

    kernels = kernels_or_skip()
    gen = torch.Generator().manual_seed(layers * 100 + k)
    d = torch.rand(classes, k, generator=gen, dtype=torch.float64) * 2 - 1
    terms = label_terms(d, torch.randperm(classes, generator=gen)[:k].numpy())  # each reference a distinct label
    profiles = torch.rand(layers, batch, k, generator=gen, dtype=torch.float64) * 2 - 1
    profiles[0, 0] = 0.25  # a constant row
    predicted = torch.randint(0, classes, (batch,), generator=gen)
    alternatives = torch.stack([torch.tensor([c for c in torch.randperm(classes, generator=gen).tolist() if c != int(p)][:m])
                                for p in predicted])
    want = one_vs_two_margins(profiles, predicted, terms, alternatives)
    got = kernels.one_vs_two_margins(profiles, predicted, terms, alternatives)
    assert got.shape == want.shape == (layers, batch, m)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=4 * np.finfo(np.float64).eps)
    assert float((got != want).double().mean()) < 0.05  # nearly all bit for bit
    assert bool((got[0, 0] == 0).all()) and bool((want[0, 0] == 0).all())


def test_margins_check_their_shapes():
    from semguard.detector.reference import label_terms

    kernels = kernels_or_skip()
    terms = label_terms(torch.rand(6, 4, dtype=torch.float64), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="do not match"):
        kernels.one_vs_two_margins(torch.rand(2, 3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long), terms,
                                   torch.ones(3, 2, dtype=torch.long))
    for predicted, alternative in ((0, 6), (-1, 1), (6, 1)):  # read by index in C: checked first
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
            kernels.one_vs_two_margins(torch.rand(2, 3, 4, dtype=torch.float64), torch.full((3,), predicted), terms,
                                       torch.full((3, 2), alternative, dtype=torch.long))
    with pytest.raises(ValueError, match="label terms must be"):
        kernels.one_vs_two_margins(torch.rand(2, 3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                                   terms._replace(padded=terms.padded[:, :4]), torch.ones(3, 2, dtype=torch.long))


def test_the_sketch_is_float32_whatever_the_default_dtype():
    kernels = kernels_or_skip()
    x = torch.rand(3, 40, generator=torch.Generator().manual_seed(2))
    signs = sketch_signs(40, 7, 0, torch.float32)[0]
    want = kernels.sketch_and_channel_means(x, signs, 7, 4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = kernels.sketch_and_channel_means(x, signs, 7, 4)
    finally:
        torch.set_default_dtype(default)
    assert got[0].dtype == torch.float32 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_threads_change_no_bit():
    """With torch threads > 1 the kernels run on several layers (margins: layer ranges) at once; every call's
    arithmetic is its own, so the results equal the one-thread results exactly."""
    from semguard.detector.reference import label_terms

    kernels = kernels_or_skip()
    gen = torch.Generator().manual_seed(4)
    maps = [torch.rand(3, c * 36, generator=gen) for c in (4, 8, 16, 2, 6)]
    signs = [sketch_signs(x.shape[1], 13, 0, torch.float32)[0] for x in maps]
    terms = label_terms(torch.rand(40, 9, dtype=torch.float64, generator=gen), torch.randperm(40, generator=gen)[:9].numpy())
    profiles = torch.rand(7, 3, 9, dtype=torch.float64, generator=gen)
    predicted = torch.tensor([0, 5, 39])
    alternatives = torch.stack([torch.tensor([a for a in range(40) if a != int(p)]) for p in predicted])

    def run():
        passes = kernels.map(lambda job: kernels.sketch_and_channel_means(job[0], job[1], 13, job[0].shape[1] // 36),
                             list(zip(maps, signs)))
        return passes, kernels.one_vs_two_margins(profiles, predicted, terms, alternatives)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[1], many[1])
    assert all(torch.equal(a, b) for p, q in zip(one[0], many[0]) for a, b in zip(p, q))
