"""The guard's verdicts are those of the pre-issue-24 code (tests/detector/frozen_guard.py, the old
per-layer loops kept as a slow reference): scores equal to 1e-6 relative and flags identical, on the
test bundles (tiny CNN: gaussian exact bank, ensemble on a sketched bank, logistic on a projected bank
with a subset of alternatives; a tiny WorldNet) and on the embedded world's bundle (slow)."""
import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from semguard.models.factory import ModelSpec
from semguard.detector.calibrate import CalibrationConfig
from semguard.detector.guard import Guard, calibrate_guard
from tests.detector.frozen_guard import frozen_verdicts
from tests.detector.test_native import kernels_or_skip
from tests.tiny_cnn import LAYERS, tiny_task
from tests.tiny_worldnet import IMAGE_SIZE, write_worldnet_bundle

N_CLASSES = 8
SCORE_RTOL = 1e-6  # the bound; features get the same


FLOAT32_ATOL = 1e-6  # the native pass's sketch sums in another order: margins (correlations) move by float32 rounding


def assert_same_verdicts(guard: Guard, images: torch.Tensor, batches=(1, 7, 32)) -> None:
    """Guard.inspect_arrays vs the frozen computation, batch by batch (the same batches on both sides).

    The default path must give the frozen features and scores to 1e-6 relative. The native pass
    (`recipe.kernels`) sums its float32 sketch in another order and its row means in float64, so its
    margins, features and scores also get float32's absolute resolution (1e-6, scores times their
    scale: a score near 0 moves by the rounding of the margins it is made of); fractions and flags
    must be identical on both.
    """
    flagged = 0
    atol = FLOAT32_ATOL if guard.recipe.kernels is not None else 0.0
    for size in batches:
        for start in range(0, len(images), size):
            x = images[start : start + size]
            new, old = guard.inspect_arrays(x), frozen_verdicts(guard, x)
            scale = max(1.0, float(np.abs(old.score).max()))
            np.testing.assert_allclose(new.features, old.features, rtol=SCORE_RTOL, atol=max(1e-9 * scale, atol))
            np.testing.assert_allclose(new.score, old.score, rtol=SCORE_RTOL, atol=max(1e-9, atol) * scale)
            np.testing.assert_array_equal(new.signature, old.fraction)
            np.testing.assert_allclose(new.margin, old.margin, rtol=SCORE_RTOL, atol=max(1e-12, atol))
            np.testing.assert_array_equal(new.flagged, old.flagged)
            flagged += int(old.flagged.sum())
    assert 0 < flagged < len(batches) * len(images), "the images must give both verdicts, or flags test nothing"


@pytest.fixture(scope="module")
def task():
    return tiny_task(N_CLASSES, 160)


def probe_images(task) -> torch.Tensor:
    """Clean images, noisier ones (flagged more often) and a constant image (zero profiles)."""
    noisy = (task.images[:40] + 0.4 * torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    return torch.cat([task.images[:40], noisy, torch.full((1, 3, 8, 8), 0.5)])


CONFIGS = {
    "gaussian-exact": CalibrationConfig(k=100, per_concept=3, target_fpr=0.1, batch_size=32),
    "ensemble-sketch": CalibrationConfig(method="ensemble", per_concept=3, target_fpr=0.1, batch_size=32,
                                         bank_max_width=100, bank_reduction="sketch", bank_projection_dim=31),
    "logistic-projection": CalibrationConfig(method="logistic", per_concept=3, target_fpr=0.1, batch_size=32,
                                             bank_max_width=100, bank_reduction="projection", bank_projection_dim=29,
                                             n_alternatives=3),
}


@pytest.fixture(scope="module")
def bundle_dir(task, tmp_path_factory):
    """name -> the directory of that CONFIGS bundle, calibrated once for the module."""
    made = {}

    def get(name: str):
        if name not in made:
            cfg, made[name] = CONFIGS[name], tmp_path_factory.mktemp(name)
            attack = None
            if cfg.method != "gaussian":
                noise = 0.3 * torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(7))
                attack = (task.images[:40] + noise).clamp(0, 1)
            calibrate_guard(task.model, ModelSpec("tiny_cnn_test", {"width": 6}), LAYERS,
                            [f"c{i}" for i in range(N_CLASSES)], task.words, task.images, task.labels, made[name],
                            attack_images=attack, config=cfg)
        return made[name]
    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_cnn_bundles_keep_their_verdicts(task, bundle_dir, name):
    cfg = CONFIGS[name]
    guard = Guard.load(bundle_dir(name))
    assert guard.bundle.flagger.method == cfg.method
    if cfg.bank_max_width:
        assert {r.kind for r in guard.bundle.bank.reductions.values()} == {cfg.bank_reduction}
    assert_same_verdicts(guard, probe_images(task))


