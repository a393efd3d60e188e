"""Draw pixel boxes with their ref labels on an image (Pillow only, Pillow's bundled font).

The official `draw_bbox_on_latest_picture` downloads SimSun.ttf and picks random colours; here
colours come from a fixed palette indexed by label, so a picture is reproducible and a test can
find a box by its colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from workbench.atomic import atomic_path
from workbench.data.boxes import Box

# Tableau 10 (what the official drawer samples from), as RGB.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def draw_boxes(image: Image.Image, boxes: Sequence[tuple[str | None, Box]],
               colors: Sequence[tuple[int, int, int]] | None = None, width: int | None = None,
               caption: str | None = None) -> Image.Image:
    """A copy of `image` with each (label, pixel box) outlined; one palette colour per label
    unless `colors` gives one per box. `caption` is written in the top-left corner (e.g. "no box")."""
    out = image.convert("RGB")
    pen = ImageDraw.Draw(out)
    width = width or max(1, round(min(out.size) / 200))
    font = ImageFont.load_default(size=max(10, min(out.size) // 30))
    labels: dict[str | None, int] = {}
    for i, (label, box) in enumerate(boxes):
        color = colors[i] if colors else PALETTE[labels.setdefault(label, len(labels)) % len(PALETTE)]
        x1, y1, x2, y2 = box
        pen.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=color, width=width)
        if label:
            left, top, right, bottom = pen.textbbox((x1, y1), label, font=font)
            pen.rectangle((left, top, right, bottom), fill=color)
            pen.text((x1, y1), label, fill=(255, 255, 255), font=font)
    if caption:
        pen.rectangle(pen.textbbox((0, 0), caption, font=font), fill=(0, 0, 0))
        pen.text((0, 0), caption, fill=(255, 255, 255), font=font)
    return out


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as PNG via a temporary file, so a reader never sees half a picture."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
