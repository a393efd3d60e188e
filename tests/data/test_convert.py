"""Converters: COCO, RefCOCO and YOLO files made here -> structured JSONL -> back to pixel boxes."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from workbench.cli.data_convert import add_parsers
from workbench.data.boxes import denormalize_box, normalize_box
from workbench.data.config import DataConfig
from workbench.data.convert import structured_to_coco
from workbench.data.convert.coco import convert_coco
from workbench.data.convert.refcoco import convert_refcoco
from workbench.data.convert.yolo import convert_yolo
from workbench.data.records import load_conversations
from workbench.data.render import render
from workbench.errors import DataError
from workbench.prompt import load_template

SIZES = {"a.png": (64, 48), "sub/b.jpg": (30, 80)}  # different sizes and aspect ratios


def make_images(root: Path) -> Path:
    images = root / "images"
    for name, size in SIZES.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 150)).save(images / name)
    return images


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def coco_file(root: Path, **changes) -> Path:
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 7, "file_name": "sub/b.jpg", "width": 30, "height": 80}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "zebra"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [50.5, 10.25, 13.5, 37.75]},  # right + bottom edge
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 48]},              # the whole image
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 70, 5, 10]},              # bottom-left corner
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [3, 4, 20, 30]},
            {"id": 5, "image_id": 7, "category_id": 2, "bbox": [1, 1, 10, 10], "iscrowd": 1},  # skipped
            {"id": 6, "image_id": 7, "category_id": 2, "bbox": [5, 5, 0, 10]},                 # zero area: skipped
        ],
    }
    coco.update(changes)
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def kept_boxes(coco: dict) -> set:
    """(file, category, [x, y, w, h]) of the annotations a converter must keep."""
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return {(files[a["image_id"]], names[a["category_id"]], tuple(a["bbox"])) for a in coco["annotations"]
            if not a.get("iscrowd") and a["bbox"][2] > 0 and a["bbox"][3] > 0}


def round_trip(samples: list[dict], root: Path, prefix: str = "images/") -> set:
    back = structured_to_coco(samples, root)
    files = {im["id"]: im["file_name"].removeprefix(prefix) for im in back["images"]}
    names = {c["id"]: c["name"] for c in back["categories"]}
    return {(files[a["image_id"]], names[a["category_id"]], tuple(a["bbox"])) for a in back["annotations"]}


def test_coco_grounding_round_trip_is_exact(tmp_path):
    make_images(tmp_path)
    ann = coco_file(tmp_path)
    stats = convert_coco(ann, tmp_path / "images", tmp_path / "train.jsonl")
    samples = read_jsonl(tmp_path / "train.jsonl")
    # (a.png, cat), (a.png, dog), (b.jpg, cat): one sample per image and category; zebra has none.
    assert [(s["images"][0], s["objects"][0]["ref"]) for s in samples] == [
        ("images/a.png", "cat"), ("images/a.png", "dog"), ("images/sub/b.jpg", "cat")]
    assert samples[2]["objects"][0]["bbox"] == [[0, 70, 5, 80], [3, 4, 23, 34]]
    assert stats == {"images": 2, "skipped_crowd": 1, "skipped_empty_boxes": 1, "clipped": 0,
                     "categories_without_instances": ["zebra"], "samples": 3}
    assert round_trip(samples, tmp_path) == kept_boxes(json.loads(ann.read_text()))
    assert not list(tmp_path.glob(".*.tmp"))


def test_converted_file_loads_and_renders_within_one_grid_step(tmp_path):
    make_images(tmp_path)
    convert_coco(coco_file(tmp_path), tmp_path / "images", tmp_path / "train.jsonl")
    out = tmp_path / "train.jsonl"
    result = load_conversations([str(out)], DataConfig.from_dict({"train": [str(out)]}))
    assert result.problems == [] and len(result.conversations) == 3
    turns = render(result.conversations[1], load_template("chatml"))  # a.png, dog
    assert turns[1].text.startswith("Picture 1: <img>images/a.png</img>\n") and "<ref>dog</ref>" in turns[1].text
    assert turns[2].text == "<ref>dog</ref><box>(789,213),(999,999)</box>"
    # Rendered grid -> pixels is within one grid step (size / 1000) of the COCO box.
    grid = [int(v) for v in re.findall(r"\d+", turns[2].text.split("<box>")[1])]
    x1, y1, x2, y2 = denormalize_box(grid, 64, 48)
    assert grid == list(normalize_box([50.5, 10.25, 64, 48], 64, 48))
    for got, want, size in zip((x1, y1, x2, y2), (50.5, 10.25, 64, 48), (64, 48, 64, 48)):
        assert abs(got - want) <= size / 1000 + 1e-9


def test_coco_detection_and_caption_grounding(tmp_path):
    make_images(tmp_path)
    ann = coco_file(tmp_path)
    convert_coco(ann, tmp_path / "images", tmp_path / "det.jsonl", task="detection")
    det = read_jsonl(tmp_path / "det.jsonl")
    assert [[o["ref"] for o in s["objects"]] for s in det] == [["cat", "dog"], ["cat"]]  # category order
    assert det[0]["messages"][1]["content"] == "<ref-object><bbox><ref-object><bbox>"
    assert round_trip(det, tmp_path) == kept_boxes(json.loads(ann.read_text()))
    convert_coco(ann, tmp_path / "images", tmp_path / "cap.jsonl", task="caption-grounding")
    cap = read_jsonl(tmp_path / "cap.jsonl")
    assert cap[0]["messages"][0]["content"] == "<image>Generate the caption in English with grounding:"
    assert cap[0]["messages"][1]["content"] == "The picture shows <ref-object><bbox> and <ref-object><bbox>."
    assert cap[1]["messages"][1]["content"] == "The picture shows <ref-object><bbox>."
    loaded = load_conversations([str(tmp_path / "cap.jsonl")], DataConfig.from_dict({"train": ["x"]}))
    assert loaded.problems == []


@pytest.mark.parametrize("change, where", [
    ({"annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},
                      {"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}]}, "record 1, field 'annotations.image_id'"),
    ({"annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1]}]}, "record 0, field 'annotations.bbox'"),
    ({"annotations": [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}]}, "record 0, field 'annotations.category_id'"),
    ({"images": [{"id": 1, "file_name": "missing.png"}]}, "record 0, field 'images.file_name'"),
    ({"categories": None}, "field 'categories'"),
])
def test_coco_errors_name_the_record(tmp_path, change, where):
    make_images(tmp_path)
    ann = coco_file(tmp_path, **change)
    with pytest.raises(DataError, match=re.escape(f"file {ann}, {where}")):
        convert_coco(ann, tmp_path / "images", tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_coco_broken_json_names_the_file(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match=f"file {re.escape(str(bad))}: not valid JSON"):
        convert_coco(bad, tmp_path, tmp_path / "out.jsonl")


def refer_data() -> tuple[list, dict]:
    refs = [
        {"ref_id": 10, "ann_id": 101, "image_id": 1, "split": "train", "category_id": 2,
         "sentences": [{"sent": "the dog on the right"}, {"sent": "brown dog"}]},
        {"ref_id": 11, "ann_id": 102, "image_id": 7, "split": "val", "category_id": 1,
         "sentences": [{"sent": "cat at the bottom"}]},
    ]
    instances = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 7, "file_name": "sub/b.jpg"}],
        "annotations": [{"id": 101, "image_id": 1, "category_id": 2, "bbox": [50.5, 10.25, 13.5, 37.75]},
                        {"id": 102, "image_id": 7, "category_id": 1, "bbox": [0, 70, 30, 10]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    return refs, instances


def test_refcoco_refs_and_instances_round_trip(tmp_path):
    images = make_images(tmp_path)
    refs, instances = refer_data()
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    stats = convert_refcoco(tmp_path / "refs.json", images, tmp_path / "all.jsonl", tmp_path / "instances.json")
    samples = read_jsonl(tmp_path / "all.jsonl")
    assert stats == {"samples": 3, "skipped_split": 0}
    assert [s["objects"][0]["ref"] for s in samples] == ["the dog on the right", "brown dog", "cat at the bottom"]
    assert samples[2]["meta"] == {"split": "val", "category": "cat", "ref_id": 11}
    assert samples[0]["messages"] == [
        {"role": "user", "content": "<image>Output the bounding box of <ref-object>."},
        {"role": "assistant", "content": "<ref-object><bbox>"}]
    assert round_trip(samples, tmp_path) == {
        ("a.png", "the dog on the right", (50.5, 10.25, 13.5, 37.75)),
        ("a.png", "brown dog", (50.5, 10.25, 13.5, 37.75)),
        ("sub/b.jpg", "cat at the bottom", (0, 70, 30, 10))}
    # The combined form (refs + COCO lists in one object) and a split filter.
    (tmp_path / "combined.json").write_text(json.dumps({"refs": refs, **instances}))
    stats = convert_refcoco(tmp_path / "combined.json", images, tmp_path / "val.jsonl", splits=["val"])
    assert stats == {"samples": 1, "skipped_split": 2}
    [val] = read_jsonl(tmp_path / "val.jsonl")
    assert val["objects"] == samples[2]["objects"] and val["meta"] == samples[2]["meta"]


def test_refcoco_official_jsonl(tmp_path):
    images = make_images(tmp_path)
    lines = [{"image": "a.png", "sent": "left thing", "bbox": [0, 0, 10.5, 48], "height": 48, "width": 64},
             {"image": "sub/b.jpg", "sent": "top", "bbox": [1, 2, 30, 80], "height": 80, "width": 30}]
    (tmp_path / "refcoco_val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    convert_refcoco(tmp_path / "refcoco_val.jsonl", images, tmp_path / "out.jsonl")
    samples = read_jsonl(tmp_path / "out.jsonl")
    assert [(s["images"][0], s["objects"][0]["ref"], s["objects"][0]["bbox"]) for s in samples] == [
        ("images/a.png", "left thing", [0, 0, 10.5, 48]), ("images/sub/b.jpg", "top", [1, 2, 30, 80])]


def test_refcoco_errors_name_the_record(tmp_path):
    images = make_images(tmp_path)
    refs, instances = refer_data()
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    with pytest.raises(DataError, match="needs --instances"):
        convert_refcoco(tmp_path / "refs.json", images, tmp_path / "o.jsonl")
    refs[1]["ann_id"] = 555
    (tmp_path / "bad.json").write_text(json.dumps({"refs": refs, **instances}))
    with pytest.raises(DataError, match=re.escape(f"file {tmp_path / 'bad.json'}, record 1, field 'ann_id'")):
        convert_refcoco(tmp_path / "bad.json", images, tmp_path / "o.jsonl")
    refs[1]["ann_id"], refs[1]["sentences"] = 102, []
    (tmp_path / "bad.json").write_text(json.dumps({"refs": refs, **instances}))
    with pytest.raises(DataError, match="record 1, field 'sentences'"):
        convert_refcoco(tmp_path / "bad.json", images, tmp_path / "o.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "sent": "x", "bbox": [0, 0, 1], "height": 48, "width": 64}\n')
    with pytest.raises(DataError, match="record 0, field 'bbox'"):
        convert_refcoco(tmp_path / "bad.jsonl", images, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


YOLO_LABELS = {
    "a.txt": "1 0.5 0.5 1.0 1.0\n0 0.890625 0.5 0.21875 1.0\n",  # whole image; a box on the right edge
    "sub/b.txt": "0 0.1 0.2 0.3 0.4 0.2 0.9\n",                   # a polygon
}


def make_yolo(root: Path, labels: dict[str, str] = YOLO_LABELS) -> Path:
    for name, text in labels.items():
        (root / "labels" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "labels" / name).write_text(text)
    (root / "data.yaml").write_text("names: {0: cat, 1: dog, 2: zebra}\n")
    return root / "labels"


def test_yolo_round_trip(tmp_path):
    images = make_images(tmp_path)
    stats = convert_yolo(make_yolo(tmp_path), images, tmp_path / "data.yaml", tmp_path / "out.jsonl",
                         task="detection")
    samples = read_jsonl(tmp_path / "out.jsonl")
    assert stats["categories_without_instances"] == ["zebra"] and stats["samples"] == 2
    back = structured_to_coco(samples, tmp_path)
    names = {c["id"]: c["name"] for c in back["categories"]}
    got = {}
    for a in back["annotations"]:  # back to YOLO's normalised centre form
        im = back["images"][a["image_id"]]
        x, y, w, h = a["bbox"]
        W, H = im["width"], im["height"]
        got[im["file_name"], names[a["category_id"]]] = ((x + w / 2) / W, (y + h / 2) / H, w / W, h / H)
    want = {("images/a.png", "dog"): (0.5, 0.5, 1.0, 1.0), ("images/a.png", "cat"): (0.890625, 0.5, 0.21875, 1.0),
            ("images/sub/b.jpg", "cat"): (0.2, 0.55, 0.2, 0.7)}  # polygon x 0.1..0.3, y 0.2..0.9
    assert got.keys() == want.keys()
    for key, values in want.items():
        assert got[key] == pytest.approx(values, abs=1e-12)


def test_yolo_names_text_file_and_errors(tmp_path):
    images = make_images(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    labels = make_yolo(tmp_path, {"a.txt": "1 0.5 0.5 0.2 0.2\n\n5 0.5 0.5 0.1 0.1\n"})
    with pytest.raises(DataError, match=re.escape(f"file {labels / 'a.txt'}, record 3, field 'class'")):
        convert_yolo(labels, images, tmp_path / "classes.txt", tmp_path / "o.jsonl")
    (labels / "a.txt").write_text("1 0.5 oops 0.2 0.2\n")
    with pytest.raises(DataError, match="record 1: expected 'class cx cy w h'"):
        convert_yolo(labels, images, tmp_path / "classes.txt", tmp_path / "o.jsonl")
    (labels / "a.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(DataError, match="got 3"):
        convert_yolo(labels, images, tmp_path / "classes.txt", tmp_path / "o.jsonl")
    (labels / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n")
    convert_yolo(labels, images, tmp_path / "classes.txt", tmp_path / "o.jsonl")
    assert [s["objects"] for s in read_jsonl(tmp_path / "o.jsonl")] == [[{"ref": "dog", "bbox": [24, 12, 40, 36]}]]


def test_cli_parses_and_runs(tmp_path, capsys):
    images = make_images(tmp_path)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "coco", str(coco_file(tmp_path)), "--images", str(images),
                              "--out", str(tmp_path / "x" / "o.jsonl"), "--task", "detection",
                              "--image-root", str(tmp_path)])
    assert args.run(args) == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    assert read_jsonl(tmp_path / "x" / "o.jsonl")[1]["images"] == ["images/sub/b.jpg"]
