"""OpenAI chat messages -> the Qwen-VL ChatML prompt: token ids, and which images its spans show.

The layout is make_context's (workbench/model/chat_format.py): the system turn, the history turns
that fit in the window (kept newest first), the query, `assistant\\n`. A user message's parts are
rendered the way from_list_format renders a list: `Picture k: <img>..</img>\\n` where an image part
stands, text as it is.

Client text is encoded with no image or ChatML tag allowed: `<img>`, `<imgpad>`, `<|im_start|>`...
typed by a client are plain text bytes, so no client can make the model open a file or start a turn.
The grounding markup (`<ref>`, `<box>`, `<quad>` and their ends) stays the model's own tokens: it is
how Qwen-VL is asked to ground a phrase and how it writes boxes, and it opens nothing. Image spans
are inserted here, one per image the server decoded itself; the pixels go to the model as
pixel_values, whose features overwrite all 256 slots of the span, so the label bytes never matter.

`encode_prompt` is the one place that builds the ids (to be replaced by workbench/prompt.py's
make_context with `{"text"}` / `{"image"}` parts when that lands).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError
from workbench.model.chat_format import DEFAULT_MAX_WINDOW_SIZE, DEFAULT_SYSTEM
from workbench.model.tokenizer import (
    BOX_END,
    BOX_START,
    IMG_END,
    IMG_PAD,
    IMG_START,
    IMG_TOKEN_SPAN,
    QUAD_END,
    QUAD_START,
    REF_END,
    REF_START,
    QWenTokenizer,
)

GROUNDING_TAGS = frozenset({REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END})
IMAGE_TAGS = (IMG_START, IMG_END, IMG_PAD)

Part = dict  # {"text": str} or {"image": int}, the index of the request's image


class PromptError(WorkbenchError, ValueError):
    """A request whose messages cannot become a prompt; `param` names the field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Conversation:
    """What make_context takes: a system text, (user parts, assistant text) history, the query parts."""

    query: list[Part]
    history: list[tuple[list[Part], str]] = field(default_factory=list)
    system: str = DEFAULT_SYSTEM


def conversation_from_messages(messages: Sequence[dict]) -> tuple[Conversation, list[tuple[str, str]]]:
    """OpenAI `messages` (as dicts) -> the conversation, and the (URL, request field) of each image
    that its image parts index.

    System (and `developer`) messages are joined into the system text; consecutive messages of one
    role are joined into one turn, as the release's chat has one text per turn; the last message
    must be the user's.
    """
    urls: list[tuple[str, str]] = []
    system: list[str] = []
    turns: list[tuple[str, list[Part]]] = []
    for i, message in enumerate(messages):
        role, where = message["role"], f"messages[{i}]"
        parts = _parts(message.get("content"), where, urls, images_allowed=role == "user")
        if role in ("system", "developer"):
            if turns:
                raise PromptError("a system message must come before the user and assistant messages",
                                  f"{where}.role")
            system.append("".join(p["text"] for p in parts))
        elif turns and turns[-1][0] == role:
            turns[-1][1].extend([{"text": "\n"}, *parts])
        else:
            turns.append((role, parts))
    if not turns or turns[-1][0] != "user":
        raise PromptError("the last message must be the user's (the question the model answers)", "messages")
    if turns[0][0] != "user":
        raise PromptError("the first message after the system messages must be the user's", "messages")
    history = [(turns[k][1], "".join(p["text"] for p in turns[k + 1][1])) for k in range(0, len(turns) - 1, 2)]
    conversation = Conversation(turns[-1][1], history, "\n".join(system) if system else DEFAULT_SYSTEM)
    return conversation, urls


def _parts(content, where: str, urls: list[tuple[str, str]], images_allowed: bool) -> list[Part]:
    if content is None:
        raise PromptError("content is missing", f"{where}.content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    parts = []
    for j, part in enumerate(content):
        if part["type"] == "text":
            _refuse_image_tags(part["text"], f"{where}.content" if len(content) == 1 else f"{where}.content[{j}].text")
            parts.append({"text": part["text"]})
        elif not images_allowed:
            raise PromptError("images can only be in user messages", f"{where}.content[{j}]")
        else:
            parts.append({"image": len(urls)})
            urls.append((part["image_url"]["url"], f"{where}.content[{j}].image_url.url"))
    return parts


def _refuse_image_tags(text: str, param: str) -> None:
    # Encoding would keep such tags plain text anyway; refusing says why the model would not see the file.
    for tag in IMAGE_TAGS:
        if tag in text:
            raise PromptError(f"{tag} in text is not accepted: Qwen-VL would read the text inside as a "
                              "file path. Send the image as an image_url part instead", param, "image_tag_in_text")


def encode_text(tokenizer: QWenTokenizer, text: str) -> list[int]:
    """Client text -> ids: only the grounding tags are special; every other tag is plain bytes."""
    return tokenizer.encode(text, allowed_special=GROUNDING_TAGS, disallowed_special=())


def image_span(tokenizer: QWenTokenizer, label: str) -> list[int]:
    """`<img>label</img>` as the tokenizer writes an image span: label bytes, then <imgpad> to 256 slots."""
    data = label.encode("utf-8")[: IMG_TOKEN_SPAN - 1]
    return [tokenizer.img_start_id, *data, *[tokenizer.img_pad_id] * (IMG_TOKEN_SPAN - len(data)),
            tokenizer.img_end_id]


def image_label(index: int) -> str:
    return f"image-{index + 1}"


def encode_prompt(tokenizer: QWenTokenizer, conversation: Conversation,
                  max_window_size: int = DEFAULT_MAX_WINDOW_SIZE) -> tuple[list[int], list[int]]:
    """make_context's ids for the conversation, and the image indices in the order of their spans.

    The text between two spans is encoded as one string, as make_context encodes the text between
    special tokens, so a prompt without client image tags gets make_context's ids exactly.
    """

    def content(parts: list[Part]) -> tuple[list[int], list[int]]:
        ids, images, text, n = [], [], "", 0
        for part in parts:
            if "text" in part:
                text += part["text"]
                continue
            n += 1
            ids += encode_text(tokenizer, text + f"Picture {n}: ") + image_span(tokenizer, image_label(part["image"]))
            images.append(part["image"])
            text = "\n"
        return ids + encode_text(tokenizer, text), images

    im_start, im_end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")
    user, assistant = tokenizer.encode("user") + nl, tokenizer.encode("assistant") + nl
    system = im_start + tokenizer.encode("system") + nl + encode_text(tokenizer, conversation.system) + im_end
    context, context_images = [], []
    for query, response in reversed(conversation.history):
        query_ids, images = content(query)
        turn = (nl + im_start + user + query_ids + im_end
                + nl + im_start + assistant + encode_text(tokenizer, response) + im_end)
        if len(system) + len(turn) + len(context) >= max_window_size:
            break  # make_context's window: older turns are dropped, the query never is
        context, context_images = turn + context, images + context_images
    query_ids, images = content(conversation.query)
    ids = system + context + nl + im_start + user + query_ids + im_end + nl + im_start + assistant
    return ids, context_images + images
