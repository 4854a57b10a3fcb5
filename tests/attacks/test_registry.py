"""Every registered attack honours the uniform signature attack(model, images, targets, **params)."""
import pytest
import torch

from semguard.attacks.registry import ATTACKS, get_attack, register_attack
from tests.attacks.tiny import N_CLASSES, tiny_cnn

FAST = {"mifgsm": dict(iterations=3), "pgd": dict(iterations=3), "cw_l2": dict(iterations=3, binary_search_steps=2)}


def test_known_attacks():
    assert {"mifgsm", "pgd", "cw_l2"} <= set(ATTACKS)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_uniform_signature(name):
    g = torch.Generator().manual_seed(0)
    images, targets = torch.rand(4, 3, 12, 12, generator=g), torch.randint(0, N_CLASSES, (4,), generator=g)
    adv = ATTACKS[name](tiny_cnn(), images, targets, **FAST.get(name, {}))
    assert adv.shape == images.shape and adv.dtype == torch.float32
    assert adv.min() >= 0 and adv.max() <= 1
    with pytest.raises(ValueError, match=r"images must lie in"):
        ATTACKS[name](tiny_cnn(), images + 1, targets)


def test_unknown_attack_lists_known():
    with pytest.raises(ValueError, match=r"unknown attack 'fgsm'; known attacks: \[.*'mifgsm'"):
        get_attack("fgsm")
    with pytest.raises(KeyError, match="known attacks"):
        ATTACKS["fgsm"]


def test_register_twice_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_attack("mifgsm")(lambda *a, **k: None)
