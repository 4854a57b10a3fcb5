"""Targeted PGD, L-inf (Madry et al., ICLR 2018): ART's ProjectedGradientDescent, used as a second
attack in the detector's evaluation. Thin wrapper: validation here, the algorithm in ART."""
from __future__ import annotations

import torch
from torch import nn

from semguard.attacks.common import check_count, check_images_targets, check_positive, eval_mode
from semguard.attacks.registry import register_attack


@register_attack("pgd")
def pgd(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, eps: float = 0.15,
        step: float = 0.03, iterations: int = 20) -> torch.Tensor:
    """Targeted L-inf PGD from the clean image (no random start, so it is deterministic).

    images (B, 3, H, W) float32 in [0, 1], targets (B,) -> (B, 3, H, W) in [0, 1] within eps.
    """
    check_images_targets(images, targets)
    eps, step = check_positive("eps", eps), check_positive("step", step)
    iterations = check_count("iterations", iterations)
    if len(images) == 0:
        return images.clone()
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescent

    from semguard.attacks.art_backend import make_classifier, run_art_attack

    with eval_mode(model):
        attack = ProjectedGradientDescent(
            make_classifier(model, images), norm=np.inf, eps=eps, eps_step=step, max_iter=iterations,
            targeted=True, num_random_init=0, batch_size=len(images), verbose=False,
        )
        return run_art_attack(attack, images, targets)
