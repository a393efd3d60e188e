"""ChatML turns -> token ids: training labels and inference prompts through one turn encoder.

A turn is encoded piece by piece, as finetune.py's `preprocess` and the release's `make_context`
both do: `turn_start` ("<|im_start|>user\\n"), the content, `turn_end` ("<|im_end|>"), and
`turn_sep` ("\\n") between turns; the pieces come from the chat template (template.py). Encoding the
pieces separately matters: BPE never merges across a piece boundary, so the ids equal the release's.

Content is encoded with only the nine VL tags special (`<img>`, `<ref>`, `<box>`, ...): typed ChatML
control text such as `<|im_start|>` stays plain text, as in `make_context`. Text from a user or a
client (`{"text": ...}` parts of a list-format query) keeps only `<ref>`, `<box>` and `<quad>` (a
referring question names a box): a typed `<img>/etc/passwd</img>` is just characters, never an
image span the model would open.

Training labels, two modes (data.label_mode):
- `official` reproduces finetune.py exactly: `<|im_start|>`, `<|im_end|>` and the `\\n` after it are
  labels in EVERY turn (system and user included), plus the assistant content; a first turn not from
  the user is dropped. Content is encoded with every special token allowed, as in the original.
- `assistant` (default) supervises only an assistant turn's content and its `<|im_end|>`. The `\\n`
  after `<|im_end|>` is not supervised: generation stops at `<|im_end|>`, so the model never writes it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from workbench.errors import DataError
from workbench.model.modeling import IGNORE_INDEX
from workbench.model.tokenizer import (
    BOX_END,
    BOX_START,
    IMAGE_ST,
    IMG_END,
    IMG_PAD,
    IMG_START,
    REF_END,
    REF_START,
    QWenTokenizer,
)
from workbench.prompt.template import ChatTemplate, load_template

DEFAULT_MAX_WINDOW_SIZE = 6144  # the release's generation_config max_window_size
Special = Literal["all"] | Collection[str]
Query = str | Sequence[dict[str, Any]]  # a trusted text, or list-format parts (text parts escaped)
# What typed text may use: the grounding tags, never an image span (the model would open the path).
TEXT_SPECIAL = frozenset(IMAGE_ST) - {IMG_START, IMG_END, IMG_PAD}


@dataclass(frozen=True)
class RenderedTurn:
    role: str
    text: str                   # the content, between turn_start and turn_end
    images: tuple[int, ...]     # indices into the conversation's images, in span order


@dataclass
class Sample:
    """One tokenised training conversation."""

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]        # token offset just after each turn (the system turn first)
    turn_roles: list[str]
    turn_images: list[int]      # how many images each turn holds
    images: list[Path] = field(default_factory=list)   # image files, in span order
    file: str = ""
    record: int = -1

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class _Pieces:
    start: list[int]
    content: list[int]
    end: list[int]
    sep: list[int]


def _turn(tokenizer: QWenTokenizer, template: ChatTemplate, role: str, content: list[int]) -> _Pieces:
    return _Pieces(tokenizer.encode(template.start(role)), content, tokenizer.encode(template.turn_end),
                   tokenizer.encode(template.turn_sep))


# ---- training ------------------------------------------------------------------------------------

def tokenize(turns: Sequence[RenderedTurn], tokenizer: Any, template: ChatTemplate, mode: str = "assistant",
             escape_special_text: bool = True, image_files: Sequence[Path] = ()) -> Sample:
    """Ids and labels for one conversation (`turns[0]` is the system turn)."""
    if mode == "official" and len(turns) > 1 and turns[1].role != "user":
        turns = [turns[0], *turns[2:]]  # finetune.py drops a first message that is not the user's
    special: Special = set(IMAGE_ST) if escape_special_text else "all"
    sample = Sample([], [], [], [], [])
    for turn in turns:
        p = _turn(tokenizer, template, turn.role, tokenizer.encode(turn.text, allowed_special=special))
        answer = turn.role == "assistant"
        if mode == "official":
            labels = ([p.start[0]] + [IGNORE_INDEX] * (len(p.start) - 1)
                      + (p.content if answer else [IGNORE_INDEX] * len(p.content)) + p.end + p.sep)
        else:
            shown = p.content + p.end if answer else [IGNORE_INDEX] * (len(p.content) + len(p.end))
            labels = [IGNORE_INDEX] * len(p.start) + shown + [IGNORE_INDEX] * len(p.sep)
        sample.input_ids += p.start + p.content + p.end + p.sep
        sample.labels += labels
        sample.turn_ends.append(len(sample.input_ids))
        sample.turn_roles.append(turn.role)
        sample.turn_images.append(len(turn.images))
        sample.images += [image_files[i] for i in turn.images]
    return sample


def official_preprocess(sources: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_len: int,
                        system_message: str | None = None) -> dict[str, torch.Tensor]:
    """finetune.py `preprocess` in its own batch form: right-pad with the pad id, then a plain
    `[:max_len]` slice (which can cut through an image span; the training pipeline never does,
    see data/length.py), int32 ids/labels and a bool mask `input_ids != pad`."""
    template = load_template("chatml")
    system = template.default_system if system_message is None else system_message
    pad = tokenizer.pad_token_id
    ids, labels = [], []
    for conversation in sources:
        turns = [RenderedTurn("system", system, ())]
        turns += [RenderedTurn(m["from"], m["value"], ()) for m in conversation]
        s = tokenize(turns, tokenizer, template, mode="official", escape_special_text=False)
        ids.append((s.input_ids + [pad] * (max_len - len(s)))[:max_len])
        labels.append((s.labels + [IGNORE_INDEX] * (max_len - len(s)))[:max_len])
    input_ids = torch.tensor(ids, dtype=torch.int32)
    return {"input_ids": input_ids, "labels": torch.tensor(labels, dtype=torch.int32),
            "attention_mask": input_ids.ne(pad)}


# ---- inference -----------------------------------------------------------------------------------

def encode_query(tokenizer: QWenTokenizer, query: Query, template: ChatTemplate | None = None
                 ) -> tuple[str, list[int]]:
    """(text, ids) of a user turn's content.

    A string is trusted text (a data file's, or the release's `chat(query)`): its VL tags are tags.
    A list holds list-format parts: `{"image": label}` becomes the template's image span (the
    pixels go in as pixel_values; the label is only text), `{"text": t}` is encoded with only
    TEXT_SPECIAL special, so nothing a person types becomes an image span or a ChatML control token.
    """
    if isinstance(query, str):
        return query, tokenizer.encode(query, allowed_special=IMAGE_ST)
    template = template or load_template("chatml")
    text, ids, n_images = "", [], 0
    for part in query:
        if "image" in part:
            n_images += 1
            piece = template.image.format(n=n_images, path=part["image"])
            ids += tokenizer.encode(piece, allowed_special=IMAGE_ST)
        elif "text" in part:
            piece = part["text"]
            ids += tokenizer.encode(piece, allowed_special=TEXT_SPECIAL, disallowed_special=())
        else:
            raise DataError(f"unsupported query part {part!r}: expected {{'image': ...}} or {{'text': ...}}")
        text += piece
    return text, ids


def make_context(tokenizer: QWenTokenizer, query: Query,
                 history: Sequence[tuple[Query, str | None]] | None = None,
                 system: str | None = None,
                 max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
                 template: ChatTemplate | None = None) -> tuple[str, list[int]]:
    """ChatML prompt `(raw_text, ids)` for `query` after `history`, ending in `assistant\\n`.

    The release's `make_context`: history turns are kept newest first while system + kept turns
    stay under `max_window_size` (strict); the current query is never cut and not counted.
    `system` None is the template's default system message.
    """
    template = template or load_template("chatml")
    system = template.default_system if system is None else system

    def turn(role: str, content: Query) -> tuple[str, list[int], _Pieces]:
        text, ids = encode_query(tokenizer, content, template) if role == "user" else \
            (content, tokenizer.encode(content, allowed_special=IMAGE_ST))
        p = _turn(tokenizer, template, role, ids)
        return f"{template.start(role)}{text}{template.turn_end}", p.start + p.content + p.end, p

    system_text, system_ids, p = turn("system", system)
    sep, sep_text = p.sep, template.turn_sep
    raw_text, context = "", []
    for turn_query, turn_response in reversed(history or []):
        query_text, query_ids, _ = turn("user", turn_query)
        if turn_response is None:  # the release's layout for an unanswered turn: a separator after it
            turn_ids, turn_text = sep + query_ids + sep, sep_text + query_text + sep_text
        else:
            answer_text, answer_ids, _ = turn("assistant", turn_response)
            turn_ids = sep + query_ids + sep + answer_ids
            turn_text = sep_text + query_text + sep_text + answer_text
        if len(system_ids) + len(turn_ids) + len(context) >= max_window_size:
            break
        context, raw_text = turn_ids + context, turn_text + raw_text

    query_text, query_ids, _ = turn("user", query)
    ids = system_ids + context + sep + query_ids + sep + tokenizer.encode(template.start("assistant"))
    raw_text = system_text + raw_text + sep_text + query_text + sep_text + template.start("assistant")
    return raw_text, ids


def get_stop_words_ids(tokenizer: QWenTokenizer) -> list[list[int]]:
    """ChatML stop sequences: `<|im_end|>`, `<|im_start|>`."""
    return [[tokenizer.im_end_id], [tokenizer.im_start_id]]


def decode_tokens(tokens: Iterable[int] | torch.Tensor, tokenizer: QWenTokenizer, raw_text_len: int,
                  context_length: int, errors: str = "replace") -> str:
    """The response text of `tokens` (prompt + generated ids), as chat() returns it.

    Decodes up to the first `<|im_start|>`/`<|im_end|>` after the prompt and drops the
    prompt's `raw_text_len` characters. Quirk kept from the release: with no stop id the
    search ends on the last index, so the last generated token is dropped.
    """
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    stop = {tokenizer.im_start_id, tokenizer.im_end_id}
    end = context_length
    for end in range(context_length, len(tokens)):
        if tokens[end] in stop:
            break
    return tokenizer.decode(tokens[:end], errors=errors)[raw_text_len:].strip()


def box_text(ref: str | None, boxes: Iterable[Sequence[int]]) -> str:
    """`<ref>r</ref><box>(x1,y1),(x2,y2)</box>...` on the [0, 1000) grid."""
    out = f"{REF_START}{ref}{REF_END}" if ref is not None else ""
    return out + "".join(f"{BOX_START}(%d,%d),(%d,%d){BOX_END}" % tuple(box[:4]) for box in boxes)
