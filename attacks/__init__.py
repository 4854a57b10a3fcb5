"""Adversarial attacks: target selection, MI-FGSM (+ ART's PGD and C&W L2), attack-set storage, batch generation.

The registry (attacks.registry.ATTACKS) registers every built-in attack when it is imported; the
package itself imports nothing, so its command line can be read without loading torch.
"""
if __name__ != "semguard.attacks":  # this folder installs as semguard.attacks only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.attacks, not {__name__}: semguard installs one import name")
