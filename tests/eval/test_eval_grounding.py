"""Grounding evaluation: controlled answers (a scripted model) and end to end on the tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from workbench.cli.main import main
from workbench.eval.grounding import evaluate_grounding, generate_answers, ground, load_queries, prompt_ids


class ScriptedModel(torch.nn.Module):
    """Answers each prompt with a fixed text chosen by (image, phrase) found in the prompt."""

    def __init__(self, tokenizer, answers: dict[tuple[str, str], str], image_size: int = 56):
        super().__init__()
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.transformer = torch.nn.Module()
        self.transformer.visual = torch.nn.Module()
        self.transformer.visual.image_size = image_size

    def generate(self, input_ids, attention_mask, pixel_values, **kwargs):
        self.calls.append((input_ids, attention_mask, pixel_values, kwargs))
        rows = []
        for ids in input_ids.tolist():
            prompt = self.tokenizer.decode(ids)
            key = (re.search(r"<img>(.*?)</img>", prompt).group(1), re.search(r"<ref>(.*?)</ref>", prompt).group(1))
            rows.append(self.tokenizer.encode(self.answers[key]) + [self.tokenizer.eod_id])
        width = max(map(len, rows))
        new = [r + [self.tokenizer.eod_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def test_scores_controlled_answers_and_writes_report(tmp_path, tiny, converted):
    _, tok = tiny
    queries = load_queries(converted)
    model = ScriptedModel(tok, {
        ("images/a.png", "cat"): "<ref>cat</ref><box>(0,0),(999,999)</box>",  # (0,0,63.936,47.952) vs whole 64x48
        ("images/a.png", "dog"): "no idea",                                  # unparseable
        ("images/sub/b.jpg", "cat"): "<ref>dog</ref><box>(0,0),(10,10)</box><ref>cat</ref><box>(100,50),(766,425)</box>",
    })
    report = evaluate_grounding(model, tok, queries, prompt="chat", batch_size=2, out_dir=tmp_path / "out")
    m = report["metrics"]
    cat_iou = (63.936 * 47.952) / (64 * 48)
    b_iou = (22.98 - 3) * (34 - 4) / (20 * 30)   # x2 = 766/1000*30 = 22.98 vs the true (3,4,23,34)
    assert [s["iou"] for s in report["samples"]] == pytest.approx([cat_iou, 0.0, b_iou])
    assert m["n"] == 3 and m["acc@0.5"] == pytest.approx(2 / 3) and m["parse_failures"] == 1
    assert m["mean_iou"] == pytest.approx((cat_iou + b_iou) / 3)
    assert report["samples"][1]["pred"] is None and report["samples"][1]["answer"] == "no idea"
    # Batches of 2 then 1; the prompt rows are left-padded (mask zeros only on the left), one image per row.
    (ids, mask, pixels, kwargs), (ids2, _, pixels2, _) = model.calls
    assert ids.shape[0] == 2 and ids2.shape[0] == 1 and pixels.shape == (2, 3, 56, 56) and pixels2.shape[0] == 1
    assert all(row[-1] == 1 and row == sorted(row) for row in mask.tolist())
    assert kwargs["do_sample"] is False and kwargs["stop_words_ids"] == [[tok.im_end_id], [tok.im_start_id]]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["metrics"] == m
    pngs = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(pngs[2]).size == (30, 80)  # drawn on the original image


def test_official_jsonl_prompt_and_ground_api(tmp_path, tiny, converted):
    _, tok = tiny
    line = {"image": "images/a.png", "sent": "the dog", "bbox": [32, 0, 64, 48], "height": 48, "width": 64}
    (tmp_path / "refcoco_val.jsonl").write_text(json.dumps(line) + "\n")
    [query] = load_queries(tmp_path / "refcoco_val.jsonl")
    assert tok.decode(prompt_ids(tok, query.image, query.phrase)) == "<img>images/a.png</img><ref>the dog</ref><box>"
    model = ScriptedModel(tok, {("images/a.png", "the dog"): "(500,0),(999,999)</box>"})
    report = evaluate_grounding(model, tok, [query], parser="official", divisor=999)
    assert report["samples"][0]["pred"] == pytest.approx((500 / 999 * 64, 0, 64, 48)) and report["metrics"]["acc@0.5"] == 1
    assert model.calls[0][3]["min_new_tokens"] == 10 and model.calls[0][3]["stop_words_ids"] is None
    model = ScriptedModel(tok, {("a.png", "cat"): "<ref>dog</ref><box>(0,0),(10,10)</box><ref>cat</ref>"
                                                  "<box>(500,0),(750,500)</box><box>(0,500),(250,750)</box>"})
    assert ground(model, tok, tmp_path / "images" / "a.png", "cat") == [(32, 0, 48, 24), (0, 24, 16, 36)]


def test_left_padded_batch_gives_the_same_answers_as_one_by_one(tiny):
    model, tok = tiny
    prompts = [prompt_ids(tok, "a.png", "the cat"), prompt_ids(tok, "b.png", "a much longer phrase here")]
    assert len(prompts[0]) < len(prompts[1])
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (20, 50), (10, 10, 200))]
    batched = generate_answers(model, tok, prompts, images, max_new_tokens=8)
    alone = [generate_answers(model, tok, [p], [im], max_new_tokens=8)[0] for p, im in zip(prompts, images)]
    assert batched == alone and all(batched) and batched[0] != batched[1]


def test_cli_eval_grounding_end_to_end_with_adapter(tmp_path, tiny_dir, converted, capsys):
    from peft import LoraConfig, get_peft_model

    from workbench.api import load_model

    data = converted
    peft_model = get_peft_model(load_model(tiny_dir), LoraConfig(r=2, target_modules=["c_attn"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    reports = []
    for extra in ([], ["--adapter", str(tmp_path / "adapter")]):
        out = tmp_path / f"out{len(reports)}"
        rc = main(["eval", "grounding", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
                   "--batch-size", "2", "--max-new-tokens", "12", "--prompt", "chat", "--device", "cpu", *extra])
        assert rc == 0
        reports.append(json.loads((out / "report.json").read_text()))
        assert len(list((out / "samples").glob("*.png"))) == 3
    assert "3 queries: Acc@0.5" in capsys.readouterr().out
    assert reports[0]["metrics"]["n"] == 3 and set(reports[0]["samples"][0]) >= {"answer", "iou", "pred", "gt"}
    # A fresh LoRA adapter (B = 0) changes nothing: same answers through PeftModel.
    assert [s["answer"] for s in reports[1]["samples"]] == [s["answer"] for s in reports[0]["samples"]]
    assert main(["eval", "grounding", "--model", str(tiny_dir), "--data", str(data),
                 "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out9")]) == 2
    from workbench.model.digests import sha256_file

    assert reports[1]["about"]["adapter"] == str(tmp_path / "adapter") and reports[0]["about"]["model"] == str(tiny_dir)
    assert reports[0]["about"]["data_sha256"] == sha256_file(data)
    # A rerun into a folder holding a report is refused; with --overwrite the old files go.
    (tmp_path / "out0" / "samples" / "9999.png").write_bytes(b"an older run's picture")
    rerun = ["eval", "grounding", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "out0"),
             "--max-new-tokens", "4", "--device", "cpu"]
    assert main(rerun) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*rerun, "--overwrite"]) == 0 and not (tmp_path / "out0" / "samples" / "9999.png").exists()


def test_cut_and_inverted_boxes_are_parse_failures_per_category_and_report_names_its_inputs(tmp_path, tiny,
                                                                                           converted):
    _, tok = tiny
    queries = load_queries(converted)
    assert [q.category for q in queries] == ["cat", "dog", "cat"]  # the COCO converter writes them
    model = ScriptedModel(tok, {
        ("images/a.png", "cat"): "<ref>cat</ref><box>(7,6,6,(7,(7,(7,",            # cut mid-box
        ("images/a.png", "dog"): "<ref>dog</ref><box>(900,0),(10,999)</box>",      # x2 < x1
        ("images/sub/b.jpg", "cat"): "<ref>cat</ref><box>(0,0),(10,10)</box>",     # parsed, wrong
    })
    about = {"model": "m", "adapter": "runs/a", "data": str(converted), "data_sha256": "abc"}
    report = evaluate_grounding(model, tok, queries, prompt="chat", out_dir=tmp_path / "out", about=about)
    m = report["metrics"]
    assert [s["failure"] for s in report["samples"]] == ["cut box", "inverted box", None]
    assert m["parse_failures"] == 2 and m["parse_failure_kinds"] == {"cut box": 1, "inverted box": 1}
    assert m["wrong_boxes"] == 1 and m["acc@0.5"] == 0
    assert m["per_category"]["cat"]["n"] == 2 and m["per_category"]["dog"]["parse_failures"] == 1
    assert json.loads((tmp_path / "out" / "report.json").read_text())["about"] == about
    assert report["settings"]["max_new_tokens"] == 128  # the chat answer's budget, not the official 28

