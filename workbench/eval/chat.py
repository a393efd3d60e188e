"""Chat with a model (+ adapter): one image, multi-turn history, answers streamed token by token.

The prompt is the release's `chat()` context (make_context, ChatML, stop words); the image goes
in as `pixel_values`. Streaming shows what `chat_stream` yields: the generated ids decoded with
special tokens skipped except the ref/box tags (keep_image_special), invalid UTF-8 ignored
until the bytes of a character are complete. `draw_answer` is the workbench's
`draw_bbox_on_latest_picture`: boxes from the answer, grid / 1000 (not the eval's / 999).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from workbench.data.boxes import denormalize_box
from workbench.errors import CheckpointError, first_line
from workbench.eval.draw import draw_boxes, save_png
from workbench.eval.parse import parse_boxes
from workbench.model.image_processing import load_image, preprocess
from workbench.prompt import Query, decode_tokens, get_stop_words_ids, make_context


def load_for_inference(model: str, adapter: str | None = None, dtype: str | None = None,
                       device: str | None = None):
    """(model, tokenizer) ready for generation; a PEFT adapter folder is applied on top (not merged)."""
    from workbench.api import load_model, load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(model, dtype=dtype, device=device)
    if adapter is not None:
        base = load_adapter(base, adapter)
    return base, load_tokenizer(model)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def load_adapter(base, adapter: str | Path):
    """PeftModel of `base` with the adapter folder applied; every way it can fail is one line."""
    from peft import PeftModel

    from workbench.model.checkpoint import check_finite, load_weight_file

    folder = Path(adapter)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise CheckpointError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config}: not valid JSON ({first_line(err)})") from None
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{adapter}: no {' or '.join(ADAPTER_WEIGHTS)} (the adapter's weights)")
    check_finite(load_weight_file(weights), weights)  # also refuses a pickled payload, by name
    try:
        return PeftModel.from_pretrained(base, str(folder)).eval()
    except RuntimeError as err:  # load_state_dict: size mismatch
        raise CheckpointError(f"{adapter}: does not fit the base model (trained on another base?): "
                              f"{first_line(err, 160)}") from None
    except ValueError as err:  # PEFT: target modules not in the model, and similar
        raise CheckpointError(f"{adapter}: cannot be applied to this model: {first_line(err, 200)}") from None


class AnswerStreamer(TextStreamer):
    """transformers' TextStreamer writing to `out`: the answer as `generate` produces it, prompt skipped,
    special tokens dropped except the ref/box tags, a half-finished UTF-8 character held back."""

    def __init__(self, tokenizer, out: TextIO | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, errors="ignore",
                         keep_image_special=True)
        self.out = out or sys.stdout  # looked up now: sys.stdout may be replaced

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


class ChatSession:
    """One conversation about (at most) one image: `ask` returns the answer and keeps history."""

    def __init__(self, model, tokenizer, image: str | None = None, max_new_tokens: int = 512,
                 do_sample: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.image_path = image
        self.image = load_image(image) if image is not None else None
        self.history: list[tuple[Query, str]] = []
        self.max_new_tokens, self.do_sample = max_new_tokens, do_sample

    def ask(self, question: str, streamer: BaseStreamer | None = None) -> str:
        # The typed question is text only; the picture goes with the first question as a span
        # whose pixels are passed in, so nothing typed can make the model open a file.
        query: list[dict[str, str]] = [{"text": question}]
        if self.image_path is not None and not self.history:
            query.insert(0, {"image": self.image_path})
        raw_text, ids = make_context(self.tokenizer, query, self.history)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        kwargs = {}
        if self.image is not None and self.tokenizer.img_start_id in ids:  # the window may have dropped it
            size = unwrap(self.model).transformer.visual.image_size
            kwargs["pixel_values"] = preprocess(self.image, size)[None].to(device)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                      stop_words_ids=get_stop_words_ids(self.tokenizer), streamer=streamer,
                                      **kwargs)
        answer = decode_tokens(out[0], self.tokenizer, len(raw_text), len(ids))
        self.history.append((query, answer))
        return answer


def unwrap(model):
    """The QWenLMHeadModel under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def draw_answer(answer: str, image: Image.Image, out: str | Path) -> Path | None:
    """Draw the answer's usable boxes (with their refs) on `image` and save a PNG; None if it has none."""
    parsed = [p for p in parse_boxes(answer) if p.problem is None]
    if not parsed:
        return None
    boxes = [(p.ref, denormalize_box(p.box, *image.size)) for p in parsed]
    return save_png(draw_boxes(image, boxes), out)