@pytest.mark.parametrize("name", ["ensemble-sketch", "gaussian-exact"])
def test_the_native_pass_keeps_the_verdicts(task, bundle_dir, name):
    """`Guard(native_kernels=True)`: the sketch (ensemble-sketch) and the channel means from the C kernel."""
    kernels_or_skip()
    guard = Guard.load(bundle_dir(name), native_kernels=True)
    calls = spy_on_kernels(guard)
    assert_same_verdicts(guard, probe_images(task))
    assert calls["sketch_and_channel_means"] > 0 and calls["one_vs_two_margins"] > 0  # the kernels did the work


def spy_on_kernels(guard: Guard) -> Counter:
    """Count the guard's calls into its native kernels (a test that compared eager with eager would pass too)."""
    calls, kernels = Counter(), guard.recipe.kernels
    assert kernels is not None

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls[name] += 1
                return getattr(kernels, name)(*args)
            return call
    guard.recipe = dataclasses.replace(guard.recipe, kernels=Spy())
    return calls


def test_what_the_kernels_cannot_do_stays_eager(task, bundle_dir):
    """A projected bank is reduced by torch (only the Mahalanobis channel means go native), and a call that
    wants gradients (the adaptive attacks) never reaches the kernels."""
    from semguard.detector.features import one_pass_reductions

    kernels_or_skip()
    guard = Guard.load(bundle_dir("logistic-projection"), native_kernels=True)
    recipe = guard.recipe
    with torch.no_grad():
        acts = guard.tap(task.images[:5]).acts
        sketched, pooled = one_pass_reductions(acts, recipe.bank, recipe.mahalanobis, recipe.kernels)
    assert sketched == {} and set(pooled) == {n for n in recipe.mahalanobis.layers
                                             if recipe.mahalanobis.reduction(n).kind == "channel_pool"} != set()
    with torch.enable_grad():
        assert one_pass_reductions(acts, recipe.bank, recipe.mahalanobis, recipe.kernels) == ({}, {})
    calls = spy_on_kernels(guard)
    assert_same_verdicts(guard, probe_images(task), batches=(32,))
    assert calls["sketch_and_channel_means"] > 0


def test_a_changed_computation_is_caught(task, bundle_dir):
    """The comparison can fail: a guard whose flagger threshold moved by one clean score's gap disagrees."""
    guard = Guard.load(bundle_dir("gaussian-exact"))
    bent = dataclasses.replace(guard.bundle.flagger, center=guard.bundle.flagger.center * (1 + 1e-4))
    guard.bundle = dataclasses.replace(guard.bundle, flagger=bent)
    old_guard = Guard.load(bundle_dir("gaussian-exact"))
    x = probe_images(task)[:32]
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(guard.inspect_arrays(x).score, frozen_verdicts(old_guard, x).score, rtol=SCORE_RTOL)


def test_tiny_worldnet_bundle_keeps_its_verdicts(tmp_path):
    guard = Guard.load(write_worldnet_bundle(tmp_path))
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 1, 1, generator=gen) + 0.2 * torch.rand(6, 10, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).transpose(0, 1)
    images = torch.cat([images.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).clamp(0, 1),
                        torch.rand(12, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)])
    assert_same_verdicts(guard, images)


@pytest.mark.slow
def test_world_bundle_keeps_its_verdicts(tmp_path):
    """The embedded world (shipped weights, copied into tmp) calibrated as `semguard detector calibrate` does,
    on a stratified 1000 of its images (fewer leave the ensemble's held-out tail degenerate, which calibration
    now refuses); verdicts on its test images and their noisy versions."""
    from semguard.cli import main
    from semguard.world import WorldSettings, build_world

    bundle = tmp_path / "bundle"
    assert main(["detector", "calibrate", "--world-cache", str(tmp_path / "world"), "--out", str(bundle),
                 "--max-images", "1000", "--quiet"]) == 0
    world = build_world(WorldSettings(), tmp_path / "world", progress=False)
    test = torch.from_numpy(world.test_images[::100]).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    noisy = (test + 0.1 * torch.randn(test.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    assert_same_verdicts(Guard.load(bundle), torch.cat([test, noisy]), batches=(5, 32))
    kernels_or_skip()  # and with the native pass (its channel means; the world's bank is exact)
    native = Guard.load(bundle, native_kernels=True)
    calls = spy_on_kernels(native)
    assert_same_verdicts(native, torch.cat([test, noisy]), batches=(5, 32))
    assert calls["sketch_and_channel_means"] > 0 and calls["one_vs_two_margins"] > 0
