"""The embedded world: CIFAR-100-named concepts as synthetic images and a SkipGram corpus."""
if __name__ != "semguard.world":  # this folder installs as semguard.world only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.world, not {__name__}: semguard installs one import name")
from semguard.models.worldnet import load_world_model
from semguard.world.build import World, WorldSettings, build_world

__all__ = ["World", "WorldSettings", "build_world", "load_world_model"]
