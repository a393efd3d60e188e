"""YOLO labels -> structured samples (same tasks as the COCO converter).

A label file `LABELS/<relative image path>.txt` holds one object per line:
`class cx cy w h` normalised to [0, 1], or a segmentation polygon `class x1 y1 x2 y2 ...` whose
bounding box is taken. An image without a label file has no objects. Class names come from a
`data.yaml` (`names:` list or {id: name}) or a text file with one name per line.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from workbench.data.boxes import clip_box
from workbench.data.convert import image_size, write_jsonl
from workbench.data.convert.coco import LabelledImage, labelled_samples
from workbench.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def convert_yolo(labels: str | Path, images: str | Path, names: str | Path, out: str | Path,
                 task: str = "grounding", image_root: str | Path | None = None) -> dict:
    """Convert a YOLO dataset split; returns a summary. Paths as in `convert_coco`."""
    labelled, stats = read_yolo(Path(labels), Path(images), read_names(Path(names)))
    root = Path(image_root) if image_root else Path(out).parent
    stats["samples"] = write_jsonl(labelled_samples(labelled, task, root), out)
    return stats


def read_names(path: Path) -> list[str]:
    """Class names by id from data.yaml (`names`) or a one-name-per-line text file."""
    if not path.exists():
        raise DataError("class names file not found", file=str(path))
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".yaml", ".yml"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    names = (yaml.safe_load(text) or {}).get("names")
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError("expected 'names': a list of class names or {0: name, 1: name, ...}", file=str(path),
                        field="names")
    return names


def read_yolo(labels_dir: Path, images_dir: Path, names: list[str]) -> tuple[list[LabelledImage], dict]:
    """Every image under `images_dir` with its boxes in pixels, grouped by class in class order."""
    paths = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images under {images_dir}", file=str(images_dir))
    stats = {"images": len(paths), "skipped_empty_boxes": 0, "clipped": 0}
    used, images = set(), []
    label_files = {p.resolve() for p in labels_dir.rglob("*.txt")}
    for path in paths:
        label = (labels_dir / path.relative_to(images_dir)).with_suffix(".txt")
        label_files.discard(label.resolve())
        width, height = image_size(path, file=str(path), record=0, field="image")
        image = LabelledImage(path, width, height)
        for cls, box in _read_label(label, names, width, height):
            clipped = clip_box(box, width, height)
            stats["clipped"] += clipped != box
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                stats["skipped_empty_boxes"] += 1
                continue
            image.boxes.setdefault(names[cls], []).append(clipped)
            used.add(names[cls])
        image.boxes = dict(sorted(image.boxes.items(), key=lambda kv: names.index(kv[0])))
        images.append(image)
    stats["labels_without_image"] = sorted(str(p) for p in label_files)
    stats["categories_without_instances"] = [n for n in names if n not in used]
    return images, stats


def _read_label(label: Path, names: list[str], width: int, height: int):
    """(class id, pixel box) per line of one label file; none if there is no file."""
    if not label.exists():
        return
    for line_no, line in enumerate(label.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, values = int(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            raise DataError(f"expected 'class cx cy w h' numbers, got {line!r}", file=str(label),
                            record=line_no) from None
        if not 0 <= cls < len(names):
            raise DataError(f"class {cls} is not in the {len(names)} names", file=str(label), record=line_no,
                            field="class")
        if len(values) == 4:
            cx, cy, w, h = values
            if w < 0 or h < 0:
                raise DataError("negative box width or height", file=str(label), record=line_no)
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        elif len(values) >= 6 and len(values) % 2 == 0:  # segmentation polygon
            xs, ys = values[0::2], values[1::2]
            box = [min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height]
        else:
            raise DataError(f"expected 4 box values or an x,y polygon after the class, got {len(values)}",
                            file=str(label), record=line_no)
        yield cls, box
