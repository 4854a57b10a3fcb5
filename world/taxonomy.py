"""The CIFAR-100 concept hierarchy (Krizhevsky 2009): 100 classes in 20 superclasses.

Names are exactly CIFAR-100's (underscores inside multi-word names), so the world's
labels match real CIFAR-100 labels and word-vector files that use underscores.
"""
from __future__ import annotations

# Superclass -> its five classes, in CIFAR-100's coarse-label order.
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
SUPERCLASS_NAMES: list[str] = list(SUPERCLASSES)
# CIFAR-100's fine labels are numbered in alphabetical order.
CLASS_NAMES: list[str] = sorted(c for members in SUPERCLASSES.values() for c in members)
SUPERCLASS_OF: dict[str, str] = {c: s for s, members in SUPERCLASSES.items() for c in members}
CLASSES_PER_SUPERCLASS = 5


def select_classes(n_classes: int) -> list[str]:
    """The first n_classes // 5 superclasses, all five classes each, in CIFAR-100 label order.

    Whole superclasses keep the within-superclass structure that the world exists
    to show, even in reduced worlds for tests.
    """
    if not (CLASSES_PER_SUPERCLASS <= n_classes <= len(CLASS_NAMES)) or n_classes % CLASSES_PER_SUPERCLASS:
        raise ValueError(f"n_classes must be a multiple of 5 between 5 and 100, got {n_classes}")
    chosen = {c for s in SUPERCLASS_NAMES[: n_classes // CLASSES_PER_SUPERCLASS] for c in SUPERCLASSES[s]}
    return [c for c in CLASS_NAMES if c in chosen]
