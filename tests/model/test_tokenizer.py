"""QWenTokenizer against the original's goldens (tiny vocab) and the docs/qwen-vl.md §2.4 malformed-span table."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_REF as REF
from workbench.errors import CheckpointError, DataError, WorkbenchError
from workbench.model.tokenizer import ImageSpanError, QWenTokenizer, write_byte_vocab

GOLDEN = json.loads((REF / "golden.json").read_text())
CASE7 = GOLDEN["case7"]


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer.from_pretrained(REF)


def test_special_tokens_and_attrs(tok):
    assert tok.special_tokens == GOLDEN["special_tokens"]
    attrs = GOLDEN["tokenizer_attrs"]
    for name in ("eod_id", "im_start_id", "im_end_id", "img_start_id", "img_end_id", "img_pad_id",
                 "ref_start_id", "ref_end_id", "box_start_id", "box_end_id", "quad_start_id", "quad_end_id"):
        assert getattr(tok, name) == attrs[name], name
    assert len(tok) == attrs["len_tokenizer"] == 728
    assert tok.vocab_size == attrs["vocab_size_property"]
    assert len(tok.mergeable_ranks) == attrs["n_mergeable_ranks"]
    assert list(tok.IMAGE_ST) == attrs["IMAGE_ST"]
    assert tok.image_special_tokens == set(range(719, 725))
    assert tok.pad_token_id == tok.eos_token_id == 511
    assert tok.padding_side == "right" and tok.model_max_length == 8192


@pytest.mark.parametrize("case", CASE7["strings"], ids=lambda c: repr(c["text"])[:30])
def test_case7_strings(tok, case):
    ids = tok.encode(case["text"])
    assert ids == case["ids"]
    assert tok(case["text"]).input_ids == case["ids"]
    assert tok.encode(case["text"], allowed_special=set(tok.IMAGE_ST)) == case["ids_image_st_only"]
    tokens = [t.decode("latin-1") if isinstance(t, bytes) else t for t in tok.convert_ids_to_tokens(ids)]
    assert tokens == case["tokens"]
    assert tok.decode(ids) == case["decode"]
    assert tok.decode(ids, skip_special_tokens=True) == case["decode_skip_special"]


def test_image_span_is_258_ids_of_path_bytes(tok):
    # Hand computation of golden case2's span: <img>, the 12 bytes of "images/a.png", 244 pads, </img>.
    ids = tok.encode("<img>images/a.png</img>")
    assert ids == [725, *b"images/a.png", *[727] * 244, 726]
    assert tok.decode(ids) == "<img>images/a.png</img>"


def test_path_of_256_bytes_has_no_pad(tok):
    golden = CASE7["errors"]["path_256_bytes"]
    path = bytes(golden["ids"][1:-1]).decode()
    assert len(path.encode()) == 256
    assert tok.encode(f"<img>{path}</img>") == golden["ids"]
    assert tok.decode(golden["ids"]) == f"<img>{path}</img>"


def test_path_of_257_bytes_raises(tok):
    path = "é" * 128 + "x"  # 257 UTF-8 bytes, 129 characters
    with pytest.raises(ImageSpanError) as err:
        tok.encode(f"a <img>{path}</img>")
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)
    message = str(err.value)
    assert CASE7["errors"]["path_257_bytes"]["error"] in message
    assert "255 UTF-8 bytes" in message and path in message and "257" in message


def test_unclosed_and_stray_closing_tag(tok):
    with pytest.raises(ImageSpanError, match=CASE7["errors"]["unclosed_img"]["error"]):
        tok.encode("Picture 1: <img>images/a.png")
    stray = CASE7["errors"]["extra_closing_tag"]
    text = tok.decode(stray["ids"])
    assert text == "text </img> more" and len(text.encode()) == stray["text_len_bytes"]
    assert tok.encode(text) == stray["ids"]


def test_special_token_inside_span_raises(tok):
    with pytest.raises(ImageSpanError, match="<ref>"):
        tok.encode("<img>a<ref>b</img>")


def test_keep_image_special(tok):
    ids = tok.encode("<|im_start|><ref>a</ref><box>(1,2),(3,4)</box><quad>q</quad><|extra_3|><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "a(1,2),(3,4)q"
    assert (tok.decode(ids, skip_special_tokens=True, keep_image_special=True)
            == "<ref>a</ref><box>(1,2),(3,4)</box><quad>q</quad>")


# docs/qwen-vl.md §2.4 malformed-span table, workbench column (tiny ids: <img> 725, </img> 726, <imgpad> 727).
IMG, END, PAD = 725, 726, 727


@pytest.mark.parametrize("ids, text, skipped", [
    # unclosed: no rewrite, the byte ids decode as ordinary tokens
    ([97, IMG, 98, 99, PAD], "a<img>bc<imgpad>", "abc"),
    # a merge (id 257 = " t" in the tiny vocab, golden case7) before the first pad: whole span left as tokens
    ([IMG, 97, 257, PAD, END], "<img>a t<imgpad></img>", "a t"),
    # a special id (<|im_end|>) before the first pad: same
    ([IMG, 97, 513, PAD, END], "<img>a<|im_end|><imgpad></img>", "a"),
    # no <imgpad> at all: every id between the tags is a path byte
    ([IMG, END], "<img></img>", ""),
    ([IMG, 97, 98, END], "<img>ab</img>", "ab"),
    # invalid UTF-8 path bytes: U+FFFD with the default errors="replace"
    ([IMG, 0xFF, 0xFE, 97, PAD, END], "<img>\ufffd\ufffda</img>", "\ufffd\ufffda"),
    # ids after the first pad inside a span are dropped
    ([IMG, 97, PAD, 98, END], "<img>a</img>", "a"),
    # stray closing tag
    ([97, END, 98], "a</img>b", "ab"),
    # id past the vocabulary (an lm_head padding row)
    ([97, 750, 98], "a\ufffdb", "ab"),
])
def test_malformed_spans_never_raise(tok, ids, text, skipped):
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == skipped


def test_malformed_spans_strict(tok):
    with pytest.raises(UnicodeDecodeError):
        tok.decode([IMG, 0xFF, PAD, END], errors="strict")
    with pytest.raises(ValueError, match="750"):
        tok.decode([97, 750], errors="strict")
    assert tok.decode([IMG, 0xFF, 97, PAD, END], errors="ignore") == "<img>a</img>"
    assert tok.decode([97, 750, 98], errors="ignore") == "ab"


def test_decode_accepts_tensor_and_int(tok):
    assert tok.decode(torch.tensor([72, 101, 288, 111])) == "Hello"
    assert tok.decode(511) == "<|endoftext|>"


def test_call_batch_padding(tok):
    batch = tok(["Hello world", "Hi"], padding=True, return_tensors="pt")
    hi = tok.encode("Hi")
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.shape == (2, 8)
    assert batch.input_ids[1].tolist() == hi + [511] * (8 - len(hi))
    assert batch.attention_mask[1].tolist() == [1] * len(hi) + [0] * (8 - len(hi))
    left = tok(["Hello world", "Hi"], padding=True, padding_side="left")
    assert left.input_ids[1] == [511] * (8 - len(hi)) + hi
    assert left.attention_mask[0] == [1] * 8
    assert tok("Hi", return_tensors="pt").input_ids.tolist() == [hi]
    with pytest.raises(ValueError, match="padding=True"):
        tok(["Hello world", "Hi"], return_tensors="pt")


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.padding_side = "left"
    try:
        tok.save_pretrained(tmp_path)
    finally:
        tok.padding_side = "right"
    # The vocabulary file is written back byte for byte; the release config keys survive.
    assert (tmp_path / "qwen.tiktoken").read_bytes() == (REF / "qwen.tiktoken").read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"] == json.loads((REF / "tokenizer_config.json").read_text())["auto_map"]
    again = QWenTokenizer.from_pretrained(tmp_path)
    assert again.special_tokens == tok.special_tokens and again.mergeable_ranks == tok.mergeable_ranks
    assert (again.model_max_length, again.padding_side) == (8192, "left")
    text = CASE7["strings"][7]["text"]
    assert again.encode(text) == tok.encode(text)


def test_byte_vocab_round_trips_utf8(tmp_path):
    write_byte_vocab(tmp_path / "qwen.tiktoken")
    tok = QWenTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 256 + 217 and tok.eod_id == 256 and tok.img_start_id == 256 + 214
    text = "naïve 猫 😀\r\n\ttabs <ref>x</ref> Picture 1: <img>图片/猫.png</img>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("héllo") == list("héllo".encode())


def test_byte_vocab_words_are_one_token_each(tmp_path):
    write_byte_vocab(tmp_path / "qwen.tiktoken", words=["the", " green", " grey"])
    tok = QWenTokenizer.from_pretrained(tmp_path)
    # chains: " g", " gr", " gre", " gree", " green", then " grey" reuses " gr"/" gre" (+1 each)
    assert len(tok) == 256 + 2 + 5 + 1 + 217 and tok.eod_id == 264
    ids = tok.encode("<ref>the green grey</ref> greens")
    assert [tok.decode([i]) for i in ids] == ["<ref>", "the", " green", " grey", "</ref>", " green", "s"]
    text = "the gre en, green-grey 猫"
    assert tok.decode(tok.encode(text)) == text


def test_bad_vocab_files(tmp_path):
    with pytest.raises(CheckpointError, match="qwen.tiktoken"):
        QWenTokenizer.from_pretrained(tmp_path)
    (tmp_path / "qwen.tiktoken").write_text("QQ== 0\nnot-a-line\n")
    with pytest.raises(CheckpointError, match="line 2"):
        QWenTokenizer.from_pretrained(tmp_path)
    (tmp_path / "qwen.tiktoken").write_text("QQ== 0\nQg== 2\n")
    with pytest.raises(WorkbenchError, match="ranks"):
        QWenTokenizer.from_pretrained(tmp_path)
