"""Records: structured placeholders and boxes rendered by hand, and every bad input named precisely."""

from __future__ import annotations

import pytest

from workbench.data.config import DataConfig
from workbench.data.dataset import load_sft_data
from workbench.data.records import load_conversations
from workbench.data.render import render
from workbench.errors import ConfigError, DataError
from workbench.prompt import load_task_template, load_template

CHATML = load_template("chatml")


def _render(path, **cfg) -> list[list[str]]:
    config = DataConfig.from_dict({"train": str(path), **cfg})
    loaded = load_conversations(config.train, config)
    assert not loaded.problems, loaded.problems
    return [[t.text for t in render(c, CHATML)] for c in loaded.conversations]


def _sample(bbox, bbox_format="pixel", image="images/a.png", assistant="<ref-object><bbox>", **extra):
    return {"images": [image], "bbox_format": bbox_format,
            "messages": [{"role": "user", "content": "<image>Where is <ref-object>?"},
                         {"role": "assistant", "content": assistant}],
            "objects": [{"ref": "the dog", "bbox": bbox, **extra}]}


# a.png is 80x60: x -> floor(x / 80 * 1000), y -> floor(y / 60 * 1000), capped at 999.
@pytest.mark.parametrize("bbox, fmt, text", [
    ([0, 0, 80, 60], "pixel", "<box>(0,0),(999,999)</box>"),              # right/bottom edge -> 999
    ([40, 30, 79.99, 59.99], "pixel", "<box>(500,500),(999,999)</box>"),
    ([8, 6, 20, 15], "pixel", "<box>(100,100),(250,250)</box>"),
    ([0.07, 0.05, 0.08, 0.06], "pixel", "<box>(0,0),(1,1)</box>"),        # truncation, not rounding
    ([[0, 0, 8, 6], [40, 30, 80, 60]], "pixel",                           # several boxes for one ref
     "<box>(0,0),(100,100)</box><box>(500,500),(999,999)</box>"),
    ([12, 34, 560, 780], "norm1000", "<box>(12,34),(560,780)</box>"),     # already on the grid
])
def test_boxes_are_normalised_by_hand(write_data, bbox, fmt, text):
    (turns,) = _render(write_data([_sample(bbox, fmt)]))
    assert turns == [CHATML.default_system, "Picture 1: <img>images/a.png</img>\nWhere is <ref>the dog</ref>?",
                     f"<ref>the dog</ref>{text}"]


def test_boxes_follow_their_own_image_size(write_data):
    """a.png is 80x60, d.png 120x50: the same pixel box lands on different grid cells."""
    row = {"images": ["images/a.png", "images/d.png"],
           "messages": [{"role": "user", "content": "<image>Find <ref-object>. <image>And <ref-object>?"},
                        {"role": "assistant", "content": "<ref-object><bbox> <ref-object><bbox>"}],
           "objects": [{"ref": "x", "bbox": [60, 25, 80, 50], "image": 0},
                       {"ref": "y", "bbox": [60, 25, 120, 50]}]}  # no index: the latest <image>, d.png
    (turns,) = _render(write_data([row]))
    assert turns[1] == ("Picture 1: <img>images/a.png</img>\nFind <ref>x</ref>. "
                        "Picture 2: <img>images/d.png</img>\nAnd <ref>y</ref>?")
    assert turns[2] == "<ref>x</ref><box>(750,416),(999,833)</box> <ref>y</ref><box>(500,500),(999,999)</box>"


def test_referring_template_puts_the_box_in_the_user_turn(write_data):
    messages = load_task_template("referring").messages(1)
    row = {"images": ["images/a.png"], "messages": messages, "objects": [{"ref": "a dog", "bbox": [8, 6, 20, 15]}]}
    (turns,) = _render(write_data([row]))
    assert turns[1:] == ["Picture 1: <img>images/a.png</img>\nDescribe the object in <box>(100,100),(250,250)</box>.",
                         "<ref>a dog</ref>"]


def test_official_format_kept_verbatim_and_parquet_and_json_files(data_dir, write_data):
    import datasets

    row = {"conversations": [{"from": "user", "value": "Picture 1: <img>images/b.png</img>\nHi <|im_start|>"},
                             {"from": "assistant", "value": "<ref>it</ref><box>(1,2),(3,4)</box>"}]}
    datasets.Dataset.from_list([row]).to_parquet(str(data_dir / "train.parquet"))
    for path in (write_data([row], "train.json"), data_dir / "train.parquet"):
        (turns,) = _render(path)
        assert turns[1:] == [row["conversations"][0]["value"], row["conversations"][1]["value"]]
    assert len(_render(data_dir)) == 2  # a folder: the .json and the .parquet file


LONG = "images/" + "x" * 245 + ".png"  # 256 bytes


