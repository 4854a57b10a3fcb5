"""Architectures: WorldNet (the embedded world's CNN) and torchvision classifiers with their normalisation inside."""
if __name__ != "semguard.models":  # this folder installs as semguard.models only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.models, not {__name__}: semguard installs one import name")
