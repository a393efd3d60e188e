"""The release tokenizer's list format: `[{'image': p}, {'text': t}, {'ref': r, 'box': [...]}]` <-> text."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from workbench.errors import DataError
from workbench.model.tokenizer import ENDOFTEXT, IMAGE_ST, ImageSpanError, QWenTokenizer
from workbench.prompt.chatml import box_text
from workbench.prompt.template import load_template


def from_list_format(elements: Iterable[dict]) -> str:
    """List-format elements -> prompt text (images as the template's `Picture N: <img>..</img>\\n`)."""
    image = load_template("chatml").image
    out, n_images = "", 0
    for element in elements:
        # Keys are tested in this order and the first hit wins, as in the release.
        if "image" in element:
            n_images += 1
            out += image.format(n=n_images, path=element["image"])
        elif "text" in element:
            out += element["text"]
        elif "box" in element:
            out += box_text(element.get("ref"), element["box"])
        else:
            raise DataError(f"unsupported list-format element {element!r}: "
                            "expected a dict with an 'image', 'text' or 'box' key")
    return out


def to_list_format(tokenizer: QWenTokenizer, text: str) -> list[dict[str, str]]:
    """Split text on `<img>`/`<ref>`/`<box>`/`<quad>` pairs into list-format elements.

    The path inside `<img>` stays plain text (no 258-id rewrite); spans do not nest.
    """
    ids = tokenizer.encoding.encode(unicodedata.normalize("NFC", text),
                                    allowed_special={*IMAGE_ST, ENDOFTEXT})
    pairs = {tokenizer.img_start_id: ("image", tokenizer.img_end_id),
             tokenizer.ref_start_id: ("ref", tokenizer.ref_end_id),
             tokenizer.box_start_id: ("box", tokenizer.box_end_id),
             tokenizer.quad_start_id: ("quad", tokenizer.quad_end_id)}
    out, pos = [], 0
    for start, token in enumerate(ids):
        if start < pos or token not in pairs:
            continue
        key, closing = pairs[token]
        if closing not in ids[start:]:
            raise ImageSpanError(f"Unclosed image token: {tokenizer.convert_ids_to_tokens(token)} "
                                 f"has no matching closing tag in {text[:200]!r}")
        end = ids.index(closing, start)
        if start > pos:
            out.append({"text": _text(tokenizer, ids[pos:start])})
        out.append({key: _text(tokenizer, ids[start + 1:end])})
        pos = end + 1
    if pos < len(ids):
        out.append({"text": _text(tokenizer, ids[pos:])})
    return out


def _text(tokenizer: QWenTokenizer, ids: list[int]) -> str:
    # Plain BPE bytes (special ids as their text): the input was valid UTF-8 cut at tag boundaries.
    return tokenizer.encoding.decode_bytes(ids).decode("utf-8")
