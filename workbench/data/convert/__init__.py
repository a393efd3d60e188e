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

from workbench.atomic import atomic_path
from workbench.data.boxes import denormalize_box
from workbench.errors import DataError, WorkbenchError
from workbench.model.image_processing import read_image_size


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or broken file is a DataError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("file not found", file=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"not valid JSON ({err})", file=str(path)) from None


def image_size(path: Path, *, file: str, record: int, field: str) -> tuple[int, int]:
    """(width, height) from the image header."""
    try:
        return read_image_size(path)
    except WorkbenchError as err:
        raise DataError(str(err), file=file, record=record, field=field) from None


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


def image_ref(path: Path, root: Path) -> str:
    """How a sample names its image: relative to `root`, the image root the loader will use
    (data.image_root, by default the data file's folder)."""
    return os.path.relpath(path.resolve(), root.resolve())


def write_jsonl(samples: Iterable[dict], out: str | Path) -> int:
    """Write samples one per line via a temporary file; returns the count."""
    n = 0
    # samples are generated lazily: a bad record fails mid-write, and the partial file goes
    with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
            n += 1
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
            width, height = read_image_size(Path(root) / path)
            images[path] = {"id": len(images), "file_name": path, "width": width, "height": height}
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

