"""COCO instances JSON (`images`, `annotations` with [x, y, w, h] pixel boxes, `categories`)
-> structured samples. Category names become the refs.

Tasks:
  grounding          one sample per (image, category): "where is <cat>?" -> all its boxes
  detection          one sample per image: every category with its boxes
  caption-grounding  one sample per image: a sentence listing the grounded categories
Crowd annotations (`iscrowd: 1`, one box around a group) and zero-area boxes are skipped and
counted; boxes overshooting the border are clipped to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from workbench.data.boxes import clip_box
from workbench.data.convert import (
    grounded_sample,
    image_ref,
    image_size,
    read_json,
    write_jsonl,
)
from workbench.errors import DataError
from workbench.prompt import load_task_template

TASKS = ("grounding", "detection", "caption-grounding")


@dataclass
class LabelledImage:
    """One image with its pixel boxes (x1, y1, x2, y2) grouped by category, in category order."""

    path: Path
    width: int
    height: int
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)


def convert_coco(annotations: str | Path, images: str | Path, out: str | Path, task: str = "grounding",
                 image_root: str | Path | None = None) -> dict:
    """Convert a COCO annotation file; returns a summary (counts of samples and skipped boxes).

    Image paths are written relative to `image_root` (default: the output file's folder).
    """
    labelled, stats = read_coco(read_json(annotations), file=str(annotations), images_dir=Path(images))
    root = Path(image_root) if image_root else Path(out).parent
    stats["samples"] = write_jsonl(labelled_samples(labelled, task, root), out)
    return stats


def read_coco(coco: object, *, file: str, images_dir: Path) -> tuple[list[LabelledImage], dict]:
    """Validate a parsed COCO dict and group its boxes per image and category."""
    if not isinstance(coco, dict):
        raise DataError("expected a COCO object with 'images', 'annotations', 'categories'", file=file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"missing list '{key}' (not a COCO instances file?)", file=file, field=key)
    names = {}
    for i, cat in enumerate(coco["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise DataError("a category needs 'id' and 'name'", file=file, record=i, field="categories")
        names[cat["id"]] = cat["name"]
    by_id: dict = {}
    for i, entry in enumerate(coco["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise DataError("an image needs 'id' and 'file_name'", file=file, record=i, field="images")
        path = images_dir / entry["file_name"]
        size = image_size(path, file=file, record=i, field="images.file_name")
        by_id[entry["id"]] = LabelledImage(path, *size)
    stats = {"images": len(by_id), "skipped_crowd": 0, "skipped_empty_boxes": 0, "clipped": 0}
    used = set()
    for i, ann in enumerate(coco["annotations"]):
        image, name, box = _check_annotation(ann, by_id, names, file=file, record=i)
        if ann.get("iscrowd", 0):
            stats["skipped_crowd"] += 1
            continue
        clipped = clip_box(box, image.width, image.height)
        stats["clipped"] += clipped != box
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            stats["skipped_empty_boxes"] += 1
            continue
        image.boxes.setdefault(name, []).append(clipped)
        used.add(name)
    order = {name: k for k, name in enumerate(names.values())}
    for image in by_id.values():
        image.boxes = dict(sorted(image.boxes.items(), key=lambda kv: order[kv[0]]))
    stats["categories_without_instances"] = [n for n in names.values() if n not in used]
    return list(by_id.values()), stats


def _check_annotation(ann: object, images: dict, names: dict, *, file: str, record: int):
    if not isinstance(ann, dict):
        raise DataError("an annotation must be an object", file=file, record=record, field="annotations")
    if ann.get("image_id") not in images:
        raise DataError(f"unknown image_id {ann.get('image_id')!r}", file=file, record=record,
                        field="annotations.image_id")
    if ann.get("category_id") not in names:
        raise DataError(f"unknown category_id {ann.get('category_id')!r}", file=file, record=record,
                        field="annotations.category_id")
    bbox = ann.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)
            or bbox[2] < 0 or bbox[3] < 0):
        raise DataError(f"bbox must be [x, y, w, h] with w, h >= 0, got {bbox!r}", file=file, record=record,
                        field="annotations.bbox")
    x, y, w, h = bbox
    return images[ann["image_id"]], names[ann["category_id"]], [x, y, x + w, y + h]


def labelled_samples(images: list[LabelledImage], task: str, image_root: Path) -> Iterator[dict]:
    """Structured samples for `task` from labelled images (shared by the COCO and YOLO converters)."""
    if task not in TASKS:
        raise DataError(f"unknown task '{task}', expected one of {', '.join(TASKS)}", field="task")
    template = load_task_template(task)
    n = 0
    for image in images:
        path = image_ref(image.path, image_root)
        if task == "grounding":
            for name, boxes in image.boxes.items():
                # the category is the ref here; meta.category gives evaluation its per-category rows
                yield grounded_sample(path, template.messages(n), [(name, boxes)], {"category": name})
                n += 1
        elif image.boxes:  # an image without objects has nothing to detect or ground
            pairs = ["<ref-object><bbox>"] * len(image.boxes)
            fields = {"objects": "".join(pairs)} if task == "detection" else {"caption": _caption(pairs)}
            yield grounded_sample(path, template.messages(n, **fields), list(image.boxes.items()))
            n += 1


def _caption(pairs: list[str]) -> str:
    listed = pairs[0] if len(pairs) == 1 else ", ".join(pairs[:-1]) + " and " + pairs[-1]
    return f"The picture shows {listed}."
