"""The embedded world: CIFAR-100-named concepts as synthetic images and a SkipGram corpus."""
from models.worldnet import load_world_model
from world.build import World, WorldSettings, build_world

__all__ = ["World", "WorldSettings", "build_world", "load_world_model"]
