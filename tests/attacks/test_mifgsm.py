"""MI-FGSM: the native loop against ART's MomentumIterativeMethod and against a per-sample loop by definition."""
import pytest
import torch
import torch.nn.functional as F

from semguard.attacks.mifgsm import mifgsm
from tests.attacks.tiny import N_CLASSES, tiny_cnn

# |adv - clean| <= eps holds up to the float32 rounding of clean + delta (< 1 ulp at 1.0).
ROUNDING = 2.0**-23


def batch(n: int = 6, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def mifgsm_loop(model, images, targets, eps, step, decay, iterations):
    """Dong et al. 2018, Algorithm 1 (targeted), one sample at a time in float64 numpy where possible."""
    out = []
    for x0, t in zip(images, targets):
        x, g = x0.clone(), torch.zeros_like(x0, dtype=torch.float64)
        for _ in range(iterations):
            xr = x[None].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xr), t[None]), xr)
            grad = -grad[0].double()
            g = decay * g + grad / grad.abs().sum()
            x = x + step * torch.sign(g).float()
            x = torch.minimum(torch.maximum(x.clamp(0, 1), x0 - eps), x0 + eps)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("eps, step, decay, iterations", [(0.15, 0.03, 1.0, 20), (0.05, 0.01, 0.5, 7), (0.3, 0.1, 0.0, 3)])
def test_native_equals_art_bit_for_bit(eps, step, decay, iterations):
    model = tiny_cnn()
    images, targets = batch()
    native = mifgsm(model, images, targets, eps, step, decay, iterations, backend="native")
    art = mifgsm(model, images, targets, eps, step, decay, iterations, backend="art")
    assert art.dtype == native.dtype == torch.float32
    # Observed: identical, max |diff| = 0.0. ART's order of operations is reproduced exactly.
    assert torch.equal(native, art), f"max |diff| {(native - art).abs().max().item()}"


def test_native_matches_definition_loop():
    model = tiny_cnn()
    images, targets = batch(seed=1)
    native = mifgsm(model, images, targets, iterations=10)
    loop = mifgsm_loop(model, images, targets, 0.15, 0.03, 1.0, 10)
    # The loop rounds differently (per sample gradients, float64 momentum), so a sign can flip
    # where momentum nearly cancels; nearly every pixel agrees.
    assert (native - loop).abs().le(1e-5).float().mean() > 0.98


def test_stays_in_ball_and_range_and_hits_targets():
    model = tiny_cnn()
    images, targets = batch(n=16, seed=2)
    adv = mifgsm(model, images, targets)
    assert adv.shape == images.shape
    assert adv.min() >= 0 and adv.max() <= 1
    assert ((adv.double() - images.double()).abs().amax(dim=(1, 2, 3)) <= 0.15 + ROUNDING).all()
    with torch.no_grad():
        assert (model(adv).argmax(1) == targets).float().mean() >= 0.75


def test_early_stop_is_the_first_iterate_that_hits_the_target():
    # Reference by definition: run the plain attack for n = 1, 2, ... iterations and keep, per image,
    # the first iterate the model assigns to the target (the last one if none does).
    model = tiny_cnn()
    images, targets = batch(n=10, seed=3)
    eps, step, iterations = 0.03, 0.005, 6
    got = mifgsm(model, images, targets, eps, step, iterations=iterations, early_stop=True)
    want = mifgsm(model, images, targets, eps, step, iterations=iterations)
    hit_at = torch.full((len(images),), -1)
    for n in range(iterations, -1, -1):  # the earliest hit wins: walk down from the last iterate
        x = images if n == 0 else mifgsm(model, images, targets, eps, step, iterations=n)
        with torch.no_grad():
            hit = model(x).argmax(1) == targets
        want[hit] = x[hit]
        hit_at[hit] = n
    assert ((hit_at > 0) & (hit_at < iterations)).any() and (hit_at == -1).any()  # both cases exercised
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="early_stop needs backend='native'"):
        mifgsm(model, images, targets, early_stop=True, backend="art")


def test_model_mode_restored_and_no_param_grads():
    model = tiny_cnn().train()
    images, targets = batch()
    mifgsm(model, images, targets, iterations=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_empty_batch():
    images, targets = batch(n=0)
    assert mifgsm(tiny_cnn(), images, targets).shape == (0, 3, 12, 12)


@pytest.mark.parametrize("change, match", [
    (dict(eps=0.0), "eps must be"), (dict(eps=-0.1), "eps must be"), (dict(eps=float("nan")), "eps must be"),
    (dict(step=0), "step must be"), (dict(iterations=0), "iterations must be"), (dict(iterations=2.5), "iterations"),
    (dict(decay=-1.0), "decay must be"), (dict(backend="cleverhans"), "backend must be one of"),
])
def test_bad_parameters(change, match):
    images, targets = batch()
    with pytest.raises(ValueError, match=match):
        mifgsm(tiny_cnn(), images, targets, **change)


def test_bad_inputs():
    model = tiny_cnn()
    images, targets = batch()
    with pytest.raises(ValueError, match=r"images must lie in \[0.0, 1.0\]"):
        mifgsm(model, images * 2, targets)
    with pytest.raises(ValueError, match="images contain NaN"):
        mifgsm(model, torch.where(images > 0.5, torch.nan, images), targets)
    with pytest.raises(ValueError, match="images must be a float32 tensor"):
        mifgsm(model, images[0], targets)
    with pytest.raises(ValueError, match="images must be a float32 tensor"):
        mifgsm(model, images.double(), targets)
    with pytest.raises(ValueError, match=r"targets must have shape \(6,\)"):
        mifgsm(model, images, targets[:3])
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        mifgsm(model, images, targets.float())
    with pytest.raises(ValueError, match="targets must be class ids < 12"):
        mifgsm(model, images, targets + 100)
