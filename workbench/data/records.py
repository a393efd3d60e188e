"""Data files -> `Conversation`s: the one parser of every input format, validated up front.

Three formats (docs/data-formats.md), told apart per record when `format: auto`:

- official (QwenLM/Qwen-VL finetune.py): `{"conversations": [{"from": "user", "value": ...}]}`,
  images inline as `Picture N: <img>path</img>\\n`, boxes inline as `<ref>..</ref><box>(x1,y1),(x2,y2)</box>`
  already on the [0, 1000) grid. The text is kept verbatim so ids match the original exactly.
- structured: `{"messages": [{"role", "content"}], "images": [...], "objects": [{"ref", "bbox"}],
  "bbox_format": "pixel" | "norm1000"}` with `<image>`, `<ref-object>` and `<bbox>` placeholders.
  `<image>` takes `images` in order. `<ref-object>` and `<bbox>` take `objects` in order, counted
  separately in user turns and in assistant turns, so "Where is <ref-object>?" -> "<ref-object><bbox>"
  names object 0 twice. A pixel box is normalised against the object's `image` (an index into
  `images`) or else the latest `<image>` before it.
- refcoco-eval (the official Qwen-VL RefCOCO evaluation JSONL): `{"image", "sent", "bbox": pixel
  [x1, y1, x2, y2], "height", "width"}`, read as a structured grounding sample (the first prompt of
  data_templates/grounding.yaml, the box clamped into the image as the official script does).

Training, `data check` and evaluation all read records here; evaluation takes its queries from
`grounding_targets` (every `<ref>` followed by its boxes in an assistant turn).

Every record is checked here, before any training starts, with cheap checks only: JSON syntax,
fields, roles, boxes against the image size, image paths, and each image's header (PIL opens it
lazily and `verify()` walks the file without decoding pixels). Problems come back as `DataError`s
naming file, record and field, so a run either stops before step 0 or skips them with a count.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.data.boxes import clip_box
from workbench.data.config import DataConfig
from workbench.errors import DataError, WorkbenchError
from workbench.model.image_processing import read_image_size

SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = ("system", "user", "assistant")
OFFICIAL_ROLES = ("user", "assistant")
# The tokenizer refuses a path of 257+ bytes, and a path of exactly 256 leaves no <imgpad>, which
# the model needs to find the path's end (golden case7 errors), so 255 is the real limit.
MAX_PATH_BYTES = 255
IMG_SPAN = re.compile(r"<img>(.*?)</img>", re.DOTALL)
BOX_SPAN = re.compile(r"<box>(.*?)</box>", re.DOTALL)
BOX_TEXT = re.compile(r"\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\)")
PLACEHOLDER = re.compile(r"(<image>|<ref-object>|<bbox>)")


@dataclass(frozen=True)
class Image:
    path: str                   # as written in the record: these bytes go into the <img> span
    file: Path                  # where it is on disk
    size: tuple[int, int]       # (width, height) from the header


@dataclass(frozen=True)
class ImageSlot:
    index: int                  # into Conversation.images
    numbered: bool              # structured `<image>`: the template's "Picture n: " form; official: bare <img>path</img>


@dataclass(frozen=True)
class RefSlot:
    text: str


@dataclass(frozen=True)
class BoxSlot:
    boxes: tuple[tuple[float, float, float, float], ...]
    size: tuple[int, int] | None  # the image's (width, height) for pixel boxes; None: already norm1000
    image: int | None = None      # the image the boxes are on (index into Conversation.images)


Part = str | ImageSlot | RefSlot | BoxSlot


@dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    images: tuple[Image, ...]
    file: str
    record: int
    system: str | None = None   # the record's own system message, if it has one
    meta: dict[str, Any] = field(default_factory=dict)  # the record's `meta` (split, category, ...)


@dataclass
class LoadResult:
    conversations: list[Conversation] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)
    n_rows: int = 0


def find_files(paths: tuple[str, ...] | list[str]) -> list[Path]:
    """Expand folders into their data files (recursively, sorted) and check that files exist."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"no {'/'.join(SUFFIXES)} files in folder {p}", file=str(p))
            out += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise DataError(f"unknown data file type '{p.suffix}' (use {', '.join(SUFFIXES)})", file=str(p))
            out.append(p)
        else:
            raise DataError("data file not found", file=str(p))
    return out


def load_conversations(paths: tuple[str, ...] | list[str], cfg: DataConfig) -> LoadResult:
    """Read and validate every record of every file; bad records become `problems`."""
    result = LoadResult()
    for item in iter_conversations(paths, cfg):
        result.n_rows += 1
        (result.problems if isinstance(item, DataError) else result.conversations).append(item)
    return result


