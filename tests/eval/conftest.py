"""A tiny random Qwen-VL model folder shared by the eval tests (built once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from workbench.demo.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from workbench.api import load_model, load_tokenizer

    return load_model(tiny_dir), load_tokenizer(tiny_dir)


@pytest.fixture
def converted(tmp_path):
    """A COCO file converted to structured grounding samples: (images/a.png 64x48, cat: the whole
    image), (a.png, dog: [50.5, 10.25, 64, 48]), (images/sub/b.jpg 30x80, cat: two boxes)."""
    import json

    from PIL import Image

    from workbench.data.convert.coco import convert_coco

    for name, size in {"a.png": (64, 48), "sub/b.jpg": (30, 80)}.items():
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 150)).save(tmp_path / "images" / name)
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "sub/b.jpg"}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 48]},
                            {"image_id": 1, "category_id": 2, "bbox": [50.5, 10.25, 13.5, 37.75]},
                            {"image_id": 2, "category_id": 1, "bbox": [0, 70, 5, 10]},
                            {"image_id": 2, "category_id": 1, "bbox": [3, 4, 20, 30]}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    convert_coco(tmp_path / "instances.json", tmp_path / "images", tmp_path / "val.jsonl")
    return tmp_path / "val.jsonl"
