"""The embedded world: CIFAR-100-named concepts as synthetic images and a SkipGram corpus."""
if __name__ != "semguard.world":  # this folder installs as semguard.world only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.world, not {__name__}: semguard installs one import name")

__all__ = ["World", "WorldSettings", "build_world", "load_world_model"]


def __getattr__(name: str):
    # Imported on first use (PEP 562), so that `semguard --help` and `semguard serve` need not load
    # torch through `semguard world`'s command line.
    if name == "load_world_model":
        from semguard.models.worldnet import load_world_model
        return load_world_model
    if name in __all__:
        from semguard.world import build
        return getattr(build, name)
    raise AttributeError(f"module 'semguard.world' has no attribute {name!r}")