def iter_conversations(paths: tuple[str, ...] | list[str], cfg: DataConfig,
                       headers: dict[Path, tuple[int, int] | DataError] | None = None
                       ) -> Iterator[Conversation | DataError]:
    """Every record as a Conversation or the DataError that says what is wrong with it, one at a time."""
    headers = {} if headers is None else headers  # one header read per distinct image
    for path in find_files(paths):
        for index, row in iter_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                yield parse_record(row, str(path), index, cfg, headers)
            except DataError as err:
                yield err


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """(record index, row) per record. JSON(L) is parsed here, line by line, so one bad line is
    one bad record named by its line (the `datasets` JSON loader fails the whole file and forces
    one Arrow schema on all rows, which breaks on `bbox` being one box here and a list there)."""
    for index, _, row in iter_lines(path):
        yield index, row


def iter_lines(path: Path) -> Iterator[tuple[int, int | None, dict[str, Any] | DataError]]:
    """(record index, line number in a JSONL file or None, row) per record."""
    if path.suffix == ".parquet":
        import datasets

        for i, row in enumerate(datasets.Dataset.from_parquet(str(path))):
            yield i, None, row
        return
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": one object per line in a .json file
                raise DataError(f"unreadable JSON: {err}", file=str(path)) from None
        else:
            if not isinstance(rows, list):
                raise DataError("a .json data file must hold a list of records", file=str(path))
            for i, row in enumerate(rows):
                yield i, None, row if isinstance(row, dict) else _not_object(path, i, row)
            return
    # JSONL: one line at a time, so a file of any size streams in constant memory.
    with path.open(encoding="utf-8", errors="replace") as lines:
        index = 0
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield index, lineno, row if isinstance(row, dict) else _not_object(path, index, row)
            except json.JSONDecodeError as err:
                yield index, lineno, DataError(f"unreadable JSON on line {lineno}: {err.msg} (column {err.colno})",
                                               file=str(path), record=index)
            index += 1


def _not_object(path: Path, index: int, row: Any) -> DataError:
    return DataError(f"a record must be a JSON object, got {type(row).__name__}", file=str(path), record=index)


PREFERENCE_FIELDS = ("chosen", "rejected")  # a record with these is a preference pair (data/preference.py)


def parse_record(row: dict[str, Any], file: str, index: int, cfg: DataConfig,
                 headers: dict[Path, tuple[int, int] | DataError] | None = None,
                 needs_answer: bool = True) -> Conversation:
    """One row -> Conversation, or DataError naming file, record and field. `needs_answer=False`
    reads a prompt (a preference record's, whose answers are its chosen and rejected)."""
    if needs_answer and any(k in row for k in PREFERENCE_FIELDS):
        raise DataError("a preference record (chosen, rejected): preference tuning reads it (method: dpo), "
                        "not conversation training", file=file, record=index,
                        field=next(k for k in PREFERENCE_FIELDS if k in row))
    fmt = cfg.format
    if fmt == "auto":
        fmt = ("official" if "conversations" in row else "structured" if "messages" in row
               else "refcoco_eval" if "sent" in row else None)
        if fmt is None:
            raise DataError("no 'conversations' (official format), 'messages' (structured format) or "
                            "'sent' (RefCOCO eval format)", file=file, record=index, field="conversations")
    ctx = _Context(file, index, cfg, {} if headers is None else headers,
                   Path(cfg.image_root) if cfg.image_root else Path(file).parent)
    ctx.needs_answer = needs_answer
    if fmt == "official":
        return _official(row, ctx)
    return _structured(_refcoco_eval(row, ctx) if fmt == "refcoco_eval" else row, ctx)


def grounding_targets(conv: Conversation) -> list[tuple[Image, str, list[tuple[float, float, float, float]]]]:
    """(image, ref, pixel boxes) for every `<ref>` an assistant turn follows with its boxes."""
    from workbench.data.boxes import denormalize_box

    out = []
    for turn in conv.turns:
        if turn.role != "assistant":
            continue
        for ref, boxes in zip(turn.parts, turn.parts[1:]):
            if isinstance(ref, RefSlot) and isinstance(boxes, BoxSlot) and boxes.image is not None:
                image = conv.images[boxes.image]
                pixel = [tuple(b) if boxes.size else denormalize_box(b, *image.size) for b in boxes.boxes]
                out.append((image, ref.text, pixel))
    return out


def refcoco_eval_row(row: dict[str, Any], file: str, index: int) -> tuple[str, str, list[float]]:
    """(image, sentence, pixel box clamped into the image) of an official RefCOCO eval row."""
    for key, kind in (("image", str), ("sent", str), ("bbox", list), ("height", int), ("width", int)):
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            raise DataError(f"missing or not a {kind.__name__}", file=file, record=index, field=key)
    box = row["bbox"]
    if len(box) != 4 or not all(_is_number(v) for v in box):
        raise DataError(f"bbox must be pixel [x1, y1, x2, y2], got {box!r}", file=file, record=index, field="bbox")
    w, h = row["width"], row["height"]
    return row["image"], row["sent"], clip_box(box, w, h)


