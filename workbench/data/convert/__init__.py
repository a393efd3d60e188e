"""Converters from public annotation formats (COCO, RefCOCO, YOLO) to the structured format.

Every converter writes pixel boxes (x1, y1, x2, y2) on the original image, so nothing is lost;
`data/boxes.py` maps them to Qwen-VL's grid when samples are rendered. `structured_to_coco` is
the inverse (structured samples -> COCO [x, y, w, h] pixel boxes), used to check round trips.
This module holds what the converters share: reading inputs, the sample layout, writing. Prompts
come from the task templates in data_templates/ (`render.load_task_template`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from workbench.data.boxes import denormalize_box
from workbench.errors import DataError


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or broken file is a DataError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("file not found", file=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"not valid JSON ({err})", file=str(path)) from None


def image_size(path: Path, *, file: str, record: int, field: str) -> tuple[int, int]:
    """(width, height) from the image header only (PIL opens lazily)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"cannot open image {path} ({err})", file=file, record=record, field=field) from None


def grounded_sample(image: str, messages: list[dict], objects: Sequence[tuple[str, list]],
                    meta: dict | None = None) -> dict:
    """One structured sample: `objects` are (ref, pixel boxes) filling `<ref-object>`/`<bbox>` in order."""
    sample = {
        "images": [image],
        "messages": messages,
        "objects": [{"ref": ref, "bbox": boxes[0] if len(boxes) == 1 else boxes} for ref, boxes in objects],
        "bbox_format": "pixel",
    }
    if meta:
        sample["meta"] = meta
    return sample


def clip_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """Clamp a pixel box into the image (COCO boxes overshoot the border by float noise)."""
    x1, y1, x2, y2 = box
    return [min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height)]


def image_ref(path: Path, root: Path) -> str:
    """How a sample names its image: relative to `root`, the image root the loader will use
    (data.image_root, by default the data file's folder)."""
    return os.path.relpath(path.resolve(), root.resolve())


def write_jsonl(samples: Iterable[dict], out: str | Path) -> int:
    """Write samples one per line via a temporary file; returns the count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    n = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for sample in samples:
                fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
                n += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # samples are generated lazily: a bad record fails mid-write
        raise
    os.replace(tmp, out)
    return n


def structured_to_coco(samples: Iterable[dict], root: str | Path) -> dict:
    """Inverse of the converters: structured samples -> COCO dict with [x, y, w, h] pixel boxes.

    Refs become categories; image paths are resolved against `root` (the JSONL's folder).
    """
    images: dict[str, dict] = {}
    categories: dict[str, int] = {}
    annotations = []
    for sample in samples:
        path = sample["images"][0]
        if path not in images:
            with Image.open(Path(root) / path) as im:
                images[path] = {"id": len(images), "file_name": path, "width": im.width, "height": im.height}
        info = images[path]
        for obj in sample.get("objects", []):
            boxes = obj["bbox"] if isinstance(obj["bbox"][0], (list, tuple)) else [obj["bbox"]]
            for box in boxes:
                if sample.get("bbox_format", "pixel") == "norm1000":
                    box = denormalize_box(box, info["width"], info["height"])
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations), "image_id": info["id"],
                                    "category_id": categories.setdefault(obj["ref"], len(categories)),
                                    "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return {"images": list(images.values()), "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in categories.items()]}

