"""Box coordinates: the one place where pixels become Qwen-VL's [0, 1000) grid and back.

Qwen-VL writes boxes as `<box>(x1,y1),(x2,y2)</box>` with integers in [0, 1000): each axis
is divided by the original image's size (before the 448x448 squash). The exact training-time
formula is not published; the workbench uses

    n = min(floor(v / size * 1000), 999)

i.e. truncation, so a pixel coordinate maps to the grid cell that contains it, and the right or
bottom edge (v == size) becomes 999, never 1000. De-normalisation uses the cell's lower edge,
v = n / 1000 * size, which is what the official `draw_bbox_on_latest_picture` does; the
official RefCOCO evaluation divides by 999 instead (`denormalize(..., divisor=999)`).
A round trip pixel -> grid -> pixel is therefore exact to within one grid step (size / 1000).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[float, float, float, float]

GRID = 1000


def normalize_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel (x1, y1, x2, y2) in the original image -> integers in [0, 1000)."""
    x1, y1, x2, y2 = box
    return (_to_grid(x1, width), _to_grid(y1, height), _to_grid(x2, width), _to_grid(y2, height))


def denormalize_box(box: Sequence[float], width: int, height: int, divisor: int = GRID) -> Box:
    """[0, 1000) grid (x1, y1, x2, y2) -> pixels. `divisor=999` reproduces the official eval."""
    x1, y1, x2, y2 = box
    return (x1 / divisor * width, y1 / divisor * height, x2 / divisor * width, y2 / divisor * height)


def format_box(box: Sequence[int]) -> str:
    """(x1, y1, x2, y2) on the grid -> `<box>(x1,y1),(x2,y2)</box>`."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def _to_grid(v: float, size: int) -> int:
    return min(max(math.floor(v / size * GRID), 0), GRID - 1)


def clip_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """Clamp a pixel box into the image (COCO boxes overshoot the border by float noise)."""
    x1, y1, x2, y2 = box
    return [min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height)]
