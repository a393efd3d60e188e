"""A synthetic grounding data set: coloured shapes on textured backgrounds, one sample per shape.

Used by `workbench demo` and the grounding tests, so both run with nothing downloaded. Images
have different sizes (boxes are normalised by each image's own size), shapes never overlap,
and the colours in an image are all different, so "the red triangle" names one box.
Samples are written in the structured format with the grounding task template's prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from workbench.atomic import write_text
from workbench.prompt import load_task_template

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
# The phrases' words, for a vocabulary that makes each one token (`the red triangle`: 3 ids).
WORDS = ("the", *(f" {word}" for word in (*COLOURS, *SHAPES)))


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Muted noise plus stripes: texture the model must learn to ignore."""
    base = rng.randint(90, 150)
    image = Image.new("RGB", (width, height), (base, base, base))
    draw = ImageDraw.Draw(image)
    step = rng.randint(6, 14)
    for x in range(-height, width, step):
        shade = base + rng.randint(-25, 25)
        draw.line([(x, 0), (x + height, height)], fill=(shade, shade, shade), width=2)
    # Drawn from the seeded rng: PIL's effect_noise uses C rand(), whose state depends on what
    # else ran in the process, so the same seed gave different images from one test to the next.
    pixels = np.random.default_rng(rng.getrandbits(64)).normal(128, 20, (height, width))
    noise = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert("RGB")
    return Image.blend(image, noise, 0.15)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x1, y1, x2, y2 = box
    if shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)


def _place(rng: random.Random, width: int, height: int, taken: list[tuple[int, int, int, int]],
           min_frac: float, max_frac: float) -> tuple[int, int, int, int] | None:
    for _ in range(50):
        side = int(min(width, height) * rng.uniform(min_frac, max_frac))
        x1, y1 = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (x1, y1, x1 + side, y1 + side)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return None


def make_shapes_dataset(out_dir: str | Path, n_images: int, *, shapes_per_image: tuple[int, int] = (1, 3),
                        size_range: tuple[int, int] = (96, 160), shape_frac: tuple[float, float] = (0.3, 0.55),
                        seed: int = 0, name: str = "train", template: str = "grounding") -> Path:
    """Write `out_dir/images/*.png` and `out_dir/{name}.jsonl`; returns the JSONL path."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    prompts = load_task_template(template)
    records = []
    for i in range(n_images):
        width, height = rng.randint(*size_range), rng.randint(*size_range)
        image = _background(rng, width, height)
        draw = ImageDraw.Draw(image)
        colours = rng.sample(list(COLOURS), rng.randint(*shapes_per_image))
        pairs = [(colour, rng.choice(SHAPES)) for colour in colours]
        taken, objects = [], []
        for colour, shape in pairs:
            box = _place(rng, width, height, taken, *shape_frac)
            if box is not None:
                taken.append(box)
                _draw_shape(draw, shape, box, COLOURS[colour])
                objects.append((shape, {"ref": f"the {colour} {shape}", "bbox": list(box)}))
        split = f"{len(objects)} shape" + "s" * (len(objects) > 1)  # eval reports Acc per split
        for shape, obj in objects:
            records.append({"images": [f"images/{name}-{i:04d}.png"], "messages": prompts.messages(len(records)),
                            "objects": [obj], "meta": {"split": split, "category": shape}})
        image.save(out_dir / "images" / f"{name}-{i:04d}.png")
    path = out_dir / f"{name}.jsonl"
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path
