"""ChatML prompts, the list format and response decoding, as the release's chat() (spec §2.5, §6).

`make_context` and `decode_tokens` follow qwen_generation_utils.py; `from_list_format` and
`to_list_format` follow the tokenizer's helpers of the same names (rev-B: `Picture N: `).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

import torch

from workbench.errors import DataError
from workbench.model.tokenizer import (
    BOX_END,
    BOX_START,
    ENDOFTEXT,
    IMAGE_ST,
    IMEND,
    IMG_END,
    IMG_START,
    IMSTART,
    REF_END,
    REF_START,
    ImageSpanError,
    QWenTokenizer,
)

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144


def make_context(tokenizer: QWenTokenizer, query: str,
                 history: Sequence[tuple[str, str | None]] | None = None,
                 system: str = DEFAULT_SYSTEM,
                 max_window_size: int = DEFAULT_MAX_WINDOW_SIZE) -> tuple[str, list[int]]:
    """ChatML prompt `(raw_text, ids)` for `query` after `history`, ending in `assistant\\n`.

    History turns are kept newest first while system + kept turns stay under
    `max_window_size` (strict); the current query is never cut and not counted.
    """
    im_start, im_end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")

    def role(name: str, content: str) -> tuple[str, list[int]]:
        # Only the nine VL tags are special here: a typed <|im_start|> stays plain text (§2.3).
        name_ids, content_ids = (tokenizer.encode(s, allowed_special=IMAGE_ST) for s in (name, content))
        return f"{name}\n{content}", name_ids + nl + content_ids

    system_text, system_ids = role("system", system)
    system_ids = im_start + system_ids + im_end
    raw_text, context = "", []
    for turn_query, turn_response in reversed(history or []):
        query_text, query_ids = role("user", turn_query)
        if turn_response is None:
            turn_ids = nl + im_start + query_ids + im_end + nl
            turn_text = f"\n{IMSTART}{query_text}{IMEND}\n"
        else:
            response_text, response_ids = role("assistant", turn_response)
            turn_ids = nl + im_start + query_ids + im_end + nl + im_start + response_ids + im_end
            turn_text = f"\n{IMSTART}{query_text}{IMEND}\n{IMSTART}{response_text}{IMEND}"
        if len(system_ids) + len(turn_ids) + len(context) >= max_window_size:
            break
        context, raw_text = turn_ids + context, turn_text + raw_text

    ids = (system_ids + context + nl + im_start + role("user", query)[1] + im_end
           + nl + im_start + tokenizer.encode("assistant") + nl)
    raw_text = f"{IMSTART}{system_text}{IMEND}{raw_text}\n{IMSTART}user\n{query}{IMEND}\n{IMSTART}assistant\n"
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


def from_list_format(elements: Iterable[dict]) -> str:
    """`[{'image': p}, {'text': t}, {'ref': r, 'box': [[x1,y1,x2,y2], ...]}]` -> prompt text."""
    out, n_images = "", 0
    for element in elements:
        # Keys are tested in this order and the first hit wins, as in the release.
        if "image" in element:
            n_images += 1
            out += f"Picture {n_images}: {IMG_START}{element['image']}{IMG_END}\n"
        elif "text" in element:
            out += element["text"]
        elif "box" in element:
            if "ref" in element:
                out += f"{REF_START}{element['ref']}{REF_END}"
            for box in element["box"]:
                out += f"{BOX_START}(%d,%d),(%d,%d){BOX_END}" % tuple(box[:4])
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
