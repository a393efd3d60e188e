"""`workbench data pairs` (issue 32): preference pairs from the model's own grounding answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.train.pairs import NO_BOX, answer_score, best_and_worst


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from workbench.demo.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 3, shapes_per_image=(1, 1), seed=5)


def query(gt=(0, 0, 50, 50)):
    from workbench.eval.grounding import Query

    return Query(image="x.png", file=Path("x.png"), phrase="the red square", gt=[gt])


@pytest.mark.parametrize("answer,expected", [
    ("<ref>the red square</ref><box>(0,0),(500,500)</box>", 1.0),              # 50x50 px of a 100x100 image
    ("<ref>the red square</ref><box>(0,0),(500,999)</box>", 2500 / 4995),      # 50 x 99.9 px
    ("<ref>the red square</ref><box>(600,600),(900,900)</box>", 0.0),          # a box that misses
    ("<ref>the red square</ref><box>(900,0),(600,500)</box>", NO_BOX),         # inverted: no usable box
    ("I do not know", NO_BOX),
])
def test_answers_score_by_iou_and_a_missing_box_scores_lowest(answer, expected):
    assert answer_score(answer, query(), (100, 100)) == pytest.approx(expected)


@pytest.mark.parametrize("scores,expected", [
    ([0.2, 0.9, NO_BOX, 0.5], (1, 2)),
    ([0.3, 0.3, 0.3], None),         # all alike: no preference
    ([NO_BOX, NO_BOX], None),
    ([0.0, 0.4, 0.4], (1, 0)),       # ties: the first of the best
])
def test_best_and_worst(scores, expected):
    assert best_and_worst([f"a{i}" for i in range(len(scores))], scores) == expected


def test_pairs_command_writes_pairs_that_dpo_reads_with_the_same_data_section(tmp_path, tiny_model, shapes,
                                                                               monkeypatch, capsys):
    """Fixed sampled answers (the tiny random model writes no boxes): the best and the worst become
    chosen and rejected, a question whose answers tie is skipped, the file names model and adapter,
    and the DPO loader reads it with the SFT data section."""
    from workbench.api import load_tokenizer
    from workbench.cli.main import main
    from workbench.data.config import DataConfig
    from workbench.data.preference import load_preference_data
    from workbench.eval.grounding import load_queries
    from workbench.model.image_processing import read_image_size
    from workbench.train import pairs

    queries = load_queries(shapes)
    assert len(queries) == 3

    def fake_answers(model, tokenizer, batch, samples, *args):
        out = []
        for q in batch:
            x1, y1, x2, y2 = q.gt[0]
            w, h = read_image_size(q.file)
            exact = f"<ref>{q.phrase}</ref><box>({x1 * 1000 // w},{y1 * 1000 // h}),({x2 * 1000 // w},{y2 * 1000 // h})</box>"
            miss = f"<ref>{q.phrase}</ref><box>(990,990),(995,995)</box>"
            out.append(["nothing"] * samples if q is batch[-1] and len(batch) == 1 else
                       [miss, exact, "no box here", miss][:samples])
        return out

    monkeypatch.setattr(pairs, "sample_answers", fake_answers)
    out = shapes.parent / "pairs.jsonl"
    adapter = lora_adapter(tiny_model, tmp_path / "adapter")
    assert main(["data", "pairs", "--model", str(tiny_model), "--adapter", str(adapter), "--data", str(shapes),
                 "--out", str(out), "--samples", "4", "--batch-size", "2"]) == 0
    assert "2 pairs from 3 grounding questions (1 skipped" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["objects"][0]["ref"] for r in rows] == [q.phrase for q in queries[:2]]
    for r in rows:
        assert r["chosen"].startswith(f"<ref>{r['objects'][0]['ref']}</ref><box>") and r["rejected"] == "no box here"
        assert r["meta"]["pairs"]["model"] == str(tiny_model) and r["meta"]["pairs"]["adapter"] == str(adapter) and r["meta"]["pairs"]["rejected_iou"] == NO_BOX
        assert r["meta"]["pairs"]["chosen_iou"] > 0.9
    data = load_preference_data(DataConfig.from_dict({"train": str(out), "format": "structured"}),
                                load_tokenizer(tiny_model), 224)
    assert data.report.pairs == 2 and data.report.sources == {f"model {tiny_model}, adapter {adapter}": 2}


def lora_adapter(model_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from workbench.model.checkpoint import load_model

    model = get_peft_model(load_model(model_dir, dtype=torch.float32), LoraConfig(r=2, target_modules=["c_attn"]))
    model.save_pretrained(out)
    return out


def test_pairs_command_samples_from_the_model(tmp_path, tiny_model, shapes):
    """The real sampler on the tiny model: it runs and writes a (maybe empty) pairs file."""
    from workbench.cli.main import main

    out = shapes.parent / "sampled.jsonl"
    assert main(["data", "pairs", "--model", str(tiny_model), "--data", str(shapes), "--out", str(out),
                 "--samples", "3", "--max-new-tokens", "6", "--limit", "2"]) == 0
    assert out.is_file()


def test_pairs_refuses_an_out_file_away_from_the_images(tmp_path, tiny_model, shapes, capsys):
    from workbench.cli.main import main

    assert main(["data", "pairs", "--model", str(tiny_model), "--data", str(shapes),
                 "--out", str(tmp_path / "elsewhere" / "p.jsonl")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["data", "pairs", "--model", str(tiny_model), "--adapter", str(tmp_path), "--data", str(shapes),
                 "--out", str(shapes.parent / "p.jsonl")]) == 2
    assert "--adapter: " in capsys.readouterr().err
