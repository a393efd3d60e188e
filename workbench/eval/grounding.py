"""Grounding evaluation (RefCOCO protocol) and the `ground` API.

Queries come from the structured format (every object with a ref and boxes) or from the official
Qwen-VL RefCOCO eval JSONL (`image`, `sent`, `bbox` pixel x1,y1,x2,y2, `height`, `width`).
Generation is greedy and batched with LEFT padding, so every row's answer starts at the same
column; images go in as `pixel_values`, so the path inside `<img>..</img>` is only text.

Prompts:
  official  `<img>{image}</img><ref>{sent}</ref><box>`, no ChatML (eval_mm/evaluate_grounding.py:
            base-model protocol, max_new_tokens 28, min_new_tokens 10)
  chat      ChatML (make_context), user turn "Picture 1: <img>..</img>\\n" + the first prompt of
            data_templates/grounding.yaml, the way converted training data is rendered
  any text  a ChatML user prompt with `<ref-object>` (and optionally `<image>`) placeholders
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from workbench.atomic import write_json
from workbench.data.boxes import GRID, Box, denormalize_box
from workbench.data.config import DataConfig
from workbench.data.records import grounding_targets, load_conversations
from workbench.errors import DataError, WorkbenchError
from workbench.eval.chat import unwrap
from workbench.eval.draw import draw_boxes, save_png
from workbench.eval.metrics import Scored, score, summarize
from workbench.eval.parse import failure, parse_boxes, parse_official, pick_box
from workbench.model.image_processing import load_image, preprocess
from workbench.prompt import from_list_format, get_stop_words_ids, load_task_template, make_context

OFFICIAL_PROMPT = "<img>{image}</img><ref>{sent}</ref><box>"
OFFICIAL_MAX_NEW_TOKENS = 28  # eval_mm/evaluate_grounding.py
CHAT_MAX_NEW_TOKENS = 128
GT_COLOR, PRED_COLOR = (0, 200, 0), (230, 0, 0)


@dataclass
class Query:
    """One phrase to ground in one image; `gt` boxes are pixels on the original image."""

    image: str          # as written in the data file (the text inside <img>..</img>)
    file: Path          # where it is on disk
    phrase: str
    gt: list[Box]
    split: str | None = None
    category: str | None = None


def load_queries(path: str | Path, image_root: str | Path | None = None,
                 allow_outside_root: bool = False) -> list[Query]:
    """Queries of a data file in any of the formats training reads (data/records.py), or the
    official RefCOCO eval JSONL: every `<ref>` an assistant turn follows with its boxes.

    Image paths follow the training rule: relative to `image_root`, else the data file's folder,
    and kept inside it unless `allow_outside_root`.
    """
    cfg = DataConfig(train=(str(path),), image_root=None if image_root is None else str(image_root),
                     allow_outside_root=allow_outside_root)
    loaded = load_conversations([str(path)], cfg)
    if loaded.problems:
        raise loaded.problems[0]
    queries = [Query(image.path, image.file, ref, boxes, conv.meta.get("split"), conv.meta.get("category"))
               for conv in loaded.conversations for image, ref, boxes in grounding_targets(conv)]
    if not queries:
        raise DataError("no grounding queries (objects with a ref and a bbox)", file=str(path))
    return queries


def prompt_ids(tokenizer, image: str, phrase: str, prompt: str = "official") -> list[int]:
    """Token ids of the grounding prompt for one (image, phrase); see the module docstring."""
    if prompt == "official":
        return tokenizer.encode(OFFICIAL_PROMPT.format(image=image, sent=phrase))
    template = load_task_template("grounding").user[0] if prompt == "chat" else prompt
    if "<ref-object>" not in template:
        raise DataError(f"a grounding prompt needs a <ref-object> placeholder, got {template!r}", field="prompt")
    text = template.replace("<image>", "").replace("<ref-object>", f"<ref>{phrase}</ref>")
    query = from_list_format([{"image": image}, {"text": text}])
    return make_context(tokenizer, query)[1]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[list[int]], images: Sequence[Image.Image], *,
                     max_new_tokens: int = 28, min_new_tokens: int = 0, stop_words: bool = True) -> list[str]:
    """Greedy answers for a batch of one-image prompts, left-padded. The text keeps the
    ref/box tags (decode with keep_image_special, as chat_stream) and ends at the first stop id."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    size = unwrap(model).transformer.visual.image_size
    pixel_values = torch.stack([preprocess(im, size) for im in images]).to(device)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                         num_beams=1, eos_token_id=tokenizer.eod_id, pad_token_id=pad,
                         stop_words_ids=get_stop_words_ids(tokenizer) if stop_words else None)
    stops = {tokenizer.eod_id, tokenizer.im_end_id, tokenizer.im_start_id}
    answers = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True, keep_image_special=True).strip())
    return answers


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """An evaluation folder that holds no earlier report: refused unless `overwrite`, then cleared,
    so no PNG of an older run is left beside the new report."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise WorkbenchError(f"--out {out}: already holds files (an earlier report?); pass --overwrite "
                                 "to replace them or choose another folder")
        shutil.rmtree(out)
    return out


def default_max_new_tokens(prompt: str) -> int:
    """The official protocol's 28 tokens fit one box; a chat answer repeats the ref and may hold several."""
    return OFFICIAL_MAX_NEW_TOKENS if prompt == "official" else CHAT_MAX_NEW_TOKENS


