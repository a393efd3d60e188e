"""Length policy, packing, the Dataset (images preprocessed in workers) and the collator."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from workbench.data.collator import SFTCollator
from workbench.data.config import DataConfig
from workbench.data.dataset import load_sft_data
from workbench.data.length import FIRST_ANSWER_TOO_LONG, TOO_LONG, apply_length_policy
from workbench.data.packing import pack
from workbench.model.modeling import IGNORE_INDEX
from workbench.prompt import Sample

PAD = 511


def _case8_file(write_data, golden):
    """case8 samples 0-2: text only (51 ids), one image + 2 answers (367), two images (593)."""
    return write_data([{"conversations": s["conversations"]} for s in golden["case8"]["sources"][:3]])


def _sample(turn_ends, roles, turn_images):
    ids = list(range(turn_ends[-1]))
    labels = [IGNORE_INDEX if any(s <= i < e for s, e, r in zip([0, *turn_ends], turn_ends, roles) if r != "assistant")
              else i for i in ids]
    images = [f"img{k}" for k in range(sum(turn_images))]
    return Sample(ids, labels, turn_ends, roles, turn_images, images, "f.jsonl", 0)


def test_length_policy_cuts_at_turn_boundaries_or_drops():
    roles = ["system", "user", "assistant", "user", "assistant"]
    s = _sample([10, 300, 320, 600, 620], roles, [0, 1, 0, 1, 0])
    kept, report = apply_length_policy([s], 500, "truncate")
    assert kept[0].input_ids == list(range(320)) and kept[0].images == ["img0"]  # after the first answer
    assert (report.kept, report.truncated, report.tokens_cut) == (1, 1, 300)
    kept, report = apply_length_policy([s], 319, "truncate")  # first answer ends at 320
    assert kept == [] and report.dropped == {FIRST_ANSWER_TOO_LONG: 1}
    kept, report = apply_length_policy([s], 500, "drop")
    assert kept == [] and report.dropped == {TOO_LONG: 1}
    assert apply_length_policy([s], 620, "drop")[0][0] is s
    assert "1 dropped: longer than max_length (overflow: drop)" in report.summary()


def test_pack_is_greedy_in_order():
    assert pack([51, 367, 593, 62, 10], 700) == [[0, 1], [2, 3, 4]]
    assert pack([700, 1], 700) == [[0], [1]]
    with pytest.raises(ValueError, match="length policy"):
        pack([701], 700)


def test_dataset_and_collator_pad_stack_images_in_span_order(tok, golden, tiny_ref_dir, write_data):
    path = _case8_file(write_data, golden)
    cfg = DataConfig.from_dict({"train": str(path), "label_mode": "official", "pad_to_multiple_of": 64})
    data = load_sft_data(cfg, tok, image_size=56)
    cases = load_file(str(tiny_ref_dir / "cases.safetensors"))
    items = [data.train[i] for i in range(3)]
    assert [len(it["pixel_values"]) for it in items] == [0, 1, 2]
    batch = SFTCollator(tok.pad_token_id, cfg.pad_to_multiple_of)(items)
    assert batch["input_ids"].shape == (3, 640) and batch["input_ids"].dtype == torch.int64
    for i, n in enumerate([51, 367, 593]):  # right padded, the same ids/labels as the golden
        assert batch["input_ids"][i, :n].tolist() == golden["case8"]["input_ids"][i][:n]
        assert batch["labels"][i, :n].tolist() == golden["case8"]["labels"][i][:n]
        assert batch["input_ids"][i, n:].eq(PAD).all() and batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (640 - n)
    # Images a, then b, c: the order of the <img> spans in (row, position) order.
    expected = torch.cat([cases["pixel_values.a"], cases["pixel_values.b"], cases["pixel_values.c"]])
    torch.testing.assert_close(batch["pixel_values"], expected, rtol=1e-5, atol=1e-5)
    assert "segment_ids" not in batch
    text_only = SFTCollator(PAD)([items[0]])
    assert "pixel_values" not in text_only and text_only["input_ids"].shape == (1, 51)


def test_dataloader_workers_open_the_images(tok, golden, write_data):
    cfg = DataConfig.from_dict({"train": str(_case8_file(write_data, golden)), "num_workers": 1})
    data = load_sft_data(cfg, tok, image_size=56)
    loader = DataLoader(data.train, batch_size=3, num_workers=cfg.num_workers, collate_fn=SFTCollator(PAD))
    (batch,) = list(loader)
    assert batch["pixel_values"].shape == (3, 3, 56, 56)


def test_packed_row_layout(tok, golden, write_data):
    cfg = DataConfig.from_dict({"train": str(_case8_file(write_data, golden)), "packing": True, "max_length": 700})
    data = load_sft_data(cfg, tok, image_size=56)
    assert data.train.rows == [[0, 1], [2]]  # 51 + 367 fit together, 593 alone
    row = data.train[0]
    assert row["segment_ids"].tolist() == [1] * 51 + [2] * 367
    assert row["labels"][51] == IGNORE_INDEX  # a segment's first label would be predicted across the boundary
    assert len(row["pixel_values"]) == 1
    batch = SFTCollator(PAD)([row, data.train[1]])
    assert batch["segment_ids"].shape == batch["input_ids"].shape == (2, 593)
    assert batch["segment_ids"][0, 418:].eq(0).all() and batch["pixel_values"].shape[0] == 3


@pytest.mark.slow
def test_packed_loss_and_logits_equal_one_by_one(tok, golden, tiny_ref_dir, write_data):
    """The tiny reference model (float32): a packed row gives the per-token logits and the summed
    loss of its samples run alone."""
    from workbench import load_model

    model = load_model(tiny_ref_dir, dtype=torch.float32)
    path = _case8_file(write_data, golden)
    base = {"train": str(path), "max_length": 1100}
    alone = load_sft_data(DataConfig.from_dict(base), tok, 56).train
    packed = load_sft_data(DataConfig.from_dict({**base, "packing": True}), tok, 56).train
    assert len(packed) == 1
    collate = SFTCollator(PAD)
    with torch.no_grad():
        row = model(**collate([packed[0]]))
        total_loss, total_tokens, start = 0.0, 0, 0
        for i in range(len(alone)):
            one = model(**collate([alone[i]]))
            n = len(alone[i]["input_ids"])
            torch.testing.assert_close(row.logits[0, start:start + n], one.logits[0], rtol=1e-5, atol=1e-5)
            tokens = alone[i]["labels"][1:].ne(IGNORE_INDEX).sum().item()
            total_loss += one.loss.item() * tokens
            total_tokens += tokens
            start += n
    assert row.loss.item() == pytest.approx(total_loss / total_tokens, rel=1e-5)
