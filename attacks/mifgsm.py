"""Targeted MI-FGSM: Momentum Iterative Fast Gradient Sign Method, L-inf (Dong et al., CVPR 2018,
"Boosting Adversarial Attacks with Momentum", arXiv:1710.06081).

    g_{t+1} = mu * g_t + grad_t / ||grad_t||_1        (grad of the target's loss, descended)
    x_{t+1} = Proj_{eps ball of x, [0, 1]}(x_t + step * sign(g_{t+1}))

Defaults are the paper's attack on the [0, 1] pixel scale (ARCHITECTURE.md, the method): the authors ran
eps 0.3 and cleverhans' step 0.06 on Inception-v3's [-1, 1] scale, i.e. eps 0.15, step 0.03.
Two backends behind one function: ART's MomentumIterativeMethod (the reference) and a
native batched loop that reproduces it bit for bit: per sample L1 normalisation (ART's
choice; torchattacks' mean |g| drifts apart where momentum nearly cancels), mean
cross-entropy over the batch, step, clip, project in ART's order. The native loop
differentiates with respect to the input only, so it costs ~ iterations x (forward +
input gradient).
"""
from __future__ import annotations

import torch
from torch import nn

from semguard.attacks.common import check_count, check_images_targets, check_positive, eval_mode, linf_step, loss_gradient
from semguard.attacks.registry import register_attack

BACKENDS = ("native", "art")


def l1_normalise(grad: torch.Tensor) -> torch.Tensor:
    """grad (B, ...) / its per-sample L1 norm; zero rows stay zero. ART's arithmetic (multiply by 1/norm)."""
    flat = grad.reshape(len(grad), -1)
    norm1 = torch.linalg.norm(flat, ord=1, dim=1, keepdim=True)
    return (flat * norm1.where(norm1 == 0, 1 / norm1)).reshape(grad.shape)


def _native(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
            eps: float, step: float, decay: float, iterations: int, early_stop: bool = False) -> torch.Tensor:
    x_clean = images.detach()
    x = x_clean.clone()
    momentum = torch.zeros_like(x_clean)
    stopped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for i in range(iterations):
        grad, logits = loss_gradient(model, x, targets, check_classes=i == 0)
        # Targeted: descend the loss of the target class, hence the minus.
        momentum.mul_(decay).add_(l1_normalise(-grad))
        stepped = linf_step(x, momentum, x_clean, eps, step)
        if early_stop:  # an image once assigned to its target stays there, even if a near tie flips back
            stopped |= logits.argmax(1) == targets
            stepped = torch.where(stopped.view(-1, *([1] * (x.ndim - 1))), x, stepped)
        x = stepped
    return x


def _art(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
         eps: float, step: float, decay: float, iterations: int) -> torch.Tensor:
    import numpy as np
    from art.attacks.evasion import MomentumIterativeMethod

    from semguard.attacks.art_backend import make_classifier, run_art_attack

    attack = MomentumIterativeMethod(
        make_classifier(model, images), norm=np.inf, eps=eps, eps_step=step, decay=decay,
        max_iter=iterations, targeted=True, batch_size=len(images), verbose=False,
    )
    return run_art_attack(attack, images, targets)


@register_attack("mifgsm")
def mifgsm(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, eps: float = 0.15,
           step: float = 0.03, decay: float = 1.0, iterations: int = 20, backend: str = "native",
           early_stop: bool = False) -> torch.Tensor:
    """Targeted MI-FGSM adversarial images.

    model: takes (B, 3, H, W) float32 in [0, 1], returns logits (B, n_classes); attacked in eval mode.
    images: (B, 3, H, W) float32 in [0, 1]. targets: (B,) class ids the attack aims for.
    eps: L-inf radius, step: per-iteration step, both on the [0, 1] pixel scale.
    decay: momentum decay mu (>= 0). backend: "native" (batched torch loop, CPU or GPU)
    or "art" (ART's MomentumIterativeMethod; same images bit for bit, slower).
    Returns (B, 3, H, W) float32 on images' device, in [0, 1] and within eps of images.
    The whole batch is one gradient batch (the loss is its mean), as in ART.
    early_stop (native only): each image stops at the first iterate the model assigns to its
    target, the least-perturbed adversarial image on the attack's path (near the decision
    boundary, like C&W's); the others' paths are unchanged (per-sample gradients).
    """
    check_images_targets(images, targets)
    eps, step = check_positive("eps", eps), check_positive("step", step)
    decay = float(decay)
    if not decay >= 0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    iterations = check_count("iterations", iterations)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if early_stop and backend != "native":
        raise ValueError("early_stop needs backend='native' (ART's MomentumIterativeMethod runs every iteration)")
    if len(images) == 0:
        return images.clone()
    with eval_mode(model):
        if backend == "art":
            return _art(model, images, targets.to(images.device), eps, step, decay, iterations)
        return _native(model, images, targets.to(images.device), eps, step, decay, iterations, bool(early_stop))
