"""Hidden attributes of the world's concepts: the one structure that images and text share.

What a superclass shares is mid-level: a shape family (the body's silhouette) and a
part layout (a head, legs, a tail or none). What tells its five classes apart is finer:
the orientation and the period of the stripes that pattern the body. Colour, background, position, scale,
clutter and lighting are nuisances drawn per image (world/render.py), so meaning is
not visible in raw pixels. The corpus (world/corpus.py) describes the same attributes
in words, as text describes the visible properties of real things.
"""
from __future__ import annotations

from dataclasses import dataclass

from semguard.world.taxonomy import SUPERCLASS_NAMES, SUPERCLASS_OF, SUPERCLASSES

SHAPES = ("round", "spiky", "boxy", "hollow", "crossed")  # silhouette families
PARTS = ("plain", "headed", "legged", "tailed")  # part layouts attached to the body
ORIENTATIONS = ("level", "rising", "upright", "falling")  # texture axis at 0, 45, 90, 135 degrees
PERIODS = ("coarse", "fine")  # texture period in pixels, below
PERIOD_PX = {"coarse": 7.0, "fine": 4.5}
ORIENTATION_DEG = {"level": 0.0, "rising": 45.0, "upright": 90.0, "falling": 135.0}
# The 8 (orientation, period) pairs a class can take; classes of one superclass take 5 distinct ones.
_FINE_COMBOS = [(o, p) for p in PERIODS for o in ORIENTATIONS]


@dataclass(frozen=True)
class ConceptAttributes:
    name: str
    superclass: str
    shape: str
    parts: str
    orientation: str
    period: str


def concept_attributes(name: str) -> ConceptAttributes:
    """The hidden attributes of one CIFAR-100 class (fixed by the taxonomy, not by a seed)."""
    if name not in SUPERCLASS_OF:
        raise ValueError(f"name must be a CIFAR-100 class name, got {name!r}")
    sup = SUPERCLASS_OF[name]
    i = SUPERCLASS_NAMES.index(sup)
    j = SUPERCLASSES[sup].index(name)
    # 20 superclasses <-> 20 distinct (shape, parts) pairs; superclasses that share
    # one of the two are partly alike, as related superclasses are in the real world.
    shape, parts = SHAPES[i % 5], PARTS[i // 5]
    # j -> (i + 3j) mod 8 is injective over j = 0..4, so the five classes differ, while
    # each (orientation, period) is shared with classes of other superclasses.
    orientation, period = _FINE_COMBOS[(i + 3 * j) % len(_FINE_COMBOS)]
    return ConceptAttributes(name, sup, shape, parts, orientation, period)
