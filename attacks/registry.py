"""ATTACKS: attack name -> callable, filled by the @register_attack decorator (semguard.registry rules).

Every attack has one signature, attack(model, images, targets, **params) -> adversarial
images, with images (B, 3, H, W) float32 in [0, 1] and targets (B,) class ids, so tests and
the batch CLI parametrise over all of them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from semguard.registry import Registry

Attack = Callable[..., torch.Tensor]

ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(name: str) -> Callable[[Attack], Attack]:
    """Decorator: register `fn` as ATTACKS[name]."""
    return ATTACKS.register(name)


def get_attack(name: str) -> Attack:
    """ATTACKS[name], or ValueError naming the known attacks."""
    return ATTACKS.lookup(name)


# The built-in attacks register themselves on import; importing them here, after the registry
# exists, makes ATTACKS complete for whoever imports it.
from semguard.attacks import cw, mifgsm, pgd  # noqa: E402,F401
