"""OpenAI chat messages -> the Qwen-VL ChatML prompt: token ids, and which images its spans show.

The prompt is workbench/prompt's `make_context` (the release's layout: the system turn, the history
turns that fit in the window, kept newest first, the query, `assistant\\n`), with each user message
as list-format parts: `{"text": ...}` where the client wrote text, `{"image": label}` where it sent
an image. make_context encodes text parts with only the grounding tags special (`<ref>`, `<box>`,
`<quad>`: how Qwen-VL is asked to ground a phrase), so a typed `<img>`, `<imgpad>` or
`<|im_start|>` is plain text; image spans come only from image parts, one per image the server
decoded itself, whose pixels go to the model as pixel_values (their features overwrite all 256
slots of the span, so the label bytes never matter).

System and assistant messages are plain strings to make_context, where the VL tags stay tags (an
earlier answer's `<ref>..</ref><box>..</box>` is the model's own markup), so `<img>`-style tags are
refused in every message's text before anything is encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError
from workbench.model.tokenizer import IMG_END, IMG_PAD, IMG_START, QWenTokenizer
from workbench.prompt import make_context
from workbench.prompt.chatml import DEFAULT_MAX_WINDOW_SIZE

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
    system: str | None = None  # None: the chat template's default system message


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
    conversation = Conversation(turns[-1][1], history, "\n".join(system) if system else None)
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


def image_label(index: int) -> str:
    return f"image-{index + 1}"


def encode_prompt(tokenizer: QWenTokenizer, conversation: Conversation,
                  max_window_size: int = DEFAULT_MAX_WINDOW_SIZE) -> tuple[list[int], list[int]]:
    """make_context's ids for the conversation, and the image indices in the order of their spans."""

    def parts(query: list[Part]) -> list[dict]:
        return [{"image": image_label(p["image"])} if "image" in p else p for p in query]

    history = [(parts(query), answer) for query, answer in conversation.history]
    _, ids = make_context(tokenizer, parts(conversation.query), history, conversation.system, max_window_size)
    images = [p["image"] for query, _ in conversation.history for p in query if "image" in p]
    images += [p["image"] for p in conversation.query if "image" in p]
    # The window drops whole turns, oldest first, and never the query: the spans left are the last ones.
    kept = ids.count(tokenizer.img_start_id)
    return ids, images[len(images) - kept:]
