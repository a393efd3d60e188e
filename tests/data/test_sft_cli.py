"""`workbench data check` / `data preview` on a small file with one bad record."""

from __future__ import annotations

import json

from workbench.cli.main import main


def _file(write_data, golden):
    rows = [{"conversations": s["conversations"]} for s in golden["case8"]["sources"][:2]]
    rows.append({"conversations": [{"from": "user", "value": "Picture 1: <img>images/zzz.png</img>\nhi"},
                                   {"from": "assistant", "value": "x"}]})
    return write_data(rows)


def test_check_prints_counts_lengths_sizes_and_problems(capsys, write_data, golden, tiny_ref_dir):
    path = _file(write_data, golden)
    assert main(["data", "check", str(path), "--model", str(tiny_ref_dir)]) == 2  # bad input: exit 2
    captured = capsys.readouterr()
    out = captured.out
    assert f"{path}: 3 records, 2 valid, 1 bad" in out
    assert "images per record: min 0, median 0.5, mean 0.5, max 1; 1 in all, 1 distinct" in out
    assert "image width: min 80, median 80, mean 80.0, max 80" in out
    assert "tokens per record: min 51, median 209, mean 209.0, max 367" in out
    assert "supervised tokens per record: min 14, median" in out  # sample 0: 13 content ids + <|im_end|>
    assert "max_length 2048, overflow truncate: 2 kept" in out
    assert f"1 bad record of 3; the first: file {path}, record 2" in captured.err
    assert f"file {path}, record 2, field 'conversations[0].value': image not found" in out


def test_check_with_config_and_no_model(capsys, write_data, golden, data_dir):
    path = write_data([{"conversations": golden["case8"]["sources"][0]["conversations"]}])
    config = data_dir / "run.yaml"
    config.write_text(json.dumps({"data": {"max_length": 40, "overflow": "drop"}}))
    assert main(["data", "check", str(path), "--config", str(config)]) == 0
    assert "pass --model" in capsys.readouterr().out
    config.write_text(json.dumps({"data": {"max_lenght": 40}}))
    assert main(["data", "check", str(path), "--config", str(config)]) == 2
    assert f"{config}: data.max_lenght: unknown key; did you mean 'max_length'?" in capsys.readouterr().err


def test_preview_marks_supervised_spans(capsys, write_data, golden, tiny_ref_dir):
    path = _file(write_data, golden)
    assert main(["data", "preview", str(path), "-n", "2", "--model", str(tiny_ref_dir)]) == 0
    out = capsys.readouterr().out
    assert f"--- {path} record 0: 51 tokens, 14 supervised, 0 images ---" in out
    assert ("<|im_start|>assistant\n[[I am a helpful assistant that can read images.<|im_end|>]]\n" in out)
    assert "Picture 1: <img>images/a.png</img>\nWhat is in the picture?<|im_end|>" in out
    assert "[[<ref>the dog</ref><box>(588,499),(725,789)</box><|im_end|>]]" in out


def test_preview_draws_the_boxes_as_the_model_sees_them(capsys, write_data, data_dir, tiny_ref_dir, tmp_path):
    from PIL import Image

    from workbench.eval.draw import PALETTE

    Image.new("RGB", (200, 100), "white").save(data_dir / "wide.png")  # W 200 x H 100, resized to 56 x 56
    path = write_data([{"images": ["wide.png"],
                        "messages": [{"role": "user", "content": "<image>Where is <ref-object>?"},
                                     {"role": "assistant", "content": "<ref-object><bbox>"}],
                        "objects": [{"ref": "the box", "bbox": [50, 20, 150, 80]}]}])
    out = tmp_path / "drawn"
    assert main(["data", "preview", str(path), "--model", str(tiny_ref_dir), "--draw", str(out)]) == 0
    assert "<box>(250,200),(750,800)</box>" in capsys.readouterr().out  # by hand: 50/200, 20/100, ... x 1000
    [png] = sorted(out.iterdir())
    drawn = Image.open(png).convert("RGB")
    assert drawn.size == (448, 448)  # the 56-pixel model input, enlarged 8x to be seen
    # The grid box read back onto the square input: x 250/1000 * 448 = 112, y 200..800/1000 * 448 = 90..358.
    assert drawn.getpixel((112, 224)) == PALETTE[0] and drawn.getpixel((336, 224)) == PALETTE[0]
    assert drawn.getpixel((224, 90)) == PALETTE[0] and drawn.getpixel((224, 358)) == PALETTE[0]
    assert drawn.getpixel((224, 224)) == (255, 255, 255)  # inside: the image itself
    assert drawn.getpixel((100, 224)) == (255, 255, 255)  # left of the box: untouched