def _refcoco_eval(row: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """An official RefCOCO eval row as the structured grounding sample it stands for."""
    from workbench.prompt import load_task_template

    image, sent, box = refcoco_eval_row(row, ctx.file, ctx.record)
    return {"images": [image], "messages": load_task_template("grounding").messages(0),
            "objects": [{"ref": sent, "bbox": box}],
            "meta": {"split": row.get("split"), "category": row.get("category")}}


@dataclass
class _Context:
    file: str
    record: int
    cfg: DataConfig
    headers: dict[Path, tuple[int, int] | DataError]
    root: Path
    needs_answer: bool = True

    def error(self, message: str, field: str) -> DataError:
        return DataError(message, file=self.file, record=self.record, field=field)


def _official(row: dict[str, Any], ctx: _Context) -> Conversation:
    messages = row.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise ctx.error("expected a non-empty list of {from, value} messages", "conversations")
    images: list[Image] = []
    turns = []
    for i, msg in enumerate(messages):
        where = f"conversations[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise ctx.error("expected {\"from\": ..., \"value\": \"text\"}", where)
        role = msg.get("from")
        if role not in OFFICIAL_ROLES:
            raise ctx.error(f"unknown role {role!r} (expected one of {', '.join(OFFICIAL_ROLES)})", f"{where}.from")
        text = msg["value"]
        _check_text_boxes(text, ctx, f"{where}.value")
        parts: list[Part] = []
        pos = 0
        for m in IMG_SPAN.finditer(text):
            parts += [text[pos:m.start()], ImageSlot(len(images), numbered=False)]
            images.append(_image(m.group(1), ctx, f"{where}.value"))
            pos = m.end()
        if "<img>" in text[pos:] or "</img>" in text[pos:]:
            raise ctx.error("unclosed or stray <img>/</img> tag", f"{where}.value")
        parts.append(text[pos:])
        turns.append(Turn(role, tuple(p for p in parts if p != "")))
    return _finish(turns, images, None, ctx, "conversations")


def _structured(row: dict[str, Any], ctx: _Context) -> Conversation:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ctx.error("expected a non-empty list of {role, content} messages", "messages")
    paths = row.get("images") or []
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ctx.error("expected a list of image paths", "images")
    images = [_image(p, ctx, f"images[{i}]") for i, p in enumerate(paths)]
    objects = row.get("objects") or []
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise ctx.error("expected a list of {ref, bbox} objects", "objects")
    bbox_format = row.get("bbox_format") or "pixel"  # Parquet fills a missing column with None
    if bbox_format not in ("pixel", "norm1000"):
        raise ctx.error(f"expected 'pixel' or 'norm1000', got {bbox_format!r}", "bbox_format")

    system = None
    turns: list[Turn] = []
    n_images = 0
    counters = {(role, kind): 0 for role in ROLES for kind in ("<ref-object>", "<bbox>")}
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ctx.error("expected {\"role\": ..., \"content\": \"text\"}", where)
        role, content = msg.get("role"), msg["content"]
        if role not in ROLES:
            raise ctx.error(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", f"{where}.role")
        if "<img>" in content or "</img>" in content:
            raise ctx.error("write <image> and list the file in 'images' instead of <img>..</img>", f"{where}.content")
        _check_text_boxes(content, ctx, f"{where}.content")
        if role == "system":
            if i != 0 or PLACEHOLDER.search(content):
                raise ctx.error("a system message must come first and hold plain text", f"{where}.role")
            system = content
            continue
        parts: list[Part] = []
        for piece in PLACEHOLDER.split(content):
            if piece == "<image>":
                if n_images >= len(images):
                    raise ctx.error(f"more <image> placeholders than the {len(images)} listed images", "images")
                parts.append(ImageSlot(n_images, numbered=True))
                n_images += 1
            elif piece in ("<ref-object>", "<bbox>"):
                k = counters[role, piece]
                counters[role, piece] += 1
                if k >= len(objects):
                    raise ctx.error(f"{piece} number {k + 1} in {role} turns but only {len(objects)} objects",
                                    "objects")
                obj = objects[k]
                if piece == "<ref-object>":
                    ref = obj.get("ref")
                    if not isinstance(ref, str) or not ref:
                        raise ctx.error("expected a non-empty string", f"objects[{k}].ref")
                    parts.append(RefSlot(ref))
                else:
                    parts.append(_boxes(obj, k, images, n_images - 1, bbox_format, ctx))
            elif piece:
                parts.append(piece)
        turns.append(Turn(role, tuple(parts)))
    if n_images != len(images):
        raise ctx.error(f"{len(images)} images listed but {n_images} <image> placeholders", "images")
    meta = row.get("meta")
    return _finish(turns, images, system, ctx, "messages", meta if isinstance(meta, dict) else {})


def _finish(turns: list[Turn], images: list[Image], system: str | None, ctx: _Context, fld: str,
            meta: dict[str, Any] | None = None) -> Conversation:
    if ctx.needs_answer and not any(t.role == "assistant" for t in turns):
        raise ctx.error("no assistant turn: nothing to learn from", fld)
    return Conversation(tuple(turns), tuple(images), ctx.file, ctx.record, system, meta or {})


def _boxes(obj: dict[str, Any], k: int, images: list[Image], latest: int, bbox_format: str,
           ctx: _Context) -> BoxSlot:
    where = f"objects[{k}].bbox"
    raw = obj.get("bbox")
    boxes = [raw] if isinstance(raw, list) and raw and not isinstance(raw[0], list) else raw
    if not isinstance(boxes, list) or not boxes or not all(
            isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b) for b in boxes):
        raise ctx.error(f"expected [x1, y1, x2, y2] or a list of such boxes, got {raw!r}", where)
    if bbox_format == "norm1000":
        for b in boxes:
            _check_box(b, (1000, 1000), ctx, where, "the [0, 1000) grid", upper_inclusive=False)
        on = latest if obj.get("image") is None else obj["image"]
        known = not isinstance(on, bool) and isinstance(on, int) and 0 <= on < len(images)
        return BoxSlot(tuple(tuple(b) for b in boxes), None, on if known else None)
    image = latest if obj.get("image") is None else obj["image"]
    if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < len(images):
        why = "no <image> comes before this <bbox>" if obj.get("image") is None else f"{image!r} is not an image index"
        raise ctx.error(f"pixel boxes need an image: {why}", f"objects[{k}].image")
    size = images[image].size
    for b in boxes:
        _check_box(b, size, ctx, where, f"the {size[0]}x{size[1]} image {images[image].path}", upper_inclusive=True)
    return BoxSlot(tuple(tuple(b) for b in boxes), size, image)


def _check_box(b: list[float], size: tuple[int, int], ctx: _Context, where: str, what: str,
               upper_inclusive: bool) -> None:
    x1, y1, x2, y2 = b
    if x1 > x2 or y1 > y2:
        raise ctx.error(f"box {b}: need x1 <= x2 and y1 <= y2", where)
    w, h = size
    inside = (x2 <= w and y2 <= h) if upper_inclusive else (x2 < w and y2 < h)
    if min(b) < 0 or not inside:
        raise ctx.error(f"box {b} is outside {what}", where)


def _check_text_boxes(text: str, ctx: _Context, where: str) -> None:
    """Boxes typed as Qwen-VL text must be `(x1,y1),(x2,y2)` integers on the [0, 1000) grid."""
    for m in BOX_SPAN.finditer(text):
        nums = BOX_TEXT.fullmatch(m.group(1))
        if not nums:
            raise ctx.error(f"<box>{m.group(1)}</box>: expected (x1,y1),(x2,y2) with integers", where)
        _check_box([int(v) for v in nums.groups()], (1000, 1000), ctx, where, "the [0, 1000) grid", False)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _image(path: str, ctx: _Context, where: str) -> Image:
    if not path:
        raise ctx.error("empty image path", where)
    if "://" in path:
        raise ctx.error(f"image URLs are not supported, download the file first: {path}", where)
    # The tokenizer NFC-normalises text, so the NFC bytes are what must fit in the span.
    n = len(unicodedata.normalize("NFC", path).encode("utf-8"))
    if n > MAX_PATH_BYTES:
        raise ctx.error(f"image path is {n} UTF-8 bytes; Qwen-VL's image span holds at most {MAX_PATH_BYTES}. "
                        f"Use a shorter path or set data.image_root: {path[:60]}...", where)
    file = (ctx.root / path).resolve()
    if not ctx.cfg.allow_outside_root and not file.is_relative_to(ctx.root.resolve()):
        raise ctx.error(f"image path {path} leads outside the image root {ctx.root} "
                        "(set data.allow_outside_root: true if that is intended)", where)
    if file not in ctx.headers:
        ctx.headers[file] = _read_header(file, ctx.cfg)
    size = ctx.headers[file]
    if isinstance(size, DataError):
        raise ctx.error(f"{size} ({path})", where)
    return Image(path, file, size)


def _read_header(file: Path, cfg: DataConfig) -> tuple[int, int] | DataError:
    try:
        return read_image_size(file, decode=cfg.check_images == "decode", max_pixels=cfg.max_image_pixels)
    except WorkbenchError as err:
        return DataError(str(err))
