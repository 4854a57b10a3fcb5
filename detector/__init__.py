"""The core: layer taps, word vectors, RSA statistics, significance, reference bank, signature, flagger, bundle, Guard."""
if __name__ != "semguard.detector":  # this folder installs as semguard.detector only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.detector, not {__name__}: semguard installs one import name")
