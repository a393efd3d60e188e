"""make_context / decode_tokens / list format against the original's goldens (tiny vocab)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_REF as REF
from workbench.errors import DataError
from workbench.model.tokenizer import ImageSpanError, QWenTokenizer
from workbench.prompt import (
    decode_tokens,
    from_list_format,
    get_stop_words_ids,
    make_context,
    to_list_format,
)

GOLDEN = json.loads((REF / "golden.json").read_text())


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer.from_pretrained(REF)


@pytest.mark.parametrize("name", ["case1", "case2", "case3"])
def test_make_context_single_turn(tok, name):
    case = GOLDEN[name]
    raw_text, ids = make_context(tok, case["query"], history=case["history"], system=case["system"])
    assert raw_text == case["raw_text"]
    assert ids == case["input_ids"]
    assert [i for i, t in enumerate(ids) if t == tok.img_start_id] == case.get("img_start_positions", [])
    # Image spans decode back to <img>path</img>, so the prompt decodes to raw_text exactly.
    assert tok.decode(ids) == raw_text


def test_make_context_history(tok):
    case = GOLDEN["make_context_history"]
    history = [tuple(turn) for turn in case["history"]]
    raw_text, ids = make_context(tok, case["query"], history=history, system=case["system"])
    assert (raw_text, ids) == (case["raw_text"], case["input_ids"])
    assert tok.decode(ids) == raw_text

    window = GOLDEN["make_context_history_window300"]
    raw_text, ids = make_context(tok, case["query"], history=history, max_window_size=window["max_window_size"])
    assert (raw_text, ids) == (window["raw_text"], window["input_ids"])


def test_make_context_window_is_strict(tok):
    # Hand count: system = 16 ids, the newest turn 48 ids (docs/qwen-vl.md §6.1), so a budget of exactly
    # 64 drops it (16 + 48 < 64 is false) and 65 keeps it.
    history = [tuple(turn) for turn in GOLDEN["make_context_history"]["history"]]
    _, alone = make_context(tok, "Thank you.")
    _, at_64 = make_context(tok, "Thank you.", history=history, max_window_size=64)
    _, at_65 = make_context(tok, "Thank you.", history=history, max_window_size=65)
    assert at_64 == alone and len(at_65) == len(alone) + 48


def test_make_context_typed_chatml_is_plain_text(tok):
    _, ids = make_context(tok, "x<|im_start|>y")
    assert ids.count(tok.im_start_id) == 3  # system, user, assistant: none from the query


@pytest.mark.parametrize("name", ["case1", "case2"])
def test_decode_tokens_case6(tok, name):
    case = GOLDEN["case6"][name]
    raw_text, prompt = make_context(tok, GOLDEN[name]["query"])
    assert prompt == case["prompt_ids"]
    tokens = case["prompt_ids"] + case["generated_ids"]
    response = decode_tokens(torch.tensor(tokens), tok, len(raw_text), len(prompt))
    assert response == case["chat_response"] == case["response_from_decode_tokens"]
    assert tok.decode(case["generated_ids"]) == case["decoded_generated_ids"]
    # No stop id was generated, so the release quirk drops the last token.
    assert response == tok.decode(case["generated_ids"][:-1]).strip()


def test_decode_tokens_stops_at_im_end(tok):
    raw_text, prompt = make_context(tok, "Hi")
    tokens = prompt + tok.encode(" Hello world ") + [tok.im_end_id, tok.eod_id]
    assert decode_tokens(tokens, tok, len(raw_text), len(prompt)) == "Hello world"
    assert decode_tokens(prompt, tok, len(raw_text), len(prompt)) == ""


def test_stop_words(tok):
    assert get_stop_words_ids(tok) == GOLDEN["generation_config_used"]["stop_words_ids"] == [[513], [512]]


def test_from_list_format_golden():
    elements = [{"image": "images/a.png"}, {"text": "Hi"}, {"ref": "a dog", "box": [[12, 34, 560, 780]]},
                {"image": "images/b.png"}]
    assert from_list_format(elements) == GOLDEN["case7"]["from_list_format"]
    assert from_list_format([{"image": "images/a.png"}, {"text": "What is in the picture?"}]) == GOLDEN["case2"]["query"]


@pytest.mark.parametrize("elements, text", [
    ([], ""),
    ([{"text": ""}], ""),
    ([{"image": "p.png", "text": "ignored"}], "Picture 1: <img>p.png</img>\n"),
    ([{"text": "t", "box": [[1, 2, 3, 4]]}], "t"),
    ([{"ref": "r", "box": []}], "<ref>r</ref>"),
    ([{"box": [[1.9, -1.5, 3, 4, 99], [5, 6, 7, 8]]}], "<box>(1,-1),(3,4)</box><box>(5,6),(7,8)</box>"),
])
def test_from_list_format_edges(elements, text):
    assert from_list_format(elements) == text


def test_from_list_format_rejects_unknown_element():
    with pytest.raises(DataError, match="'ref'"):
        from_list_format([{"ref": "r"}])


def test_to_list_format_golden(tok):
    text = "Picture 1: <img>images/a.png</img>\n<ref>a dog</ref><box>(12,34),(560,780)</box> ok"
    assert to_list_format(tok, text) == GOLDEN["case7"]["to_list_format"]


@pytest.mark.parametrize("text, elements", [
    ("", []),
    ("<img></img>", [{"image": ""}]),
    ("a</img>b<imgpad>c<|endoftext|>", [{"text": "a</img>b<imgpad>c<|endoftext|>"}]),
    ("<ref>a<box>b</box>c</ref>", [{"ref": "a<box>b</box>c"}]),
    ("<box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>", [{"box": "(1,2),(3,4)"}, {"box": "(5,6),(7,8)"}]),
    ("<quad>q</quad>", [{"quad": "q"}]),
    ("cafe\u0301", [{"text": "caf\u00e9"}]),
])
def test_to_list_format_edges(tok, text, elements):
    assert to_list_format(tok, text) == elements


@pytest.mark.parametrize("text", ["<img>a.png", "<ref>a", "<box>x</ref>", "<quad>q"])
def test_to_list_format_unclosed(tok, text):
    with pytest.raises(ImageSpanError, match="Unclosed image token"):
        to_list_format(tok, text)


def test_to_list_format_disallowed_special(tok):
    with pytest.raises(ValueError, match="disallowed special token"):
        to_list_format(tok, "x<|im_start|>y")
