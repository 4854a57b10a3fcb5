"""What a batch command works on: a model with its preprocessing, labelled images, class names, word vectors."""
if __name__ != "semguard.subject":  # this folder installs as semguard.subject only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.subject, not {__name__}: semguard installs one import name")
