"""Natural variants of a small photo folder, for calibrating and checking a guard where real photos are few.

Run: python benchmarks/photo_variants.py SRC DST --per-photo 10 --seed 1

SRC holds class folders of photos (e.g. foolbox's 20 ImageNet photos as benchmarks/real_assets.py lays them
out); DST gets, per photo, --per-photo random crops (60-100% of the area, aspect 3/4 to 4/3) each flipped
left-right with probability 1/2, as JPEG in the same class folders. Two seeds give two disjoint sets of
variants (one to calibrate on, one held out). Variants of one photo are not independent images: a figure
measured on them says how a guard behaves on views of those scenes, not on new ones.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png")


def crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    for _ in range(20):
        area = rng.uniform(0.6, 1.0) * width * height
        aspect = rng.uniform(3 / 4, 4 / 3)
        w, h = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if w <= width and h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    return 0, 0, width, height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--per-photo", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    photos = sorted(p for p in args.src.glob("*/*") if p.suffix.lower() in SUFFIXES)
    if not photos:
        raise SystemExit(f"{args.src}: no photos in class folders ({', '.join(SUFFIXES)})")
    rng = random.Random(args.seed)
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        (args.dst / photo.parent.name).mkdir(parents=True, exist_ok=True)
        for i in range(args.per_photo):
            variant = image.crop(crop_box(*image.size, rng))
            if rng.random() < 0.5:
                variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            variant.save(args.dst / photo.parent.name / f"{photo.stem}_{args.seed}_{i}.jpg", quality=95)
    print(f"{len(photos) * args.per_photo} variants of {len(photos)} photos in {args.dst}")


if __name__ == "__main__":
    main()
