"""Chat: boxes drawn where the answer says, streaming, multi-turn history, the CLI."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from workbench.cli.main import main
from workbench.eval.chat import AnswerStreamer, ChatSession, draw_answer
from workbench.eval.draw import PALETTE
from workbench.prompt import encode_query

WHITE = (255, 255, 255)
ANSWER = "<ref>cat</ref><box>(100,200),(500,800)</box> and <ref>dog</ref><box>(600,100),(900,500)</box>"


def assert_boxes_drawn(png, size=(200, 100)):
    """ANSWER on a 200x100 image, grid / 1000: cat x 20..100, y 20..80; dog x 120..180, y 10..50."""
    px = np.asarray(Image.open(png).convert("RGB"))
    assert px.shape == (size[1], size[0], 3)
    cat, dog = PALETTE[0], PALETTE[1]
    for x, y, color in [(20, 50, cat), (100, 50, cat), (60, 80, cat),   # left, right, bottom edges
                        (120, 30, dog), (180, 30, dog), (150, 50, dog),
                        (19, 50, WHITE), (101, 50, WHITE), (60, 81, WHITE), (60, 60, WHITE), (150, 30, WHITE)]:
        assert tuple(px[y, x]) == color, (x, y)


def test_draw_answer_puts_boxes_at_the_answer_coordinates(tmp_path):
    image = Image.new("RGB", (200, 100), WHITE)
    assert draw_answer(ANSWER, image, tmp_path / "out.png") == tmp_path / "out.png"
    assert_boxes_drawn(tmp_path / "out.png")
    assert draw_answer("no boxes here", image, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_cli_chat_draw_writes_the_answer_boxes(tmp_path, tiny_dir, monkeypatch, capsys):
    Image.new("RGB", (200, 100), WHITE).save(tmp_path / "white.png")
    monkeypatch.setattr(ChatSession, "ask", lambda self, question, streamer=None: ANSWER)
    rc = main(["chat", "--model", str(tiny_dir), "--image", str(tmp_path / "white.png"),
               "--draw", str(tmp_path / "drawn.png"), "--device", "cpu", "where are the animals?"])
    assert rc == 0 and "boxes drawn" in capsys.readouterr().err
    assert_boxes_drawn(tmp_path / "drawn.png")


def test_streamer_waits_for_complete_characters(tiny):
    _, tok = tiny
    out = io.StringIO()
    streamer = AnswerStreamer(tok, out)
    streamer.put(torch.tensor([[1, 2, 3]]))       # the prompt: not printed
    # TextStreamer shows text at word boundaries; whatever it has shown is a prefix of the answer,
    # so half of "é" (byte 195 alone) is never printed as a broken character.
    for ids in ([tok.ref_start_id], [195], [169], [tok.ref_end_id], [tok.im_end_id]):
        streamer.put(torch.tensor(ids))
        assert "<ref>é</ref>".startswith(out.getvalue())
    streamer.end()
    assert out.getvalue() == "<ref>é</ref>\n"


def test_multi_turn_history_keeps_the_image(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    calls = []
    generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    session = ChatSession(model, tok, str(tmp_path / "red.png"), max_new_tokens=6)
    out = io.StringIO()
    first = session.ask("what is this?", AnswerStreamer(tok, out))
    second = session.ask("and now?")
    assert [encode_query(tok, q)[0] for q, _ in session.history] == [f"Picture 1: <img>{tmp_path / 'red.png'}</img>\nwhat is this?",
                                              "and now?"]
    assert session.history[0][1] == first and session.history[1][1] == second
    # The second prompt re-encodes the first turn, image included, so the pixels go in again.
    assert all(c["pixel_values"].shape == (1, 3, 56, 56) for c in calls)
    assert tok.decode(calls[1]["input_ids"][0].tolist()).count("<img>") == 1
    assert len(calls[1]["input_ids"][0]) > len(calls[0]["input_ids"][0])
    assert out.getvalue().endswith("\n")


def test_cli_chat_reads_questions_from_stdin(tmp_path, tiny_dir, monkeypatch, capsys):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    asked = []
    real_ask = ChatSession.ask
    monkeypatch.setattr(ChatSession, "ask", lambda self, q, streamer=None: asked.append(q) or real_ask(self, q, streamer))
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\n  second one \n"))
    rc = main(["chat", "--model", str(tiny_dir), "--image", str(tmp_path / "red.png"), "--max-new-tokens", "4",
               "--device", "cpu"])
    assert rc == 0 and asked == ["first question", "second one"]
    assert capsys.readouterr().out.count("\n") == 2  # one streamed answer line per question
