"""`workbench data convert {coco,refcoco,yolo}`: public annotations -> structured JSONL.

`workbench/cli/data.py` calls `add_parsers(data_subparsers)`.
"""

from __future__ import annotations

import argparse
import json

TASKS = ("grounding", "detection", "caption-grounding")


def add_parsers(data_subparsers: argparse._SubParsersAction) -> None:
    convert = data_subparsers.add_parser(
        "convert", help="convert COCO / RefCOCO / YOLO annotations to the structured JSONL format")
    sub = convert.add_subparsers(dest="source", required=True)

    coco = sub.add_parser("coco", help="COCO instances JSON ([x, y, w, h] pixel boxes); categories become refs")
    coco.add_argument("annotations", help="instances_*.json")
    coco.add_argument("--task", choices=TASKS, default="grounding",
                      help="grounding: one sample per image and category; detection / caption-grounding: one per image")
    coco.set_defaults(run=_run_coco)

    refcoco = sub.add_parser("refcoco", help="RefCOCO/RefCOCO+/RefCOCOg refs JSON, or the official eval JSONL")
    refcoco.add_argument("refs", help="refs JSON (a list, or an object with refs + COCO images/annotations) "
                                      "or the official eval .jsonl (image, sent, bbox, height, width)")
    refcoco.add_argument("--instances", help="COCO instances.json holding the refs' boxes (for a refs list)")
    refcoco.add_argument("--split", action="append", help="keep only this split (repeatable): train, val, testA, ...")
    refcoco.set_defaults(run=_run_refcoco)

    yolo = sub.add_parser("yolo", help="YOLO txt labels (class cx cy w h, normalised) + class names")
    yolo.add_argument("labels", help="folder of label .txt files, mirroring the image folder")
    yolo.add_argument("--names", required=True, help="data.yaml with 'names', or a text file with one name per line")
    yolo.add_argument("--task", choices=TASKS, default="grounding")
    yolo.set_defaults(run=_run_yolo)

    for parser in (coco, refcoco, yolo):
        parser.add_argument("--images", required=True, help="folder the annotation file's image names are under")
        parser.add_argument("--out", required=True, help="output .jsonl")
        parser.add_argument("--image-root", help="write image paths relative to this folder (set it as "
                                                 "data.image_root); default: the output file's folder")


def _run_coco(args: argparse.Namespace) -> int:
    from workbench.data.convert.coco import convert_coco

    return _report(convert_coco(args.annotations, args.images, args.out, args.task, args.image_root), args.out)


def _run_refcoco(args: argparse.Namespace) -> int:
    from workbench.data.convert.refcoco import convert_refcoco

    stats = convert_refcoco(args.refs, args.images, args.out, args.instances, args.split, args.image_root)
    return _report(stats, args.out)


def _run_yolo(args: argparse.Namespace) -> int:
    from workbench.data.convert.yolo import convert_yolo

    return _report(convert_yolo(args.labels, args.images, args.names, args.out, args.task, args.image_root), args.out)


def _report(stats: dict, out: str) -> int:
    print(f"wrote {stats['samples']} samples to {out}")
    print(json.dumps({k: v for k, v in stats.items() if k != "samples"}, indent=1))
    return 0
