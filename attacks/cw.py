"""Targeted Carlini-Wagner L2 (Carlini & Wagner, IEEE S&P 2017): ART's CarliniL2Method, used as a
second attack in the detector's evaluation. Thin wrapper: validation here, the algorithm in ART."""
from __future__ import annotations

import torch
from torch import nn

from semguard.attacks.common import check_count, check_images_targets, check_positive, eval_mode
from semguard.attacks.registry import register_attack


@register_attack("cw_l2")
def cw_l2(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, confidence: float = 0.0,
          learning_rate: float = 0.01, binary_search_steps: int = 10, iterations: int = 10,
          initial_const: float = 0.01) -> torch.Tensor:
    """Targeted C&W L2 (ART defaults). images (B, 3, H, W) float32 in [0, 1], targets (B,) -> same shape in [0, 1].

    Unbounded in L-inf (it minimises the L2 norm instead); images it cannot move to the
    target come back unchanged.
    """
    check_images_targets(images, targets)
    learning_rate = check_positive("learning_rate", learning_rate)
    if confidence < 0:
        raise ValueError(f"confidence must be >= 0, got {confidence}")
    binary_search_steps, iterations = check_count("binary_search_steps", binary_search_steps), check_count("iterations", iterations)
    if len(images) == 0:
        return images.clone()
    from art.attacks.evasion import CarliniL2Method

    from semguard.attacks.art_backend import make_classifier, run_art_attack

    with eval_mode(model):
        attack = CarliniL2Method(
            make_classifier(model, images), confidence=float(confidence), targeted=True,
            learning_rate=learning_rate, binary_search_steps=binary_search_steps,
            max_iter=iterations, initial_const=float(initial_const), batch_size=len(images), verbose=False,
        )
        return run_art_attack(attack, images, targets)