def evaluate_grounding(model, tokenizer, queries: Sequence[Query], *, prompt: str = "official",
                       batch_size: int = 8, max_new_tokens: int | None = None, parser: str = "robust",
                       divisor: int = GRID, out_dir: str | Path | None = None, n_images: int = 16,
                       about: dict | None = None) -> dict:
    """Generate, parse, score. Returns the report (metrics + per-sample results) and, with
    `out_dir`, writes `report.json` and `samples/NNNN.png` (true box green, predicted red) for
    the first `n_images` queries. `parser="official"` and `divisor=999` reproduce published numbers.
    `about` (model, adapter, data and its sha256) is recorded in the report as it is.
    """
    if parser not in ("robust", "official"):
        raise DataError(f"unknown parser {parser!r} (robust or official)", field="parser")
    max_new_tokens = max_new_tokens or default_max_new_tokens(prompt)
    results: list[Scored] = []
    official = prompt == "official"
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        images = [load_image(q.file) for q in batch]
        answers = generate_answers(model, tokenizer, [prompt_ids(tokenizer, q.image, q.phrase, prompt) for q in batch],
                                   images, max_new_tokens=max_new_tokens, min_new_tokens=10 if official else 0,
                                   stop_words=not official)
        for q, image, answer in zip(batch, images, answers):
            if parser == "official":
                grid, why = parse_official(answer), "no box"
            else:
                parsed = parse_boxes(answer)
                grid, why = pick_box(parsed, q.phrase), failure(parsed)
            r = score(grid, q.gt, *image.size, ref=q.phrase, answer=answer, divisor=divisor, split=q.split,
                      category=q.category, image=q.image, failure=why)
            if out_dir is not None and len(results) < n_images:
                _draw_result(image, r, Path(out_dir) / "samples" / f"{len(results):04d}.png")
            results.append(r)
    report = {"about": about or {},
              "settings": {"prompt": prompt, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                           "min_new_tokens": 10 if official else 0, "greedy": True,
                           "parser": parser, "divisor": divisor},
              "metrics": summarize(results), "samples": [r.to_json() for r in results]}
    if out_dir is not None:
        write_json(Path(out_dir) / "report.json", report)
    return report


def _draw_result(image: Image.Image, r: Scored, path: Path) -> None:
    boxes = [(f"true: {r.ref}", g) for g in r.gt] + ([(f"pred IoU {r.iou:.2f}", r.pred)] if r.pred else [])
    colors = [GT_COLOR] * len(r.gt) + [PRED_COLOR] * (r.pred is not None)
    caption = None if r.pred is not None else f"no box ({r.failure})" if r.failure != "no box" else "no box"
    save_png(draw_boxes(image, boxes, colors, caption=caption), path)


def ground(model, tokenizer, image: str | Path | Image.Image, phrase: str, *, prompt: str = "chat",
           max_new_tokens: int = 64) -> list[Box]:
    """Pixel boxes (x1, y1, x2, y2) of `phrase` in `image`, as the model answers (grid / 1000).

    Boxes labelled with another ref are left out unless the answer labels none with `phrase`.
    """
    picture = image if isinstance(image, Image.Image) else load_image(image)
    name = "image" if isinstance(image, Image.Image) else Path(image).name  # text only: pixels go in as pixel_values
    [answer] = generate_answers(model, tokenizer, [prompt_ids(tokenizer, name, phrase, prompt)], [picture],
                                max_new_tokens=max_new_tokens, stop_words=prompt != "official")
    parsed = [p for p in parse_boxes(answer) if p.problem is None]
    mine = [p for p in parsed if p.ref is not None and p.ref.lower() == phrase.strip().lower()]
    return [denormalize_box(p.box, *picture.size) for p in (mine or parsed)]
