"""GuardSurrogate's forward is the guard's; its backward (BPDA) is non-zero where the exact one is; guard-aware PGD
reaches its target and lowers the guard's score on a tiny calibrated bundle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from semguard.attacks.adaptive import (
    GuardSurrogate,
    straight_through,
    tail_surprise_torch,
)
from semguard.attacks.guard_pgd import GuardAttackConfig, guard_pgd
from semguard.detector.flagger import tail_surprise
from semguard.detector.guard import Guard

from tests.tiny_cnn import write_tiny_ensemble_bundle

N_CLASSES = 6


@pytest.fixture(scope="module")
def tiny_guard(tmp_path_factory):
    """A tiny ensemble bundle (as tests/service/test_score_buckets.py builds it), its clean and noisy images."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("adaptive")
    images, attack = write_tiny_ensemble_bundle(out, N_CLASSES)
    return Guard.load(out), images, attack


def test_surrogate_forward_is_the_guard(tiny_guard):
    guard, images, attack = tiny_guard
    surrogate = GuardSurrogate(guard)
    for x in (images, attack):
        exact = guard.inspect_arrays(x)
        out = surrogate(x.clone().requires_grad_(True))
        np.testing.assert_allclose(out.score.detach().numpy(), exact.score, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out.fraction.detach().numpy(), exact.signature)
        np.testing.assert_allclose(out.margin.detach().numpy(), exact.margin, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(out.logits.argmax(1).numpy(), exact.predicted)
    assert surrogate.members == [("fraction", "margin", "mahalanobis"), ("mahalanobis",)]


def test_surrogate_forward_is_the_guard_for_the_gaussian_flagger(tmp_path):
    from semguard.models.factory import ModelSpec
    from semguard.detector.calibrate import CalibrationConfig
    from semguard.detector.guard import calibrate_guard
    from tests.tiny_cnn import LAYERS, tiny_task

    model, images, labels, words, _ = tiny_task(N_CLASSES, 60)
    calibrate_guard(model, ModelSpec("tiny_cnn_test", {"width": 6, "num_classes": N_CLASSES}), LAYERS,
                    [f"c{i}" for i in range(N_CLASSES)], words, images, labels, tmp_path,
                    config=CalibrationConfig(method="gaussian", per_concept=2, target_fpr=0.1, batch_size=32))
    guard = Guard.load(tmp_path)
    x = images[:20].clone().requires_grad_(True)
    out = GuardSurrogate(guard)(x)
    np.testing.assert_allclose(out.score.detach().numpy(), guard.inspect_arrays(images[:20]).score, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(out.score.sum(), x)
    assert torch.isfinite(g).all() and (g.flatten(1).norm(dim=1) > 0).all()


def test_bpda_gradient_of_the_fraction_is_nonzero_where_the_exact_one_is_zero(tiny_guard):
    guard, images, _ = tiny_guard
    surrogate = GuardSurrogate(guard, temperature=0.05)
    x = images[:16].clone().requires_grad_(True)
    out = surrogate(x)
    (bpda,) = torch.autograd.grad(out.fraction.sum(), x)
    assert torch.isfinite(bpda).all() and (bpda.flatten(1).norm(dim=1) > 0).all()
    margins = torch.linspace(-0.2, 0.2, 9, requires_grad=True)
    exact = (margins > 1e-12).double().mean()  # the guard's step: no gradient at all
    assert not exact.requires_grad
    smooth = straight_through(exact, torch.sigmoid(margins / 0.05).mean())
    assert smooth.item() == exact.item()  # forward: the exact value, bit for bit
    (g,) = torch.autograd.grad(smooth, margins)
    s = torch.sigmoid(margins / 0.05)
    torch.testing.assert_close(g, s * (1 - s) / 0.05 / 9)


def test_tail_surprise_torch_matches_numpy_and_its_gradient_the_slope():
    rng = np.random.default_rng(0)
    ref = np.sort(rng.normal(size=50))
    s = np.r_[rng.normal(scale=2.0, size=200), ref[[0, 10, -1]], ref[-1] + 3.0, ref[0] - 1.0]
    got = tail_surprise_torch(torch.tensor(s), torch.tensor(ref), 0.7).numpy()
    np.testing.assert_allclose(got, tail_surprise(s, ref, 0.7), rtol=1e-12, atol=1e-12)
    x = torch.tensor([ref[-1] + 1.0, ref[0] - 1.0, 0.5 * (ref[20] + ref[21])], requires_grad=True)
    (g,) = torch.autograd.grad(tail_surprise_torch(x, torch.tensor(ref), 0.7).sum(), x)
    m, rank = len(ref), 20.5
    expected = [1 / 0.7, 0.0, 1 / (m - rank) / (ref[21] - ref[20])]  # d/ds -log((m - rank)/(m + 1))
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("mode,objective", [("combined", "score"), ("orthogonal", "score"),
                                            ("combined", "mahalanobis"), ("combined", "signature")])
def test_guard_pgd_reaches_the_target_and_lowers_the_score(tiny_guard, mode, objective):
    guard, images, _ = tiny_guard
    surrogate = GuardSurrogate(guard)
    x = images[:24]
    predicted = guard.inspect_arrays(x).predicted
    targets = torch.as_tensor((predicted + 1) % N_CLASSES)
    cfg = {"eps": 0.3, "step": 0.03, "iterations": 40}
    naive = guard_pgd(surrogate, x, targets, GuardAttackConfig(mode="naive", **cfg))
    adaptive = guard_pgd(surrogate, x, targets, GuardAttackConfig(mode=mode, objective=objective, **cfg))
    assert naive.reached.mean() >= 0.9 and adaptive.reached.mean() >= 0.9
    both = naive.reached & adaptive.reached
    assert np.median(adaptive.score[both]) < np.median(naive.score[both])
    assert adaptive.evaded.mean() >= naive.evaded.mean()
    assert (adaptive.linf <= 0.3 + 1e-6).all()
    assert np.array_equal(adaptive.evaded, adaptive.reached & ~guard.inspect_arrays(adaptive.adversarial).flagged)


def test_l2_and_restarts_stay_in_the_ball(tiny_guard):
    guard, images, _ = tiny_guard
    x = images[:8]
    targets = torch.as_tensor((guard.inspect_arrays(x).predicted + 1) % N_CLASSES)
    res = guard_pgd(GuardSurrogate(guard), x, targets,
                    GuardAttackConfig(mode="orthogonal", norm="l2", eps=1.0, step=0.2, iterations=10, restarts=2))
    assert ((res.adversarial - x).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all() and len(res.traces) == 2


@pytest.mark.parametrize("kwargs,match", [({"mode": "selective"}, "mode must be one of"),
                                          ({"objective": "x"}, "objective must be one of"),
                                          ({"eps": 0.0}, "eps and step must be > 0"),
                                          ({"lambdas": ()}, "lambdas")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuardAttackConfig(**kwargs)
