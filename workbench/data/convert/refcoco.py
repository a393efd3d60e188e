"""RefCOCO / RefCOCO+ / RefCOCOg -> structured samples, one per referring sentence.

Accepted JSON forms (pickles are never opened: convert `refs(*).p` to JSON first):
  * refs list (the `refer` API's refs: `image_id`, `ann_id`, `split`, `sentences[].sent`,
    optional `category_id`, `ref_id`) plus `--instances instances.json` (COCO images and
    annotations, [x, y, w, h] pixel boxes);
  * one object holding `refs` and the COCO `images`, `annotations`, optional `categories`;
  * the official Qwen-VL evaluation JSONL (`image`, `sent`, `bbox` pixel [x1, y1, x2, y2],
    `height`, `width`), one line per sentence.
Each sample carries `meta: {split, category, ref_id}` for per-split / per-category metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from workbench.data.boxes import clip_box
from workbench.data.convert import (
    grounded_sample,
    image_ref,
    image_size,
    read_json,
    write_jsonl,
)
from workbench.data.records import iter_rows, refcoco_eval_row
from workbench.errors import DataError
from workbench.prompt import load_task_template


def convert_refcoco(refs: str | Path, images: str | Path, out: str | Path, instances: str | Path | None = None,
                    splits: list[str] | None = None, image_root: str | Path | None = None) -> dict:
    """Convert one RefCOCO-family file (optionally keeping only `splits`); returns a summary.

    Image paths are written relative to `image_root` (default: the output file's folder).
    """
    refs, root = Path(refs), Path(image_root) if image_root else Path(out).parent
    # A referring expression is grounded like a category name: "<ref>the man on the left</ref><box>".
    template = load_task_template("grounding")
    if refs.suffix == ".jsonl":
        items = official_items(refs, Path(images))
    else:
        items = refer_items(refs, Path(images), instances)
    stats = {"samples": 0, "skipped_split": 0}

    def samples() -> Iterator[dict]:
        for path, sent, box, meta in items:
            if splits and meta.get("split") not in splits:
                stats["skipped_split"] += 1
                continue
            yield grounded_sample(image_ref(path, root), template.messages(stats["samples"]), [(sent, [box])], meta)
            stats["samples"] += 1

    write_jsonl(samples(), out)
    return stats


def refer_items(refs_file: Path, images_dir: Path, instances: str | Path | None) -> Iterator[tuple]:
    """(image path, sentence, pixel box, meta) for every sentence of a refer-style refs file."""
    data = read_json(refs_file)
    coco_file = str(instances or refs_file)
    if isinstance(data, dict) and "refs" in data:
        refs, coco = data["refs"], data
    elif isinstance(data, list):
        if instances is None:
            raise DataError("a refs list needs --instances (the COCO instances.json with the boxes)",
                            file=str(refs_file))
        refs, coco = data, read_json(instances)
    else:
        raise DataError("expected a refs list or an object with 'refs'", file=str(refs_file))
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations")):
        raise DataError("expected COCO 'images' and 'annotations' lists", file=coco_file)
    images = {im.get("id"): im for im in coco["images"] if isinstance(im, dict)}
    anns = {a.get("id"): a for a in coco["annotations"] if isinstance(a, dict)}
    names = {c.get("id"): c.get("name") for c in coco.get("categories", []) if isinstance(c, dict)}
    sizes: dict = {}
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise DataError("a ref must be an object", file=str(refs_file), record=i)
        ann = anns.get(ref.get("ann_id"))
        if ann is None:
            raise DataError(f"unknown ann_id {ref.get('ann_id')!r}", file=str(refs_file), record=i, field="ann_id")
        image = images.get(ref.get("image_id", ann.get("image_id")))
        if image is None or not isinstance(image.get("file_name"), str):
            raise DataError(f"image_id {ref.get('image_id')!r} has no image with a file_name in {coco_file}",
                            file=str(refs_file), record=i, field="image_id")
        path = images_dir / image["file_name"]
        if path not in sizes:
            sizes[path] = image_size(path, file=str(refs_file), record=i, field="image_id")
        box = _xywh_box(ann.get("bbox"), sizes[path], file=coco_file, record=i)
        meta = {"split": ref.get("split"), "category": names.get(ref.get("category_id", ann.get("category_id"))),
                "ref_id": ref.get("ref_id")}
        for sent in _sentences(ref, file=str(refs_file), record=i):
            yield path, sent, box, meta


def official_items(path: Path, images_dir: Path) -> Iterator[tuple]:
    """(image path, sentence, pixel box, meta) from the official evaluation JSONL."""
    for i, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        image, sent, box = refcoco_eval_row(row, str(path), i)
        yield images_dir / image, sent, box, {"split": None, "category": None, "ref_id": i}


def _xywh_box(bbox: object, size: tuple[int, int], *, file: str, record: int) -> list[float]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise DataError(f"annotation bbox must be [x, y, w, h], got {bbox!r}", file=file, record=record,
                        field="bbox")
    x, y, w, h = bbox
    return clip_box([x, y, x + w, y + h], *size)


def _sentences(ref: dict, *, file: str, record: int) -> list[str]:
    sents = [s.get("sent") if isinstance(s, dict) else s for s in ref.get("sentences") or []]
    if not sents or not all(isinstance(s, str) and s.strip() for s in sents):
        raise DataError("a ref needs 'sentences' with non-empty 'sent' texts", file=file, record=record,
                        field="sentences")
    return [s.strip() for s in sents]
