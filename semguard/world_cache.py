"""Where built worlds are kept: the one default of every command and benchmark that reads a world.

A module of its own with no imports beyond pathlib, so the CLI can name it without importing the
world (torch, gensim); world.inputs takes its DEFAULT_CACHE_DIR from here.
"""
from pathlib import Path

# What `semguard quickstart` builds here, `semguard detector ...`, `semguard attack ...` and the
# benchmarks reuse instead of building the same world again.
DEFAULT_WORLD_CACHE = Path(".semguard/world")
