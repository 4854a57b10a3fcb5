"""The guard service: gRPC servicers (Open Inference Protocol + semguard.v1), dynamic batcher, metrics."""
if __name__ != "semguard.service":  # this folder installs as semguard.service only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.service, not {__name__}: semguard installs one import name")
