"""A small synthetic 5-class "flowers" folder, drawn with PIL, for the offline demo and tests.

These are cartoons, not photographs: each class is a shape and palette
(white daisies, spiky yellow dandelions, layered red roses, big sunflowers
with brown centres, cup-shaped tulips) at a random place, size, angle and
background. They let train.py and predict.py run end to end on a machine
with no network; they say nothing about accuracy on flower_photos.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def _petals(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, count: int,
            width: float, colour: tuple, rotation: float) -> None:
    for i in range(count):
        angle = rotation + 2 * math.pi * i / count
        px, py = cx + math.cos(angle) * radius * 0.55, cy + math.sin(angle) * radius * 0.55
        half = radius * 0.45
        draw.ellipse([px - half * width, py - half * width, px + half * width, py + half * width],
                     fill=colour)
        draw.line([cx, cy, cx + math.cos(angle) * radius, cy + math.sin(angle) * radius],
                  fill=colour, width=max(int(radius * width * 0.6), 1))


def _draw_flower(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                 rng: random.Random) -> None:
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "daisy":
        _petals(draw, cx, cy, r, rng.randint(11, 16), 0.35, (245, 245, 240), rot)
        draw.ellipse([cx - r * 0.25, cy - r * 0.25, cx + r * 0.25, cy + r * 0.25],
                     fill=(240, 200, 30))
    elif kind == "dandelion":
        for i in range(rng.randint(40, 60)):
            angle = rot + 2 * math.pi * i / 50 + rng.uniform(-0.05, 0.05)
            length = r * rng.uniform(0.7, 1.0)
            draw.line([cx, cy, cx + math.cos(angle) * length, cy + math.sin(angle) * length],
                      fill=(250, 215 + rng.randint(-20, 20), 20), width=2)
    elif kind == "roses":
        red = (rng.randint(170, 230), rng.randint(10, 40), rng.randint(30, 60))
        for step in range(5):
            s = r * (1 - step * 0.18)
            shade = tuple(max(c - step * 25, 0) for c in red)
            draw.ellipse([cx - s, cy - s * 0.9, cx + s, cy + s * 0.9], fill=shade,
                         outline=(90, 0, 20))
    elif kind == "sunflowers":
        _petals(draw, cx, cy, r, rng.randint(18, 24), 0.3, (255, 200, 0), rot)
        draw.ellipse([cx - r * 0.45, cy - r * 0.45, cx + r * 0.45, cy + r * 0.45],
                     fill=(90, 50, 20))
    elif kind == "tulips":
        colour = rng.choice([(230, 60, 120), (200, 30, 50), (150, 60, 200), (250, 140, 40)])
        draw.line([cx, cy, cx, cy + r * 2], fill=(40, 140, 40), width=max(int(r * 0.15), 2))
        draw.chord([cx - r * 0.7, cy - r * 0.9, cx + r * 0.7, cy + r * 0.7], 0, 180, fill=colour)
        for dx in (-0.45, 0.0, 0.45):
            draw.polygon([(cx + (dx - 0.25) * r, cy - r * 0.1), (cx + dx * r, cy - r * 0.9),
                          (cx + (dx + 0.25) * r, cy - r * 0.1)], fill=colour)
    else:
        raise ValueError(f"unknown flower class {kind!r}")


def draw_image(kind: str, rng: random.Random, size: int = 96) -> Image.Image:
    """One synthetic image of class `kind`."""
    sky = (rng.randint(90, 160), rng.randint(140, 200), rng.randint(200, 250))
    grass = (rng.randint(30, 80), rng.randint(100, 160), rng.randint(30, 70))
    img = Image.new("RGB", (size, size), sky)
    draw = ImageDraw.Draw(img)
    horizon = rng.uniform(0.4, 0.8) * size
    draw.rectangle([0, horizon, size, size], fill=grass)
    for _ in range(rng.randint(1, 3)):
        r = rng.uniform(0.15, 0.3) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        _draw_flower(draw, kind, cx, cy, r, rng)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def make_demo_flowers(root: str | Path, per_class: int = 100, size: int = 96,
                      seed: int = 0) -> Path:
    """Write `per_class` JPEGs per class under root/<class>/; the same files for the same seed.

    Returns root. Files already there are kept, so a second call costs nothing.
    """
    root = Path(root)
    for label, kind in enumerate(CLASSES):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{kind}_{i:04d}.jpg"
            if path.exists():
                continue
            rng = random.Random(seed * 1_000_003 + label * 10_007 + i)
            tmp = path.with_suffix(".tmp")
            draw_image(kind, rng, size).save(tmp, format="JPEG", quality=90)
            tmp.replace(path)  # never leave a half-written image that looks finished
    return root
