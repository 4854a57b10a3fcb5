"""ATTACKS: attack name -> callable, filled by the @register_attack decorator (timm-style registry).

Every attack has one signature, attack(model, images, targets, **params) -> adversarial
images, with images (B, 3, H, W) float32 in [0, 1] and targets (B,) class ids, so tests and
the batch CLI parametrise over all of them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Attack = Callable[..., torch.Tensor]


class _Registry(dict):
    """A dict whose unknown keys fail listing the known ones."""

    def __missing__(self, name: str) -> Attack:
        raise KeyError(f"unknown attack {name!r}; known attacks: {sorted(self)}")


ATTACKS: dict[str, Attack] = _Registry()


def register_attack(name: str) -> Callable[[Attack], Attack]:
    """Decorator: register `fn` as ATTACKS[name]; a name can be registered once."""

    def add(fn: Attack) -> Attack:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is already registered")
        ATTACKS[name] = fn
        return fn

    return add


def get_attack(name: str) -> Attack:
    """ATTACKS[name], or ValueError naming the known attacks."""
    if name not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}, got {name!r}")
    return ATTACKS[name]
