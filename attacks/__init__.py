"""Adversarial attacks: target selection, MI-FGSM (+ ART's PGD and C&W L2), attack-set storage, batch generation.

Importing the package registers every attack in attacks.registry.ATTACKS.
"""
from attacks import cw, mifgsm, pgd  # noqa: F401  (registration side effect)
from attacks.registry import ATTACKS, get_attack, register_attack  # noqa: F401