@pytest.mark.parametrize("row, field, message", [
    ("{not json", None, "unreadable JSON on line 2"),
    (_sample([1, 2, 3, 4], image="images/missing.png"), "images[0]", "image not found"),
    (_sample([1, 2, 3, 4], image="images/corrupt.png"), "images[0]", "cannot read image"),
    (_sample([1, 2, 81, 4]), "objects[0].bbox", "outside the 80x60 image images/a.png"),
    (_sample([-1, 2, 3, 4]), "objects[0].bbox", "outside the 80x60 image"),
    (_sample([30, 2, 10, 4]), "objects[0].bbox", "need x1 <= x2"),
    (_sample([1, 2, 3, 1000], "norm1000"), "objects[0].bbox", "outside the [0, 1000) grid"),
    (_sample([1, 2, 3]), "objects[0].bbox", "expected [x1, y1, x2, y2]"),
    (_sample([1, 2, 3, 4], assistant="<ref-object><bbox><bbox>"), "objects", "<bbox> number 2"),
    (_sample([1, 2, 3, 4], image=LONG), "images[0]", "256 UTF-8 bytes"),
    (_sample([1, 2, 3, 4], image="../outside.png"), "images[0]", "leads outside the image root"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations[0].from", "unknown role 'human'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"conversations": [{"from": "user", "value": "<box>(5,5),(1,9)</box>"}, {"from": "assistant", "value": "a"}]},
     "conversations[0].value", "need x1 <= x2"),
    ({"conversations": [{"from": "user", "value": "<img>images/a.png"}, {"from": "assistant", "value": "a"}]},
     "conversations[0].value", "unclosed or stray <img>"),
    ({"images": ["images/a.png"], "messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "a"}]},
     "images", "1 images listed but 0 <image> placeholders"),
    ({"text": "hi"}, "conversations", "no 'conversations'"),
])
def test_bad_record_is_named(data_dir, write_data, row, field, message):
    (data_dir / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (data_dir / "outside.png").write_bytes((data_dir / "images" / "a.png").read_bytes())
    path = write_data([_sample([1, 2, 3, 4]), row])
    cfg = DataConfig.from_dict({"train": str(path)})
    loaded = load_conversations(cfg.train, cfg)
    assert len(loaded.conversations) == 1 and len(loaded.problems) == 1
    err = loaded.problems[0]
    assert (err.file, err.record, err.field) == (str(path), 1, field)
    assert message in str(err) and f"file {path}, record 1" in str(err)


def test_outside_root_allowed_when_configured(data_dir, write_data):
    (data_dir / "outside.png").write_bytes((data_dir / "images" / "a.png").read_bytes())
    (data_dir / "sub").mkdir()
    path = write_data([_sample([1, 2, 3, 4], image="../outside.png")], "sub/train.jsonl")
    assert _render(path, allow_outside_root=True)[0][1].startswith("Picture 1: <img>../outside.png</img>")
    # image_root replaces the data file's folder as the base of relative paths.
    path = write_data([_sample([1, 2, 3, 4], image="outside.png")], "sub/rooted.jsonl")
    assert _render(path, image_root=str(data_dir))[0][1].startswith("Picture 1: <img>outside.png</img>")


def test_on_bad_record_skip_counts_and_error_lists(tok, write_data):
    good = _sample([1, 2, 3, 4])
    rows = [good, "{oops", good, _sample([1, 2, 99, 4]), {"messages": [{"role": "user", "content": "x"}]}, good]
    path = write_data(rows)
    data = load_sft_data(DataConfig.from_dict({"train": str(path), "on_bad_record": "skip"}), tok, 56)
    assert len(data.train) == 3 and data.report.rows == 6 and len(data.report.problems) == 3
    assert [p.record for p in data.report.problems] == [1, 3, 4]
    assert "6 records read, 3 bad (skipped)" in data.report.summary()
    with pytest.raises(DataError, match=r"3 bad records .*\n  file .*record 1.*\n  .*record 3.*\n  .*record 4"):
        load_sft_data(DataConfig.from_dict({"train": str(path)}), tok, 56)


def test_config_errors_name_file_and_key():
    with pytest.raises(ConfigError, match=r"run.yaml: data.max_lenght: unknown key; did you mean 'max_length'\?"):
        DataConfig.from_dict({"train": "x", "max_lenght": 10}, source="run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: data.overflow: 'cut' is not one of truncate, drop"):
        DataConfig.from_dict({"train": "x", "overflow": "cut"}, source="run.yaml")
    with pytest.raises(ConfigError, match=r"data.max_length: expected an integer, got True"):
        DataConfig.from_dict({"train": "x", "max_length": True})
    with pytest.raises(ConfigError, match=r"data.train: missing"):
        DataConfig.from_dict({})
    cfg = DataConfig.from_dict({"train": "a.jsonl", "eval": ["b.jsonl"], "packing": True})
    assert cfg.train == ("a.jsonl",) and cfg.to_dict()["eval"] == ["b.jsonl"] and cfg.max_length == 2048
    with pytest.raises(ConfigError, match="chat template 'nope' not found"):
        load_template("nope")


def test_structured_parquet_with_missing_columns(data_dir):
    """Arrow fills keys a row lacks with None; None means "not given"."""
    import datasets

    rows = [{**_sample([8, 6, 20, 15]), "objects": [{"ref": "the dog", "bbox": [8, 6, 20, 15], "image": 0}]},
            {k: v for k, v in _sample([8, 6, 20, 15]).items() if k != "bbox_format"}]
    datasets.Dataset.from_list(rows).to_parquet(str(data_dir / "s.parquet"))
    assert [t[2] for t in _render(data_dir / "s.parquet")] == ["<ref>the dog</ref><box>(100,100),(250,250)</box>"] * 2
