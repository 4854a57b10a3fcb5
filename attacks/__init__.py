"""Adversarial attacks: target selection, MI-FGSM (+ ART's PGD and C&W L2), attack-set storage, batch generation.

Importing the package registers every attack in attacks.registry.ATTACKS.
"""
if __name__ != "semguard.attacks":  # this folder installs as semguard.attacks only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.attacks, not {__name__}: semguard installs one import name")
from semguard.attacks import cw, mifgsm, pgd  # noqa: F401  (registration side effect)
from semguard.attacks.registry import ATTACKS, get_attack, register_attack  # noqa: F401
